"""GRPO-family policy losses over padded tensors, with off-policy correction and metrics.

The trainer computes the per-token log-probs of one micro-batch's completion tokens, calls
`policy_loss` and backpropagates the scalar. Every batch-level normaliser comes from one
`LossNorm` built per step from the full batch, so the micro-batch losses of a step sum to the
batch loss. Shapes: B sequences, T completion positions (right-padded); nothing under `mask`
0 (NaN included) reaches the loss, the gradients or the metrics. Each loss type's objective
and aggregation: the `LOSSES` table.

    norm = LossNorm.from_batch(batch_mask, micro_batch_size=mbs, max_tokens=max_tokens)
    for mb in micro_batches:
        loss, metrics = policy_loss(logp, mb.old_logp, mb.adv, mb.mask, cfg, loss_norm=norm)
        backward(loss); parts.append(metrics)
    log(reduce_metrics(parts))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from rl.config import AlgorithmConfig

ISMode = Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask", "none"]


@dataclass(frozen=True)
class LossNorm:
    """Normalisers of one optimizer step's whole batch, shared by all its micro-batches.

    Counts are over the full batch on all data-parallel ranks. Build it once per step with
    `LossNorm.from_batch(mask_of_the_full_batch, ...)`; with several ranks, all-reduce (sum)
    tokens, sequences and micro-batches first and construct it directly.
    """

    total_tokens: float
    """Completion tokens (sum of the mask) in the batch."""
    total_sequences: int
    """Sequences in the batch (rows, including any with no completion tokens, as TRL)."""
    num_micro_batches: int = 1
    """Micro-batches whose losses are summed into the step (only `bnpo` uses it)."""
    max_tokens: int | None = None
    """`dr_grpo`'s constant divisor per sequence (algorithm.dr_grpo_max_tokens or sampling.max_tokens)."""
    world_size: int = 1
    """Ranks over which the engine averages gradients; the loss is multiplied by it to undo that."""

    @classmethod
    def from_batch(
        cls, mask: Tensor, *, micro_batch_size: int | None = None, max_tokens: int | None = None
    ) -> LossNorm:
        """mask: [B, T] of the full batch; micro_batch_size None means one micro-batch."""
        rows = mask.shape[0]
        micro = 1 if micro_batch_size is None else math.ceil(rows / micro_batch_size)
        return cls(float(mask.sum().item()), rows, max(micro, 1), max_tokens)


class LossSpec(NamedTuple):
    """How one loss type is computed: ratio level, per-token objective, aggregation."""

    sequence_ratio: bool
    objective: Callable[[Tensor, Tensor, Tensor, AlgorithmConfig], tuple[Tensor, Tensor, Tensor]]
    aggregate: Callable[[Tensor, Tensor, LossNorm], Tensor]


# --------------------------------------------------------------------------- objectives
# (log_ratio [B,T] or [B,1], logprobs [B,T], advantages [B,1], cfg) -> (loss, clipped_low, clipped_high)


def _ppo_clip(log_ratio: Tensor, logprobs: Tensor, adv: Tensor, cfg: AlgorithmConfig) -> tuple[Tensor, ...]:
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1 - cfg.epsilon_low, 1 + cfg.epsilon_high)
    loss = -torch.min(ratio * adv, clipped * adv)
    if cfg.dual_clip is not None:
        loss = torch.where(adv < 0, torch.min(loss, -cfg.dual_clip * adv), loss)
    low = (ratio < 1 - cfg.epsilon_low) & (adv < 0)
    high = (ratio > 1 + cfg.epsilon_high) & (adv > 0)
    return loss, low, high


def _cispo(log_ratio: Tensor, logprobs: Tensor, adv: Tensor, cfg: AlgorithmConfig) -> tuple[Tensor, ...]:
    ratio = torch.exp(log_ratio)
    weight = torch.clamp(ratio, max=1 + cfg.epsilon_high).detach()
    high = (ratio > 1 + cfg.epsilon_high) & (adv > 0)
    return -weight * adv * logprobs, torch.zeros_like(high), high


