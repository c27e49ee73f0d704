"""Scored groups from the hub -> padded training tensors; the metrics of a batch and of an evaluation.

A sequence is prompt + completion, right-padded to the longest in the batch.
`completion_mask[b, t]` is 1 where token t of row b is a completion token, so
log-probs at those positions (`strategy.token_logprobs`) line up with the
behaviour log-probs the worker sent; padding and prompt positions never count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from rl.sampling import uniforms
from rl.wire.protocol import EvalJob, ScoredGroup


@dataclass
class TrainBatch:
    input_ids: Tensor  # [B, L] long, right-padded
    attention_mask: Tensor  # [B, L] long
    completion_mask: Tensor  # [B, L] float, 1 on completion tokens
    behaviour_logprobs: Tensor  # [B, L] float, worker log-probs on completion positions, 0 elsewhere
    prompt_lengths: Tensor  # [B] long, prompt tokens of each row (completion starts there)
    rewards: Tensor  # [B] float, groups contiguous
    group_size: int
    task_ids: list[int]
    row_indices: list[int]
    versions: list[int]  # behaviour policy version per group
    seeds: Tensor | None = None  # [B] long, each completion's sampling seed (-1: none; rl/sampling.py)
    turn_draws: Tensor | None = None
    """[B, L, 2] long, episodes only: each model token's (seed, position in its turn); seed -1: not checked."""

    @property
    def num_sequences(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, index: Tensor | slice) -> TrainBatch:
        """The same batch restricted to some sequences (group bookkeeping stays whole)."""
        return TrainBatch(
            self.input_ids[index],
            self.attention_mask[index],
            self.completion_mask[index],
            self.behaviour_logprobs[index],
            self.prompt_lengths[index],
            self.rewards[index],
            self.group_size,
            self.task_ids,
            self.row_indices,
            self.versions,
            None if self.seeds is None else self.seeds[index],
            None if self.turn_draws is None else self.turn_draws[index],
        )

    def to(self, device: torch.device | str) -> TrainBatch:
        """The same batch with its tensors on `device` (the trainer's GPU); a no-op where they are."""
        return TrainBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.completion_mask.to(device),
            self.behaviour_logprobs.to(device),
            self.prompt_lengths.to(device),
            self.rewards.to(device),
            self.group_size,
            self.task_ids,
            self.row_indices,
            self.versions,
            None if self.seeds is None else self.seeds.to(device),
            None if self.turn_draws is None else self.turn_draws.to(device),
        )

    def rows_of_version(self, *versions: int | None) -> Tensor:
        """[B] bool: the sequences generated with one of the policy `versions`."""
        per_group = torch.tensor([v in versions for v in self.versions], dtype=torch.bool)
        return per_group.repeat_interleave(self.group_size)

    def draw_uniforms(self, rows: Tensor | None = None) -> Tensor:
        """[B, L] float64: the seeded uniform of every completion token (rl/sampling.py) of the sequences
        in `rows` ([B] bool; None: all) that have a seed, NaN elsewhere."""
        u = torch.full(self.input_ids.shape, float("nan"), dtype=torch.float64)
        if self.seeds is None:
            return u
        positions = torch.arange(self.input_ids.shape[1]).expand_as(self.input_ids) - self.prompt_lengths.cpu()[:, None]
        m = (self.completion_mask.cpu() > 0) & (self.seeds.cpu()[:, None] >= 0)
        if rows is not None:
            m &= rows.cpu()[:, None]
        seeds = self.seeds.cpu()[:, None].expand_as(self.input_ids)
        if self.turn_draws is not None:  # episodes: each turn has its own seed, positions restart per turn
            seeds, positions = self.turn_draws.cpu().unbind(-1)
            m &= seeds >= 0
        u[m] = uniforms(seeds[m], positions[m])
        return u


def build_batch(groups: list[ScoredGroup], pad_token_id: int) -> TrainBatch:
    if not groups:
        raise ValueError("empty batch")
    group_size = len(groups[0].completions)
    if any(len(g.completions) != group_size for g in groups):
        raise ValueError("groups of different sizes in one batch")
    seqs, masks, behaviour, rewards, draws = [], [], [], [], []
    episodes = any(c.turns for g in groups for c in g.completions)
    for g in groups:
        for j, c in enumerate(g.completions):
            seqs.append(g.prompt_token_ids + c.token_ids)
            if c.turns:
                mask, draw = turn_layout(c.turns, len(c.token_ids), g.policy_version)
            else:
                mask, draw = [1.0] * len(c.token_ids), []
                if episodes:  # beside episodes: one turn, the completion's own seed
                    seed = g.seeds[j] if len(g.seeds) == group_size else -1
                    draw = [(seed, i) for i in range(len(c.token_ids))]
            masks.append([0.0] * len(g.prompt_token_ids) + mask)
            draws.append([(-1, 0)] * len(g.prompt_token_ids) + draw if episodes else [])
            behaviour.append([0.0] * len(g.prompt_token_ids) + list(c.logprobs))
            rewards.append(c.reward)
    length = max(len(s) for s in seqs)
    batch = len(seqs)
    input_ids = torch.full((batch, length), pad_token_id, dtype=torch.long)
    attention = torch.zeros((batch, length), dtype=torch.long)
    cmask = torch.zeros((batch, length), dtype=torch.float32)
    blogp = torch.zeros((batch, length), dtype=torch.float32)
    turn_draws = torch.full((batch, length, 2), -1, dtype=torch.long) if episodes else None
    for i, (s, m, b) in enumerate(zip(seqs, masks, behaviour, strict=True)):
        input_ids[i, : len(s)] = torch.tensor(s)
        attention[i, : len(s)] = 1
        cmask[i, : len(m)] = torch.tensor(m)
        blogp[i, : len(b)] = torch.tensor(b)
        if turn_draws is not None and len(draws[i]) == len(s):
            turn_draws[i, : len(s)] = torch.tensor(draws[i], dtype=torch.long)
    return TrainBatch(
        input_ids,
        attention,
        cmask,
        blogp,
        torch.tensor([len(g.prompt_token_ids) for g in groups for _ in g.completions], dtype=torch.long),
        torch.tensor(rewards, dtype=torch.float32),
        group_size,
        [g.task_id for g in groups],
        [g.row_index for g in groups],
        [g.policy_version for g in groups],
        torch.tensor(
            [g.seeds[j] if len(g.seeds) == group_size else -1 for g in groups for j in range(group_size)],
            dtype=torch.long,
        ),  # fmt: skip
        turn_draws,
    )


