"""Micro-benchmarks (pytest-benchmark), kept out of the unit tests:

    pytest -m benchmark tests/benchmarks --benchmark-only

A training step of ResNet-20/56, plain and residual, at batch 128 on the CPU (and on CUDA when
present, with our default execution there), and the device loader's img/s. On CUDA each timed
call is a block of steps followed by a synchronize, so asynchronous launches are not mistaken
for finished work.
"""
import pytest
import torch

import resnet
from bench import data
from bench.specs import Execution
from bench.steps import TrainStep, make_optimizer

pytestmark = [pytest.mark.benchmark, pytest.mark.slow]  # timings, never in the fast loop
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BLOCK = {"cpu": 1, "cuda": 20}  # steps per timed call


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("model", ["resnet20", "plain20", "resnet56", "plain56"])
def test_train_step(benchmark, model, device):
    ex = Execution.for_device(device)
    dev = torch.device(device)
    fmt = torch.channels_last if ex.channels_last else torch.contiguous_format
    net = resnet.build(model).to(dev, memory_format=fmt)
    step = TrainStep(net, make_optimizer(net, 0.1, 0.9, 1e-4, dev), execution=ex.execution, amp=ex.amp, device=dev)
    x = torch.randn(128, 3, 32, 32, device=dev).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (128,), device=dev)

    def block():
        for _ in range(BLOCK[device]):
            step(x, y)
        _sync(device)

    benchmark.extra_info.update(batch_size=128, steps_per_call=BLOCK[device], amp=ex.amp,
                                channels_last=ex.channels_last, execution=ex.execution, torch=torch.__version__,
                                gpu=torch.cuda.get_device_name() if device == "cuda" else None)
    benchmark.pedantic(block, rounds=5 if device == "cpu" else 10, warmup_rounds=1)
    benchmark.extra_info["img_per_s"] = 128 * BLOCK[device] / benchmark.stats.stats.median


@pytest.mark.parametrize("device", DEVICES)
def test_loader(benchmark, device):
    a = data.synthetic(20_000, 16)
    dev = torch.device(device)
    loader = data.DeviceLoader(a.train_x, a.train_y, data.pixel_mean(a.train_x), batch_size=128, seed=0, device=dev,
                               channels_last=True)
    counter = iter(range(10**9))

    def block():
        for _ in range(50):
            loader.batch(next(counter))
        _sync(device)

    benchmark.pedantic(block, rounds=10, warmup_rounds=1)
    benchmark.extra_info["img_per_s"] = 128 * 50 / benchmark.stats.stats.median
