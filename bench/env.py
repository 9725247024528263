"""The hardware and software of this process, as every row records it (never a hostname)."""
from __future__ import annotations

import datetime as dt
import functools
import os
import platform
import subprocess
from pathlib import Path

import torch

import bench


@functools.cache
def _git() -> tuple[str | None, bool | None]:
    """(sha, dirty) of the checkout resbench runs from, or (None, None) outside git."""
    root = Path(bench.__file__).resolve().parent.parent
    if os.environ.get("RESBENCH_GIT_SHA"):  # a copy of the checkout without .git (e.g. a GPU machine)
        return os.environ["RESBENCH_GIT_SHA"], os.environ.get("RESBENCH_GIT_DIRTY", "0") == "1"
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if sha.returncode:
            return None, None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        return sha.stdout.strip(), bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return None, None


# instruction sets whose presence changes what the CPU computes (bf16 kernels, their rounding) or how fast
CPU_ISA = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_fp16",
           "asimd", "sve", "sve2", "bf16", "i8mm")


def cpu_info(path: str | os.PathLike = "/proc/cpuinfo") -> tuple[str, str]:
    """(model name, the CPU_ISA flags it has, comma-separated) from Linux's cpuinfo; elsewhere what
    ``platform`` knows and no flags. Two machines of one architecture (x86_64) can train the same
    spec to different fp32 and bf16 numbers: the model and these flags tell them apart."""
    model, flags = None, set()
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "hardware", "cpu model") and model is None:
                    model = value.strip()
                elif key in ("flags", "features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return model or platform.processor() or platform.machine(), ",".join(f for f in CPU_ISA if f in flags)


_cpu = functools.cache(cpu_info)  # read once per process


def environment(device: str) -> dict:
    """Hardware and software of this process. Deliberately no hostname."""
    cuda = device.startswith("cuda") and torch.cuda.is_available()
    sha, dirty = _git()
    return dict(
        device=device,
        gpu_name=torch.cuda.get_device_name(torch.device(device)) if cuda else None,
        cpu=_cpu()[0],
        cpu_isa=_cpu()[1],
        cpu_capability=torch.backends.cpu.get_cpu_capability(),  # the kernels torch dispatches to (e.g. AVX512)
        cpu_threads=torch.get_num_threads(),
        torch_version=torch.__version__,
        cuda_version=torch.version.cuda,
        cudnn_version=torch.backends.cudnn.version() if cuda else None,
        cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),  # which GPU a pinned worker had
        python_version=platform.python_version(),
        resbench_version=bench.__version__,
        git_sha=sha,
        git_dirty=dirty,
        utc_time=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    )
