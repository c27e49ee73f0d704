"""Verifiable sampling checks for tests: what the trainer does with a completion, on an fp32 HF forward."""

from __future__ import annotations

import torch

from rl.sampling import SamplingRule, check_draws, uniforms


def completion_logits(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """The logits [T, V] that predicted each of `tokens` after `prompt` (one forward of prompt + tokens)."""
    with torch.no_grad():
        return model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1]


def seeded_distances(model, prompt: list[int], tokens: list[int], seed: int, rule: SamplingRule) -> torch.Tensor:
    """How far each token's seeded uniform lies outside the token's CDF interval [T] (0: the exact draw)."""
    logits = completion_logits(model, prompt, tokens)
    u = uniforms(seed, torch.arange(len(tokens)))
    return check_draws(logits, torch.tensor(tokens), u, rule, tol=0.0)[1]


def is_seeded_draw(model, prompt: list[int], tokens: list[int], seed: int, rule: SamplingRule, tol: float) -> bool:
    """Whether the trainer's check accepts every token of the completion as the draw of `seed`."""
    return bool((seeded_distances(model, prompt, tokens, seed, rule) <= tol).all())
