"""One GRPO step of the real trainer (DeepSpeed on CPU, tiny model) on hand-made scored groups."""

from __future__ import annotations

import math

import pytest
import torch

from rl.config import load_config
from rl.trainer.batch import build_batch, rollout_metrics
from rl.wire.protocol import ScoredCompletion, ScoredGroup


def make_groups(n_groups=2, n=4, vocab=400, seed=0) -> list[ScoredGroup]:
    g = torch.Generator().manual_seed(seed)
    groups = []
    for t in range(n_groups):
        comps = []
        for j in range(n):
            length = int(torch.randint(2, 8, (1,), generator=g))
            ids = torch.randint(3, vocab, (length,), generator=g).tolist()
            comps.append(ScoredCompletion(token_ids=ids, logprobs=[-5.0] * length, finish_reason="stop",
                                          reward=float(j % 2), components={"reasoning_gym": float(j % 2)}))  # fmt: skip
        groups.append(ScoredGroup(task_id=t, row_index=t, prompt_token_ids=[1, 5, 6, 7][: 2 + t], policy_version=0,
                                  worker_id="w", worker_name="w", completions=comps))  # fmt: skip
    return groups


def test_build_batch_aligns_completion_positions():
    groups = make_groups()
    batch = build_batch(groups, pad_token_id=0)
    assert batch.num_sequences == 8 and batch.group_size == 4
    pairs = [(group, c) for group in groups for c in group.completions]
    for i, (g, c) in enumerate(pairs):
        p = len(g.prompt_token_ids)
        assert batch.input_ids[i, p : p + len(c.token_ids)].tolist() == c.token_ids
        assert batch.completion_mask[i].sum() == len(c.token_ids) and batch.completion_mask[i, :p].sum() == 0
        assert batch.behaviour_logprobs[i, p : p + len(c.token_ids)].tolist() == c.logprobs
    m = rollout_metrics(groups, step=1, max_tokens=8, accuracy_term="reasoning_gym")
    assert m["reward/mean"] == 0.5 and m["accuracy"] == 0.5 and m["pass@4"] == 1.0 and m["staleness/max"] == 1


@pytest.mark.slow
def test_train_step_updates_weights(tmp_path, tiny_model_dir):
    from rl.trainer.loop import Trainer

    cfg = load_config(None, [f"model.name={tiny_model_dir}", f"run_dir={tmp_path}", "logging.wandb.mode=disabled",
                             "sampling.n=4", "trainer.prompts_per_step=2", "trainer.micro_batch_size=3",
                             "trainer.lr=1e-2", "trainer.threads=1", "algorithm.num_iterations=2"])  # fmt: skip
    trainer = Trainer(cfg, hub=None)
    before = {k: v.clone() for k, v in trainer.strategy.gather_state_dict().items()}
    metrics = trainer.train_step(build_batch(make_groups(), trainer.pad_id))
    after = trainer.strategy.gather_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert math.isfinite(metrics["loss/policy"]) and metrics["grad_norm"] > 0
    assert metrics["tokens"] == sum(len(c.token_ids) for g in make_groups() for c in g.completions) * 2
    assert 0 <= metrics["is_weight"] <= cfg.algorithm.is_cap
