"""Verifiable sampling checks for tests: what the trainer does with a completion, on an fp32 HF forward."""

from __future__ import annotations

import torch

from rl.sampling import SamplingRule, check_draws, draw, uniform, uniforms


def completion_logits(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """The logits [T, V] that predicted each of `tokens` after `prompt` (one forward of prompt + tokens)."""
    with torch.no_grad():
        return model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1]


def seeded_distances(model, prompt: list[int], tokens: list[int], seed: int, rule: SamplingRule) -> torch.Tensor:
    """How far (raw-logit nats) each token loses its seeded Gumbel race [T] (0: the exact draw)."""
    logits = completion_logits(model, prompt, tokens)
    u = uniforms(seed, torch.arange(len(tokens)))
    return check_draws(logits, torch.tensor(tokens), u, rule, tol=0.0)[1]


def is_seeded_draw(model, prompt: list[int], tokens: list[int], seed: int, rule: SamplingRule, tol: float) -> bool:
    """Whether the trainer's check accepts every token of the completion as the draw of `seed`."""
    return bool((seeded_distances(model, prompt, tokens, seed, rule) <= tol).all())


def seeded_completion(model, prompt: list[int], seed: int, reward: float = 0.0, tokens: int = 12):
    """`tokens` seeded draws of `model` at temperature 1 after `prompt` (rl/sampling.py), with true logprobs."""
    from rl.wire.protocol import ScoredCompletion

    ids, lps = list(prompt), []
    with torch.no_grad():
        for i in range(tokens):
            logits = model(torch.tensor([ids])).logits[0, -1]
            token = draw(logits, SamplingRule(1.0), uniform(seed, i))
            lps.append(float(logits.log_softmax(-1)[token]))
            ids.append(token)
    return ScoredCompletion(token_ids=ids[len(prompt) :], logprobs=lps, finish_reason="length", reward=reward,
                            components={})  # fmt: skip
