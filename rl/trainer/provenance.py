"""Provenance checks of worker samples on the trusted side: pure functions over tensors.

A worker's token ids, logprobs and claimed policy version are self-reported. The trainer
recomputes every token's logprob anyway, and from the same logits checks each sequence for:
claimed vs recomputed logprobs (`logprob_mismatch`), typicality of the sampled tokens' surprisal
(`atypical_unlikely`: injected text; `atypical_likely`: greedy decoding passed off as sampling),
tokens the configured top-k/top-p could never have produced (`outside_sampling_support`), and
chat-template tokens anywhere but a final end-of-sequence (`special_token`). A sequence failing
any check is masked out of the loss (`mask_rejected`) before the optimizer step. The tests, their
maths, thresholds and measured false-positive rates: docs/security.md.

Shapes: B sequences, L positions (prompt + completion, right-padded), V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rl.config import TrustConfig
from rl.sampling import SamplingRule, check_draws

RECOMPUTED, SURPRISAL, ENTROPY, VARIANCE, OUTSIDE, DRAW = range(6)
NUM_STATS = 6
"""Per-position statistics from `token_statistics`, indexed by the constants above."""

REASONS = ("logprob_mismatch", "special_token", "outside_sampling_support", "atypical_unlikely", "atypical_likely",
           "not_seeded_draw")  # fmt: skip
"""Why a sequence was masked, in the order they are checked (code i + 1 in `Verdicts.codes`)."""


DRAW_TOLERANCE_FP32 = 0.01
"""`trust.draw_tolerance` (raw-logit nats) when workers and trainer both compute in float32 (honest ~1e-4)."""
DRAW_TOLERANCE_MIXED = 0.75
"""Otherwise: bf16 workers against an fp32 trainer, SmolLM2-135M after simulated training (docs/security.md)."""
DRAW_TOLERANCE_ONCE_MIXED = 2.5
"""`trust.draw_tolerance_once` for bf16 workers: honest tails measured up to 2.12 nats in a real 30-step run, at the
close races of an answer's digits (docs/security.md)."""


def draw_tolerance(trust: TrustConfig, worker_dtype: str, trainer_dtype: str) -> tuple[float, float]:
    """(tolerance of every token, of one token per sequence) of the seeded-draw check: the configured ones,
    else by the two dtypes."""
    same_fp32 = worker_dtype == trainer_dtype == "float32"
    tol = trust.draw_tolerance
    if tol is None:
        tol = DRAW_TOLERANCE_FP32 if same_fp32 else DRAW_TOLERANCE_MIXED
    once = trust.draw_tolerance_once
    if once is None:
        once = tol if same_fp32 else DRAW_TOLERANCE_ONCE_MIXED
    return tol, max(tol, once)


def off_seeded_draw(distance: Tensor, tol: float, once: float) -> Tensor:
    """[B] bool: sequences not drawn from their seed: distance [B, L] (`check_draws`' distances, 0 where not
    checked). One token per sequence may lose the race by up to `once`, every other by up to `tol`."""
    return (distance.amax(-1) > once) | ((distance > tol).sum(-1) > 1)


