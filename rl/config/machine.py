"""What this machine computes natively: resolves `rollout.dtype: auto` where a config is loaded.

Read from the kernel, never from torch (loading a config stays fast): bfloat16 is native on NVIDIA GPUs
and on CPUs with bf16 instructions (x86 `avx512_bf16` or `amx_bf16`, Arm `bf16`). vLLM-CPU on any other
CPU (e.g. avx2 only) runs bf16 emulated: measured 5x slower than float32 generation on the quickstart's
model (docs/benchmarks.md, "Worker dtype").
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

BF16_CPU_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}
"""/proc/cpuinfo flags (x86 `flags`, Arm `Features`) of CPUs with native bfloat16 arithmetic."""


def cpu_flags(cpuinfo: str) -> set[str]:
    """Every flag named on a `flags` or `Features` line of /proc/cpuinfo's text."""
    out: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            out.update(value.split())
    return out


def has_nvidia_gpu() -> bool:
    """An NVIDIA driver with at least one GPU this process may use (CUDA_VISIBLE_DEVICES="" hides them)."""
    gpus = Path("/proc/driver/nvidia/gpus")
    return os.environ.get("CUDA_VISIBLE_DEVICES") != "" and gpus.is_dir() and any(gpus.iterdir())


def rollout_dtype_for(gpu: bool, cpuinfo: str | None) -> str:
    """bfloat16 with an NVIDIA GPU or a CPU with bf16 instructions, else float32 (also when `cpuinfo` is unknown:
    float32 is never emulated)."""
    return "bfloat16" if gpu or (cpuinfo is not None and cpu_flags(cpuinfo) & BF16_CPU_FLAGS) else "float32"


@cache
def native_rollout_dtype() -> str:
    """`rollout_dtype_for` this machine."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux
        cpuinfo = None
    return rollout_dtype_for(has_nvidia_gpu(), cpuinfo)