# --------------------------------------------------------------------------- aggregations
# (per_token_loss [B,T] zero on padding, mask [B,T] float, norm) -> scalar


def _sequence_mean(loss: Tensor, mask: Tensor, norm: LossNorm) -> Tensor:
    per_sequence = loss.sum(-1) / mask.sum(-1).clamp(min=1.0)
    return per_sequence.sum() / max(norm.total_sequences, 1)


def _micro_batch_token_mean(loss: Tensor, mask: Tensor, norm: LossNorm) -> Tensor:
    return loss.sum() / mask.sum().clamp(min=1.0) / norm.num_micro_batches


def _constant(loss: Tensor, mask: Tensor, norm: LossNorm) -> Tensor:
    if norm.max_tokens is None:
        raise ValueError("dr_grpo needs LossNorm.max_tokens (dr_grpo_max_tokens or sampling.max_tokens)")
    return loss.sum() / (max(norm.total_sequences, 1) * norm.max_tokens)


def _batch_token_mean(loss: Tensor, mask: Tensor, norm: LossNorm) -> Tensor:
    return loss.sum() / max(norm.total_tokens, 1.0)


LOSSES: dict[str, LossSpec] = {
    "grpo": LossSpec(False, _ppo_clip, _sequence_mean),
    "bnpo": LossSpec(False, _ppo_clip, _micro_batch_token_mean),
    "dr_grpo": LossSpec(False, _ppo_clip, _constant),
    "dapo": LossSpec(False, _ppo_clip, _batch_token_mean),
    "gspo": LossSpec(True, _ppo_clip, _sequence_mean),
    "cispo": LossSpec(False, _cispo, _batch_token_mean),
}
"""Each loss type: sequence- or token-level ratio, per-token objective, aggregation.

Per token (ratio r = exp(logp - logp_old), advantage A per sequence):
- PPO clip (`grpo`, `bnpo`, `dr_grpo`, `dapo`, `gspo`): -min(r A, clip(r, 1-eps_low, 1+eps_high) A),
  with optional dual-clip (Ye et al. 2020): for A < 0 the loss is capped at -c A.
- `gspo`: r is one sequence-level ratio, exp(mean over tokens of the log-ratio) (arXiv:2507.18071).
- `cispo`: -sg(min(r, 1+eps_high)) A logp, REINFORCE with clipped IS weights (arXiv:2506.13585);
  the weight has no lower bound (the paper's eps_low^IS is effectively off too).
Off-policy correction: times w = min(exp(logp_old - logp_behaviour), C) per token, or the
sequence/mask variants (`is_mode`, TRL's `vllm_importance_sampling_mode` names). KL to a
reference: + beta * r * k3(ref, current) per token, where GRPO's paper has plain k3 (r: ratio to
the old policy, TRL's default bias correction; not multiplied by the behaviour weight w, as TRL).
Aggregation: `grpo`/`gspo` mean over sequences of the token mean; `bnpo` token mean per
micro-batch, averaged over micro-batches (as TRL, so it alone depends on the micro-batch split);
`dr_grpo` token sum / (sequences * max_tokens); `dapo`/`cispo` token sum / tokens in the batch.
"""


def scales_with_tokens(loss: str) -> bool:
    """Whether a loss type divides by the batch's completion tokens (`LossNorm.total_tokens`): its gradient is
    then proportional to 1 / total_tokens, so a count learnt after the backwards can be applied as a scale."""
    return LOSSES[loss].aggregate is _batch_token_mean


# --------------------------------------------------------------------------- off-policy correction


