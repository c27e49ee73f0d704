"""Wrapping the trainer's model with peft so only LoRA adapters train (the file format: rl/weights/lora.py)."""

from __future__ import annotations

import torch

from rl.config import LoraConfig


def apply_lora(model: torch.nn.Module, cfg: LoraConfig) -> torch.nn.Module:
    """`model` wrapped by peft with trainable adapters on `cfg.target_modules`; base weights frozen."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        modules_to_save=list(cfg.modules_to_save) or None,
        bias="none",
        task_type="CAUSAL_LM",
    )
    wrapped = get_peft_model(model, peft_cfg)
    if not any("lora_" in name for name, _ in wrapped.named_parameters()):
        raise ValueError(f"trainer.lora.target_modules {cfg.target_modules} matched no linear layer of the model")
    return wrapped
