"""Group-relative advantages: one scalar per completion from the rewards of its GRPO group.

Pure functions of a batch's rewards (`num_groups * group_size`, the n completions of a prompt
contiguous); the trainer turns them into advantages before the loss (rl/trainer/loss.py).

Estimators (`algorithm.advantage`): `grpo` r - mean(group), divided per `scale` (DeepSeekMath,
TRL's GRPOTrainer); `dr_grpo` r - mean(group), never divided by a std (arXiv:2503.20783);
`rloo` r - mean(the other completions) = G/(G-1) * (r - mean(group)).
Scaling (`algorithm.scale_rewards`): by the group's reward std (`group`), the batch's (`batch`)
or nothing (`none`); unbiased stds + 1e-4, as TRL. A group whose rewards are all equal carries
no signal: its advantages are exactly zero and it is counted (for DAPO-style dynamic sampling).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Estimator = Literal["grpo", "dr_grpo", "rloo"]
Scale = Literal["group", "batch", "none"]

STD_EPS = 1e-4
"""Added to the std before dividing (TRL's value), so near-constant groups stay finite."""


def _grouped(rewards: Tensor, group_size: int) -> Tensor:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [num_groups * group_size], got shape {tuple(rewards.shape)}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (a group of one has no baseline), got {group_size}")
    if rewards.numel() == 0 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards must be finite (score failures should be given a reward, e.g. 0)")
    return rewards.view(-1, group_size)


def zero_variance_mask(rewards: Tensor, group_size: int) -> Tensor:
    """Which groups have identical rewards for every completion (no learning signal).

    rewards: [num_groups * group_size], groups contiguous. Returns bool [num_groups].
    """
    grouped = _grouped(rewards, group_size)
    return grouped.amax(dim=1) == grouped.amin(dim=1)


def group_advantages(
    rewards: Tensor,
    group_size: int,
    estimator: Estimator = "grpo",
    scale: Scale = "group",
    *,
    eps: float = STD_EPS,
) -> tuple[Tensor, dict[str, float]]:
    """Advantages of a batch of GRPO groups.

    rewards: [num_groups * group_size] (float; the group_size completions of a prompt contiguous).
    Returns (advantages [num_groups * group_size] in rewards' float dtype, stats) where stats has
    `reward_mean`, `reward_std` (over the batch), `groups`, `zero_variance_groups` (count) and
    `zero_variance_fraction`.

    `estimator="dr_grpo"` ignores `scale` (its point is not dividing by a std). For `rloo`, `scale`
    divides by the std of the rewards (as for `grpo`), not by the std of the advantages as TRL's
    RLOOTrainer `normalize_advantages` does. Zero-variance groups get exactly 0 where TRL gets
    `(r - mean) / (0 + eps)`, which is 0 up to float rounding of the mean.
    """
    if not rewards.is_floating_point():
        rewards = rewards.float()
    grouped = _grouped(rewards, group_size)
    zero_var = grouped.amax(dim=1) == grouped.amin(dim=1)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if estimator == "rloo":
        centred = centred * (group_size / (group_size - 1))
    elif estimator not in ("grpo", "dr_grpo"):
        raise ValueError(f"unknown advantage estimator {estimator!r}")

    if estimator == "dr_grpo" or scale == "none":
        advantages = centred
    elif scale == "group":
        advantages = centred / (grouped.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        advantages = centred / (rewards.std() + eps)
    else:
        raise ValueError(f"unknown reward scaling {scale!r}")
    advantages = advantages.masked_fill(zero_var.unsqueeze(1), 0.0).reshape(-1)

    num_groups = grouped.shape[0]
    stats = {
        "reward_mean": rewards.mean().item(),
        "reward_std": rewards.std().item(),
        "groups": float(num_groups),
        "zero_variance_groups": float(zero_var.sum().item()),
        "zero_variance_fraction": zero_var.float().mean().item(),
    }
    return advantages, stats
