"""Provenance statistics from the training forward (rl/trainer/verify.py) against the two-forward path.

Two trainers with the same tiny model, config and batches, one with `trust.shared_forward` on and one
off, must reach the same verdicts, masks, rewards, trust metrics and training step (loss, gradient norm,
weights), on a batch with a forged and a best-of-N sequence (so the loss's token count changes after the
backwards: the gradient scale at the step), then on a batch mixing groups of a kept older version
(checked in a forward of their own under its weights) with groups of the current one.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers.seeded import seeded_completion

from rl.config import load_config
from rl.sampling import completion_seeds
from rl.trainer.batch import build_batch
from rl.wire.protocol import ScoredGroup

EXACT = ("trust/masked_sequences", "trust/draws_checked_fraction", "advantage/zero_variance_groups", "tokens")


def make_group(model, t: int, version: int, *, forged: bool = False, pick: bool = False) -> ScoredGroup:
    prompt, seeds = [1, 40 + t, 50 + t, 60 + t], completion_seeds(13, t, 4)
    comps = [seeded_completion(model, prompt, s, float(j % 2)) for j, s in enumerate(seeds)]
    if pick:  # a best-of-N pick: drawn under a seed the worker chose, submitted with a high reward
        comps[0] = seeded_completion(model, prompt, seeds[0] + 999, 1.0)
    if forged:
        comps[1] = comps[1].model_copy(update={"logprobs": [-25.0] * len(comps[1].token_ids)})
    return ScoredGroup(task_id=t, row_index=t, prompt_token_ids=prompt, policy_version=version, worker_id=f"w{t}",
                       worker_name="test", completions=comps, seeds=seeds)  # fmt: skip


def assert_same(a: tuple, b: tuple) -> None:
    (batch_a, m_a), (batch_b, m_b) = a, b
    assert torch.equal(batch_a.completion_mask, batch_b.completion_mask)
    assert torch.equal(batch_a.rewards, batch_b.rewards)
    for key in set(m_a) | set(m_b):
        if key.startswith("perf/"):
            continue
        x, y = m_a[key], m_b[key]
        if key in EXACT or key.startswith("trust/rejected/") or key.startswith("trust/worker/"):
            assert x == y, (key, x, y)
        elif not (math.isnan(x) and math.isnan(y)):
            assert x == pytest.approx(y, rel=1e-4, abs=1e-6), (key, x, y)


def weights(trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.strategy.gather_state_dict().items()}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], steps: int) -> None:
    """Equal to rounding (1e-3: 2% of an update at lr 0.05), except where AdamW amplifies it: the shared path
    scales the gradients at the step where the other divides the losses, so they round apart, and an element
    whose gradient cancels to near Adam's eps gets an update of lr * g / (|g| + eps), which that rounding moves
    by up to a whole update (lr) per step. Such elements are rare: at most one in 10,000 of a tensor (seen: 1 of
    29,312 under ZeRO-3 after two steps), each within `steps` updates.
    The scale itself is checked by the equal pre-clip gradient norms (`grad_norm` in the metrics)."""
    lr = 0.05
    for name, value in a.items():
        diff = (value - b[name]).abs()
        apart = int((diff > 1e-3 + 1e-3 * b[name].abs()).sum())
        assert apart <= max(1, value.numel() // 10_000), (name, apart, value.numel(), float(diff.max()))
        assert float(diff.max()) <= steps * lr, (name, float(diff.max()))


@pytest.mark.parametrize("stage", [0, pytest.param(2, marks=pytest.mark.slow), pytest.param(3, marks=pytest.mark.slow)])
def test_shared_forward_matches_the_two_forward_path(tmp_path, tiny_model_dir, stage):
    from transformers import AutoModelForCausalLM

    from rl.trainer.loop import Trainer
    from rl.trainer.verify import StepChecks

    trainers = {}
    for shared in (True, False):
        cfg = load_config(None, [f"model.name={tiny_model_dir}", f"run_dir={tmp_path / str(shared)}",
                                 "logging.wandb.mode=disabled", "sampling.n=4", "trainer.prompts_per_step=4",
                                 "trainer.micro_batch_size=8", "trainer.threads=1", "sampling.max_tokens=12",
                                 "trainer.lr=0.05", "trainer.warmup_steps=0", f"trainer.zero_stage={stage}",
                                 f"trust.shared_forward={shared}"])  # fmt: skip
        trainers[shared] = Trainer(cfg, hub=None)
    calls = {True: 0, False: 0}
    for shared, trainer in trainers.items():
        forward = trainer.strategy.token_statistics

        def counted(*args, shared=shared, forward=forward, **kw):
            calls[shared] += 1
            return forward(*args, **kw)

        trainer.strategy.token_statistics = counted
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()  # version 0's weights

    first = [make_group(model, 0, 0), make_group(model, 1, 0, forged=True), make_group(model, 2, 0, pick=True),
             make_group(model, 3, 0)]  # fmt: skip
    assert StepChecks.can_share(trainers[True].cfg, trainers[True].strategy, 4)
    out = {s: t.check_and_train(build_batch(first, t.pad_id), first) for s, t in trainers.items()}
    assert calls == {True: 0, False: 1}  # the shared path ran no forward of its own
    assert out[True][1]["trust/masked_sequences"] >= 2  # the forgery and the pick (+ special tokens, if drawn)
    assert_same(out[True], out[False])
    after = {s: weights(t) for s, t in trainers.items()}
    assert_same_weights(after[True], after[False], steps=1)

    # Step 1: groups of version 0 (kept under ZeRO <= 2: their own forward under version 0's weights) and 1.
    current = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    current.load_state_dict(after[False], strict=False)
    later = [make_group(model, 4, 0, pick=True), make_group(current, 5, 1, pick=True), make_group(model, 6, 0),
             make_group(current, 7, 1, forged=True)]  # fmt: skip
    for t in trainers.values():
        t.step = 1
    out = {s: t.check_and_train(build_batch(later, t.pad_id), later) for s, t in trainers.items()}
    kept = stage < 3
    assert calls == {True: int(kept), False: 1 + (2 if kept else 1)}  # kept: a pass per version
    assert out[True][1]["trust/draws_checked_fraction"] == (1.0 if kept else 0.5)
    assert_same(out[True], out[False])
    after = {s: weights(t) for s, t in trainers.items()}
    assert_same_weights(after[True], after[False], steps=2)