def token_statistics(
    logits: Tensor, targets: Tensor, temperature: float, top_p: float = 1.0, top_k: int = -1, u: Tensor | None = None
) -> Tensor:
    """Per-position provenance statistics: logits [b, t, V], targets [b, t] -> [b, t, NUM_STATS] fp32.

    RECOMPUTED: log softmax(logits)[target] (temperature 1, like the workers' reported logprobs).
    SURPRISAL, ENTROPY, VARIANCE: -log q(target), H(q), Var_q(-log q) under the sampling
    distribution q (temperature, top-k, top-p); OUTSIDE: 1 where the target is outside q's
    support (its surprisal is then 0, counted by OUTSIDE instead). With temperature 0 (greedy)
    only RECOMPUTED (and DRAW) is filled. DRAW, with `u` [b, t] (each token's seeded uniform, NaN where
    there is none): how far (raw-logit nats) the target loses its seeded Gumbel race (rl/sampling.py).
    Computed one row at a time: one fp32 [t, V] temporary.
    """
    rule = SamplingRule(temperature=temperature, top_k=top_k, top_p=top_p)
    out = torch.zeros(*targets.shape, NUM_STATS, dtype=torch.float32, device=logits.device)
    for i, (row, tgt) in enumerate(zip(logits, targets, strict=True)):
        row = row.float()
        idx = tgt.unsqueeze(-1)
        logp = row.log_softmax(-1)
        out[i, :, RECOMPUTED] = logp.gather(-1, idx).squeeze(-1)
        if u is not None and (seeded := ~torch.isnan(u[i])).any():
            _, distance = check_draws(row[seeded], tgt[seeded], u[i][seeded], rule, tol=0.0)
            out[i, seeded, DRAW] = distance.float()
        if temperature <= 0:
            continue
        lq = logp if temperature == 1.0 else (row / temperature).log_softmax(-1)  # row / 1.0 is row: same values
        del logp
        if top_k > 0 or top_p < 1.0:
            lq = lq.masked_fill(~_support(lq, top_p, top_k), float("-inf")).log_softmax(-1)
        p = lq.exp()
        finite_lq = torch.where(p > 0, lq, torch.zeros_like(lq))
        p_lq = p.mul_(finite_lq)  # p is not needed apart from p * log q below
        entropy = -p_lq.sum(-1)
        second = p_lq.mul_(finite_lq).sum(-1)
        picked = lq.gather(-1, idx).squeeze(-1)
        outside = torch.isinf(picked)
        out[i, :, SURPRISAL] = torch.where(outside, torch.zeros_like(picked), -picked)
        out[i, :, ENTROPY] = torch.where(outside, torch.zeros_like(entropy), entropy)
        out[i, :, VARIANCE] = torch.where(outside, torch.zeros_like(entropy), (second - entropy**2).clamp(min=0))
        out[i, :, OUTSIDE] = outside.float()
    return out


def _support(logq: Tensor, top_p: float, top_k: int) -> Tensor:
    """Tokens top-k/top-p sampling can produce: [t, V] log-probs -> [t, V] bool (vLLM's rule:
    the smallest set of most likely tokens whose probability reaches top_p)."""
    keep = torch.ones_like(logq, dtype=torch.bool)
    if top_k > 0 and top_k < logq.shape[-1]:
        kth = logq.topk(top_k, dim=-1).values[..., -1:]
        keep &= logq >= kth
    if top_p < 1.0:
        sorted_lq, order = logq.masked_fill(~keep, float("-inf")).sort(dim=-1, descending=True)
        probs = sorted_lq.exp()
        before = probs.cumsum(-1) - probs  # mass of the strictly more likely tokens
        keep_sorted = before < top_p
        keep &= torch.zeros_like(keep).scatter(-1, order, keep_sorted)
    return keep


@dataclass
class Verdicts:
    """Per-sequence outcome of `check_sequences`; all tensors [B]."""

    codes: Tensor
    """0: accepted; i + 1: rejected for REASONS[i]."""
    abs_diff_sum: Tensor
    """Sum over completion tokens of |claimed - recomputed| logprob."""
    max_abs_diff: Tensor
    tokens: Tensor
    """Completion tokens checked."""
    z: Tensor
    """Typicality z-score (0 when the sampling temperature is 0)."""
    draw_max: Tensor
    """Largest seeded-draw distance among the sequence's tokens (raw-logit nats; 0 where no draw is checked)."""

    @property
    def accepted(self) -> Tensor:
        return self.codes == 0

    def counts(self) -> dict[str, int]:
        """Rejected sequences by reason (reasons with none left out)."""
        return {r: int((self.codes == i + 1).sum()) for i, r in enumerate(REASONS) if (self.codes == i + 1).any()}