def turn_layout(turns: list[list[int]], length: int, version: int) -> tuple[list[float], list[tuple[int, int]]]:
    """An episode's completion (`length` tokens, model turns [start, end, seed, version]) -> (mask: 1 on the
    model's tokens, 0 on observations; (seed, position in turn) per token, seed -1 where no draw is checked).

    Draws are checked on the turns generated with `version` (the group's, whose weights the trainer checks
    against); a later turn's tokens are trained and checked for log-prob mismatch, not for their draws."""
    mask = [0.0] * length
    draw = [(-1, 0)] * length
    for start, end, seed, turn_version in turns:
        for p in range(start, min(end, length)):
            mask[p] = 1.0
            draw[p] = (seed if turn_version == version else -1, p - start)
    return mask, draw


def rollout_metrics(groups: list[ScoredGroup], step: int, max_tokens: int, accuracy_term: str | None) -> dict:
    """Reward, accuracy, pass@k, lengths, truncation, staleness of one batch (W&B names)."""
    rewards = [c.reward for g in groups for c in g.completions]
    lengths = [len(c.token_ids) for g in groups for c in g.completions]
    n = len(rewards)
    mean = sum(rewards) / n
    out: dict[str, float] = {
        "reward/mean": mean,
        "reward/std": math.sqrt(sum((r - mean) ** 2 for r in rewards) / max(n - 1, 1)),
        "response_length/mean": sum(lengths) / n,
        "response_length/max": float(max(lengths)),
        "response_length/truncated_fraction": sum(c.finish_reason == "length" for g in groups for c in g.completions)
        / n,
        "staleness/mean": sum(step - g.policy_version for g in groups) / len(groups),
        "staleness/max": float(max(step - g.policy_version for g in groups)),
    }
    names = sorted({k for g in groups for c in g.completions for k in c.components})
    for name in names:
        values = [c.components.get(name, 0.0) for g in groups for c in g.completions]
        out[f"reward/{name}"] = sum(values) / n
    if accuracy_term is not None and accuracy_term in names:
        correct = [[c.components.get(accuracy_term, 0.0) >= 1.0 - 1e-6 for c in g.completions] for g in groups]
        out["accuracy"] = sum(map(sum, correct)) / n
        out[f"pass@{len(groups[0].completions)}"] = sum(any(c) for c in correct) / len(groups)
    for k in sorted({step - g.policy_version for g in groups}):
        out[f"staleness/hist_{k}"] = float(sum(step - g.policy_version == k for g in groups))
    if any(g.gen_s > 0 for g in groups):  # timings the hub recorded (a group built elsewhere has none)
        out["perf/generate_s"] = sum(g.gen_s for g in groups) / len(groups)
        out["perf/score_s"] = sum(g.score_s for g in groups) / len(groups)
    return out


def eval_metrics(jobs: list[tuple[str, EvalJob]], accuracy_term: str | None) -> dict[str, float]:
    """`eval/{prefix}reward`, `..._response_length`, `..._accuracy`, `eval/pass@n` from finished eval jobs (and
    `..._turns`, `..._tool_calls` of an environment's episodes; response_length: their model tokens)."""
    out: dict[str, float] = {}
    for prefix, job in jobs:
        if job.failed:
            out[f"eval/{prefix}scoring_failed"] = job.failed / job.total
        comps = [c for r in job.results for c in r.completions]
        if not comps:  # every task's scoring failed (the hub logged why): nothing to average
            continue
        out[f"eval/{prefix}reward"] = sum(c.reward for c in comps) / len(comps)
        out[f"eval/{prefix}response_length"] = sum(c.length for c in comps) / len(comps)
        for name in ("turns", "tool_calls"):  # an environment's episodes
            if any(name in c.components for c in comps):
                out[f"eval/{prefix}{name}"] = sum(c.components.get(name, 0.0) for c in comps) / len(comps)
        if accuracy_term is not None and any(accuracy_term in c.components for c in comps):
            ok = [[c.components.get(accuracy_term, 0.0) >= 1.0 - 1e-6 for c in r.completions] for r in job.results]
            out[f"eval/{prefix}accuracy"] = sum(map(sum, ok)) / len(comps)
            n = len(job.results[0].completions) if job.results else 1
            if n > 1:
                out[f"eval/pass@{n}"] = sum(any(x) for x in ok) / len(ok)
    return out
