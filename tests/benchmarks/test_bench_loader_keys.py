"""Micro-benchmark of the ImageNet-style loader's sampler (pytest-benchmark; deselected by default):

    pytest -m benchmark tests/benchmarks/test_bench_loader_keys.py --benchmark-only

The keys alone (which image each position of a batch is, and in which epoch) of 10,000 batches of 32 from
an index of ImageNet's 1,281,167 training images: no file is read or decoded. The index's paths are made up;
only their number matters. results/reference-loader-keys-cpu holds the measurement before and after the
epoch's order was drawn once per epoch instead of once per batch.
"""
import itertools

import numpy as np
import pytest
import torch

from bench import imagefolder as imf

pytestmark = [pytest.mark.benchmark, pytest.mark.slow]  # timings, never in the fast loop
IMAGES, BATCHES, BATCH = 1_281_167, 10_000, 32


def index(n: int = IMAGES):
    """n items of one made-up tree (Items where the loader has them, a tuple of Item before)."""
    if hasattr(imf, "Items"):
        return imf.Items("/imagenet", np.array([f"train/c/{i:07d}.JPEG".encode() for i in range(n)]),
                         np.zeros(n, dtype=np.int32))
    return tuple(imf.Item(f"/imagenet/train/c/{i:07d}.JPEG", 0) for i in range(n))


def test_sampler_keys(benchmark):
    loader = imf.StreamLoader(index(), torch.zeros(3, imf.CROP, imf.CROP), batch_size=BATCH, seed=0,
                              device=torch.device("cpu"), workers=0)

    def keys():  # 10,000 batches of keys from batch 0 (an epoch is 40,036 batches: one epoch's order)
        return sum(1 for _ in itertools.islice(loader._keys(0), BATCHES * BATCH))

    assert benchmark.pedantic(keys, rounds=3, iterations=1) == BATCHES * BATCH
    benchmark.extra_info.update(batches=BATCHES, batch_size=BATCH, images=IMAGES)
