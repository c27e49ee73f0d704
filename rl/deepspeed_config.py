"""The DeepSpeed config of the trainer's engines (rl/trainer/strategy.py): the user's JSON, run config applied."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

from rl.config import ModelConfig, TrainerConfig, find_config_file, shipped_names

log = logging.getLogger(__name__)


def load_deepspeed_config(source: str | dict[str, Any]) -> dict[str, Any]:
    """A DeepSpeed config from an inline dict or a JSON path: relative to the cwd, else a shipped one
    (`configs/deepspeed/zero3.json`, or just `zero3`), wherever the package is installed."""
    if isinstance(source, dict):
        return copy.deepcopy(source)
    path = find_config_file(source, folder="deepspeed", suffix=".json")
    if path is None:
        shipped = ", ".join(f"configs/deepspeed/{name}.json" for name in shipped_names("deepspeed", ".json"))
        raise FileNotFoundError(
            f"trainer.deepspeed: DeepSpeed config {source!r} not found here ({Path.cwd()}) nor shipped ({shipped})"
        )
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"trainer.deepspeed: {path} is not valid JSON: {e}") from None


def build_deepspeed_config(
    model_cfg: ModelConfig, trainer_cfg: TrainerConfig, world_size: int | None = None
) -> dict[str, Any]:
    """The training engine's config: the user's JSON with the fields this class owns overridden.

    On one rank (`world_size` 1) ZeRO-1/2 partition over nothing and only add bucketing and
    copies, so a stage 1/2 JSON runs as stage 0 unless `trainer.zero_stage` says otherwise or
    the JSON offloads (offload needs ZeRO >= 1). Stage 3 is kept (partitioned loading).
    """
    cfg = load_deepspeed_config(trainer_cfg.deepspeed)
    for key in ("optimizer", "scheduler"):
        if cfg.pop(key, None) is not None:
            log.warning("ignoring %r in the DeepSpeed config: the trainer config sets AdamW and the LR", key)
    for key in ("train_batch_size", "gradient_accumulation_steps"):
        cfg.pop(key, None)
    zero = cfg.setdefault("zero_optimization", {})
    if trainer_cfg.zero_stage is not None:
        zero["stage"] = trainer_cfg.zero_stage
    zero.setdefault("stage", 0)
    offloads = any((zero.get(k) or {}).get("device", "none") != "none" for k in ("offload_optimizer", "offload_param"))
    if world_size == 1 and trainer_cfg.zero_stage is None and zero["stage"] in (1, 2) and not offloads:
        log.info("one rank: ZeRO-%d -> ZeRO-0 (nothing to partition over; set trainer.zero_stage to insist)",
                 zero["stage"])  # fmt: skip
        zero["stage"] = 0
    cfg.update(
        train_micro_batch_size_per_gpu=trainer_cfg.micro_batch_size,
        gradient_accumulation_steps=1,
        # step() is the only accumulation boundary; backward() never rescales.
        managed_gradient_accumulation=False,
        gradient_clipping=trainer_cfg.grad_clip,
        zero_allow_untested_optimizer=True,  # the client torch AdamW (no fused_adam JIT build)
    )
    cfg.setdefault("steps_per_print", 10**9)
    cfg["bf16"] = {**cfg.get("bf16", {}), "enabled": model_cfg.dtype == "bfloat16"}
    cfg["fp16"] = {**cfg.get("fp16", {}), "enabled": model_cfg.dtype == "float16"}
    return cfg


def offloads_optimizer(ds_config: dict[str, Any]) -> bool:
    """Whether the config moves optimizer state and step to the CPU (ZeRO-Offload, or NVMe via the CPU)."""
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer") or {}
    return offload.get("device", "none") in ("cpu", "nvme")


def reference_config(train_cfg: dict[str, Any]) -> dict[str, Any]:
    """Config of the frozen reference engine: sharded only when the policy is (ZeRO-3)."""
    stage = 3 if train_cfg["zero_optimization"]["stage"] == 3 else 0
    return {
        "train_micro_batch_size_per_gpu": train_cfg["train_micro_batch_size_per_gpu"],
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": train_cfg["bf16"]["enabled"]},
        "fp16": {"enabled": train_cfg["fp16"]["enabled"]},
        "steps_per_print": 10**9,
    }


def warmup_then_constant(warmup_steps: int):
    """LR multiplier of optimizer step s (0-based): (s + 1) / warmup_steps during warm-up, then 1."""
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
