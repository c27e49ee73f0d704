"""The inputs of `rl plan`: the hardware, and what of a run config decides trainer and worker memory."""

from __future__ import annotations

from dataclasses import dataclass

from rl.config import RunConfig

DEFAULT_CHANGE_DENSITY = 0.0122
"""Share of rollout-dtype (bf16) elements that change per optimizer step (measured on the quickstart)."""


def import_deepspeed_quietly() -> None:
    """Import DeepSpeed with its start-up logging sent to stderr: stdout may be `rl plan --json`."""
    import contextlib
    import sys

    if "deepspeed" not in sys.modules:
        with contextlib.redirect_stdout(sys.stderr):
            import deepspeed  # noqa: F401
            from deepspeed.accelerator import get_accelerator

            get_accelerator()


class PlanError(ValueError):
    """Input the planner cannot use (no GPUs, an unknown model, ...); the message says which."""


@dataclass(frozen=True)
class Hardware:
    gpus: int
    """GPUs on the trainer side."""
    gpu_mem_gib: float
    """Memory of one GPU."""
    trainer_gpus: int
    """GPUs that train (the rest of `gpus` can host local rollout workers)."""
    gpus_per_node: int
    """GPUs per node (CPU offload memory is per node)."""
    cpu_mem_gib: float | None = None
    """Host memory per node, to check CPU offload (None: not checked)."""
    worker_gpu_mem_gib: float | None = None
    """Memory of a rollout worker's GPU (None: gpu_mem_gib)."""
    workers: int = 1
    """Rollout workers that download every version."""
    bandwidth_gbit: float = 10.0
    """Hub uplink, Gbit/s."""
    sites: int = 1
    """Sites, each behind one HTTP cache, the workers are spread over."""
    site_bandwidth_gbit: float = 25.0
    """A site cache's link to its workers, Gbit/s."""
    change_density: float = DEFAULT_CHANGE_DENSITY
    """Share of elements a delta version carries."""
    index_bytes: int = 4
    """Bytes of one element index in a delta."""

    def check(self) -> None:
        if self.gpus < 1:
            raise PlanError(f"--gpus must be at least 1 (got {self.gpus})")
        if not 1 <= self.trainer_gpus <= self.gpus:
            raise PlanError(f"--trainer-gpus must be between 1 and --gpus ({self.gpus}), got {self.trainer_gpus}")
        if self.gpu_mem_gib <= 0 or (self.worker_gpu_mem_gib is not None and self.worker_gpu_mem_gib <= 0):
            raise PlanError("GPU memory must be positive (GiB)")
        if self.gpus_per_node < 1:
            raise PlanError(f"--gpus-per-node must be at least 1 (got {self.gpus_per_node})")
        if self.workers < 1 or self.sites < 1:
            raise PlanError("--workers and --sites must be at least 1")
        if self.bandwidth_gbit <= 0 or self.site_bandwidth_gbit <= 0:
            raise PlanError("bandwidths must be positive (Gbit/s)")
        if not 0.0 < self.change_density <= 1.0:
            raise PlanError(f"--change-density must be in (0, 1], got {self.change_density}")


@dataclass(frozen=True)
class TrainerSetup:
    """What of a run config decides the trainer's memory."""

    zero_stage: int
    offload_optimizer: bool
    offload_param: bool
    dtype: str
    micro_batch: int
    sequences_per_step: int
    seq_len: int
    gradient_checkpointing: bool
    reference: bool
    reduce_bucket: int
    allgather_bucket: int
    prefetch_bucket: int
    overlap_comm: bool
    deepspeed: str

    @classmethod
    def from_config(cls, cfg: RunConfig) -> TrainerSetup:
        import_deepspeed_quietly()
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

        from rl.deepspeed_config import build_deepspeed_config

        try:
            ds = build_deepspeed_config(cfg.model, cfg.trainer)
            zero = DeepSpeedZeroConfig(**ds["zero_optimization"])
        except (FileNotFoundError, ValueError) as e:
            raise PlanError(str(e)) from None
        return cls(
            zero_stage=int(zero.stage),
            offload_optimizer=zero.offload_optimizer is not None and str(zero.offload_optimizer.device) != "none",
            offload_param=zero.offload_param is not None and str(zero.offload_param.device) != "none",
            dtype=cfg.model.dtype,
            micro_batch=cfg.trainer.micro_batch_size,
            sequences_per_step=cfg.trainer.prompts_per_step * cfg.sampling.n,
            seq_len=min(cfg.data.max_prompt_tokens + cfg.sampling.max_tokens, cfg.model.max_model_len),
            gradient_checkpointing=cfg.trainer.gradient_checkpointing,
            reference=cfg.algorithm.beta > 0,
            reduce_bucket=int(zero.reduce_bucket_size),
            allgather_bucket=int(zero.allgather_bucket_size),
            prefetch_bucket=int(zero.prefetch_bucket_size),
            overlap_comm=bool(zero.overlap_comm),
            deepspeed=cfg.trainer.deepspeed if isinstance(cfg.trainer.deepspeed, str) else "(inline)",
        )


@dataclass(frozen=True)
class WorkerSetup:
    tensor_parallel: int
    dtype: str
    gpu_memory_utilization: float
    enforce_eager: bool
    max_model_len: int
    rollout_len: int
    sequences_per_lease: int

    @classmethod
    def from_config(cls, cfg: RunConfig, tp: int | None = None) -> WorkerSetup:
        return cls(
            tensor_parallel=tp or cfg.rollout.tensor_parallel,
            dtype=cfg.rollout.dtype or cfg.model.dtype,
            gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
            enforce_eager=cfg.rollout.enforce_eager,
            max_model_len=cfg.model.max_model_len,
            rollout_len=min(cfg.data.max_prompt_tokens + cfg.sampling.max_tokens, cfg.model.max_model_len),
            sequences_per_lease=cfg.rollout.prompts_per_lease * cfg.sampling.n,
        )