def special_token_rows(
    input_ids: Tensor, mask: Tensor, special_ids: list[int], stop_ids: list[int], drawn: Tensor | None = None
) -> Tensor:
    """[B] bool: rows with a special token among their completion tokens, other than a stop token
    (end of sequence) in the last position of a run of completion tokens (an episode's turns each end
    with one; observation tokens after it are masked). input_ids, mask: [B, L].

    `drawn` [B, L] bool: tokens whose seeded draw is checked (`check_draws`), left out: such a token is
    the policy's own sample wherever it stands (an honest model sometimes samples a chat-template token),
    and an injected one fails its draw instead."""
    m = mask.bool()
    if drawn is not None:
        m &= ~drawn.to(m.device)
    special = torch.isin(input_ids, torch.tensor(special_ids, dtype=input_ids.dtype)) & m
    run_end = m & ~torch.cat([m[:, 1:], torch.zeros_like(m[:, :1])], dim=1)
    is_stop = torch.isin(input_ids, torch.tensor(stop_ids, dtype=input_ids.dtype)) & run_end
    return (special & ~is_stop).any(-1)


def check_sequences(
    stats: Tensor, claimed: Tensor, mask: Tensor, cfg: TrustConfig, special: Tensor | None = None
) -> Verdicts:
    """Verdict per sequence: stats [B, L, NUM_STATS] (token_statistics, aligned with the batch),
    claimed [B, L] (the worker's logprobs), mask [B, L] (1 on completion tokens), special [B] bool
    (`special_token_rows`; None: not checked)."""
    m = mask.float()
    tokens = m.sum(-1)
    diff = (claimed.float() - stats[..., RECOMPUTED]).abs() * m
    abs_sum, max_diff = diff.sum(-1), diff.max(-1).values
    excess = (stats[..., SURPRISAL] - stats[..., ENTROPY]).clamp(max=cfg.typicality_clip)
    centred = (excess * m).sum(-1)
    z = centred / torch.sqrt((stats[..., VARIANCE] * m).sum(-1) + 1.0)
    outside = (stats[..., OUTSIDE] * m).sum(-1) / tokens.clamp(min=1.0)
    tol, once = draw_tolerance(cfg, "bfloat16", "float32")  # unresolved (None) tolerances: mixed dtypes
    distance = stats[..., DRAW] * m
    off_draw = off_seeded_draw(distance, tol, once) if cfg.verify_draws else torch.zeros_like(z) > 0
    failed = [
        (abs_sum / tokens.clamp(min=1.0) > cfg.max_mean_logprob_diff) | (max_diff > cfg.max_token_logprob_diff),
        special if special is not None and cfg.mask_special_tokens else torch.zeros_like(tokens, dtype=torch.bool),
        outside > cfg.max_outside_fraction,
        z > cfg.typicality_z,
        z < -cfg.typicality_z,
        off_draw,
    ]
    codes = torch.zeros_like(tokens, dtype=torch.long)
    for i, bad in reversed(list(enumerate(failed))):  # the first failing check names the reason
        codes = torch.where(bad & (tokens > 0), torch.full_like(codes, i + 1), codes)
    return Verdicts(codes, abs_sum, max_diff, tokens, z, distance.amax(-1))


def mask_rejected(completion_mask: Tensor, rewards: Tensor, accepted: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """Mask rejected sequences out of the loss and out of their group's reward baseline.

    completion_mask [B, L], rewards [B] (groups contiguous), accepted [B] bool -> (mask, rewards).
    A rejected sequence gets mask 0 everywhere (no gradient, no tokens in the loss normaliser)
    and, for the advantage computation, the mean reward of its group's accepted sequences, so a
    forged high reward does not lower the advantages of the honest ones (a fully rejected group
    keeps its rewards; its mask is all 0 anyway).
    """
    keep = accepted.float()
    mask = completion_mask * keep.unsqueeze(1)
    r, k = rewards.view(-1, group_size), keep.view(-1, group_size)
    kept = k.sum(-1, keepdim=True)
    group_mean = (r * k).sum(-1, keepdim=True) / kept.clamp(min=1.0)
    fill = torch.where(kept > 0, group_mean.expand_as(r), r)
    return mask, torch.where(k > 0, r, fill).reshape(-1)
