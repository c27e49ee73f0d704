"""The trainer's process group: join a `torchrun`/`deepspeed` launch, or make a one-rank group.

Kept apart from rl/trainer/strategy.py (which owns the DeepSpeed engine) because it is process-wide
state: the default torch group and DeepSpeed's cached comm backend outlive any one engine.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch.distributed as dist

LAUNCH_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched() -> bool:
    """Whether `torchrun`/the deepspeed launcher started this process. All of its variables, not just RANK:
    a stray RANK (another library's leftover, e.g. an in-process engine that set up its own group) alone
    would send DeepSpeed into MPI discovery."""
    return all(v in os.environ for v in LAUNCH_ENV)


def init_distributed(timeout_s: float = 600.0) -> None:
    """Join the process group of a `torchrun`/`deepspeed` launch, or make a one-rank group.

    Without a launcher DeepSpeed would try MPI discovery (and fail without mpi4py).
    A one-rank group on an in-memory store needs no free port, and only
    `LOCAL_RANK` is added to the environment, so child processes (rollout workers)
    inherit no stale RANK/MASTER_PORT. Its backend is the accelerator's (gloo on CPU,
    NCCL on CUDA: ZeRO's all-gather/reduce-scatter of CUDA tensors have no gloo kernel).
    A collective that waits `timeout_s` on another rank fails (`trainer.collective_timeout_s`).
    """
    import deepspeed

    timeout = timedelta(seconds=timeout_s)
    if not dist.is_initialized() and not launched():
        # DeepSpeed keeps its comm backend (and the groups it wraps) across engines; if something
        # tore the default group down since (an in-process vLLM engine does, at shutdown), that
        # backend is stale and would hand the new engine an unregistered group: start it afresh.
        _forget_deepspeed_groups()
        dist.init_process_group(_backend_name(), store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        os.environ.setdefault("LOCAL_RANK", "0")
    # With torch.distributed already up, this only creates DeepSpeed's comm backend
    # (first use JIT-builds the `deepspeed_shm_comm` op on CPU, ~40 s, then cached).
    deepspeed.init_distributed(dist_backend=_backend_name(), timeout=timeout)


def _forget_deepspeed_groups() -> None:
    """Drop DeepSpeed's comm backend and the process groups it cached (its world-group clone, ...)."""
    import deepspeed.comm.comm as ds_comm
    import deepspeed.utils.groups as ds_groups

    ds_comm.cdb = None
    for name, value in list(vars(ds_groups).items()):
        if name.startswith("_") and name.isupper():
            if isinstance(value, dist.ProcessGroup):
                setattr(ds_groups, name, None)
            elif isinstance(value, dict) and any(isinstance(v, dist.ProcessGroup) for v in value.values()):
                value.clear()


def _backend_name() -> str:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().communication_backend_name()