def behaviour_importance_weights(
    old_logprobs: Tensor, behaviour_logprobs: Tensor, mask: Tensor, mode: ISMode, cap: float
) -> tuple[Tensor, Tensor]:
    """Importance weights of the trainer's old policy over the rollout worker's (behaviour) policy.

    old_logprobs, behaviour_logprobs, mask: [B, T]. Returns (weights, over_cap), both [B, T] for
    `token_*` modes and [B, 1] for `sequence_*` modes (the sequence ratio is the product of the
    token ratios). `*_truncate`: min(w, cap); `*_mask`: 0 where w > cap; `none`: all ones.
    over_cap marks where the raw weight exceeded cap. Weights carry no gradient. Padding and
    NaN log-probs give a log-ratio of 0 (weight 1), as in TRL.
    """
    with torch.no_grad():
        diff = torch.nan_to_num((old_logprobs - behaviour_logprobs) * mask, nan=0.0)
        if mode.startswith("sequence"):
            diff = diff.sum(-1, keepdim=True)
        weights = torch.exp(diff)
        over_cap = weights > cap
        if mode.endswith("truncate"):
            weights = weights.clamp(max=cap)
        elif mode.endswith("mask"):
            weights = weights.masked_fill(over_cap, 0.0)
        elif mode == "none":
            weights, over_cap = torch.ones_like(weights), torch.zeros_like(over_cap)
        else:
            raise ValueError(f"unknown importance sampling mode {mode!r}")
    return weights, over_cap


# --------------------------------------------------------------------------- the loss


def _masked(x: Tensor, keep: Tensor) -> Tensor:
    # where() rather than a product, so NaN/inf under padding reaches neither the loss nor the gradient.
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _mean_parts(name: str, values: Tensor, keep: Tensor) -> dict[str, Tensor]:
    keep = keep.expand_as(values)
    return {f"{name}/sum": _masked(values, keep).sum(), f"{name}/count": keep.sum().to(values.dtype)}


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    cfg: AlgorithmConfig,
    *,
    behaviour_logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    entropy: Tensor | None = None,
    loss_norm: LossNorm,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The loss of one micro-batch, normalised so that micro-batch losses sum to the batch loss.

    logprobs: [B, T] current policy, with grad. old_logprobs: [B, T] policy at the start of the
    step (None: logprobs.detach(), exact when num_iterations == 1). behaviour_logprobs: [B, T]
    from the rollout worker (None: no off-policy correction). ref_logprobs: [B, T] frozen
    reference (needed when cfg.beta > 0). entropy: [B, T] per-token entropy, logged only.
    advantages: [B]. mask: [B, T], 1 on completion tokens. loss_norm: from the full batch.

    Returns (loss: 0-d tensor, metrics: dict of detached 0-d tensors, sum-able across micro-batches;
    combine them with `reduce_metrics`).
    Differences from TRL: cispo's cap is 1 + epsilon_high (TRL caps at epsilon_high itself), and
    dual-clip caps only negative-advantage losses (same as TRL's `delta` when c > 1 + epsilon_high).
    """
    if cfg.loss not in LOSSES:
        raise ValueError(f"unknown loss {cfg.loss!r}; expected one of {sorted(LOSSES)}")
    if logprobs.dim() != 2 or mask.shape != logprobs.shape or advantages.shape != logprobs.shape[:1]:
        raise ValueError(
            f"expected logprobs/mask [B, T] and advantages [B], got {tuple(logprobs.shape)}, "
            f"{tuple(mask.shape)}, {tuple(advantages.shape)}"
        )
    spec = LOSSES[cfg.loss]
    keep = mask.bool()
    maskf = keep.to(logprobs.dtype)
    logprobs = _masked(logprobs, keep)
    old = logprobs.detach() if old_logprobs is None else _masked(old_logprobs.detach(), keep)
    adv = advantages.detach().to(logprobs.dtype).unsqueeze(1)
    seq_has_tokens = keep.any(-1, keepdim=True)

    log_ratio = logprobs - old
    if spec.sequence_ratio:
        log_ratio = log_ratio.sum(-1, keepdim=True) / maskf.sum(-1, keepdim=True).clamp(min=1.0)
    per_token, clip_low, clip_high = spec.objective(log_ratio, logprobs, adv, cfg)
    clip_keep = seq_has_tokens if spec.sequence_ratio else keep
    metrics = {
        "tokens": maskf.sum().detach(),
        "sequences": logprobs.new_tensor(float(keep.shape[0])),
        **_mean_parts("clip_ratio/low", clip_low.to(logprobs.dtype), clip_keep),
        **_mean_parts("clip_ratio/high", clip_high.to(logprobs.dtype), clip_keep),
    }

    if behaviour_logprobs is not None:
        behaviour = _masked(behaviour_logprobs.detach(), keep)
        weights, over_cap = behaviour_importance_weights(old, behaviour, maskf, cfg.is_mode, cfg.is_cap)
        per_token = per_token * weights
        is_keep = seq_has_tokens if weights.shape[1] == 1 else keep
        # KL(behaviour || current), k3 estimator on the behaviour policy's samples.
        log_r = torch.nan_to_num(logprobs.detach() - behaviour, nan=0.0)
        metrics |= _mean_parts("is_weight", weights, is_keep)
        metrics |= _mean_parts("is_over_cap", over_cap.to(logprobs.dtype), is_keep)
        metrics["is_weight/max"] = _masked(weights, is_keep).max()
        metrics |= _mean_parts("mismatch_kl", torch.exp(log_r) - 1 - log_r, keep)

    kl_loss = logprobs.new_zeros(())
    if ref_logprobs is not None:
        ref_delta = _masked(ref_logprobs.detach(), keep) - logprobs
        # k3 estimator of KL(current || ref), times the (differentiable) ratio to the old policy that
        # sampled the tokens: unbiased (DeepSeek-V3.2), TRL's default `use_bias_correction_kl`.
        kl = (torch.exp(ref_delta) - ref_delta - 1) * torch.exp(log_ratio)
        metrics |= _mean_parts("ref_kl", kl.detach(), keep)
        if cfg.beta > 0:
            kl_loss = spec.aggregate(cfg.beta * kl * maskf, maskf, loss_norm) * loss_norm.world_size
    elif cfg.beta > 0:
        raise ValueError("algorithm.beta > 0 needs ref_logprobs")
    if entropy is not None:
        metrics |= _mean_parts("entropy", entropy.detach(), keep)

    pg_loss = spec.aggregate(per_token * maskf, maskf, loss_norm) * loss_norm.world_size
    metrics["loss/policy"] = pg_loss.detach()
    metrics["loss/kl"] = kl_loss.detach()
    return pg_loss + kl_loss, metrics


def merge_metrics(parts: Iterable[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Merge metric dicts of micro-batches (or of ranks): keys ending in `/max` by max, all others by sum.

    Associative, so the trainer can merge per rank, gather the merged dicts, and merge again.
    """
    total: dict[str, Tensor] = {}
    for part in parts:
        for key, value in part.items():
            value = value.detach().float()
            if key not in total:
                total[key] = value
            elif key.endswith("/max"):
                total[key] = torch.maximum(total[key], value.to(total[key].device))
            else:
                total[key] = total[key] + value.to(total[key].device)
    return total


def reduce_metrics(parts: Iterable[dict[str, Tensor]]) -> dict[str, float]:
    """Final metrics of a step from the metric dicts of its micro-batches (or merged ranks).

    After `merge_metrics`, each `X/sum`, `X/count` pair becomes the mean `X` (NaN when the count
    is 0): clip_ratio/low, clip_ratio/high, is_weight, is_over_cap (fraction of weights over the
    cap), mismatch_kl (KL(behaviour || current)), ref_kl, entropy. `X/max` stays a max.
    `loss/policy`, `loss/kl`, `tokens` and `sequences` are plain sums: the batch totals.
    """
    total = merge_metrics(parts)
    out: dict[str, float] = {}
    for key, value in total.items():
        if key.endswith("/count"):
            continue
        if key.endswith("/sum"):
            name = key.removesuffix("/sum")
            count = total[f"{name}/count"].item()
            out[name] = value.item() / count if count > 0 else math.nan
        else:
            out[key] = value.item()
    return out
