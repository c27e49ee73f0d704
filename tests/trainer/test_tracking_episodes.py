"""The W&B table of sample episodes (rl/trainer/tracking.py), read back from the offline W&B files."""

from __future__ import annotations

import time

import helpers.train as h
import pytest

from rl.config import load_config
from rl.trainer.tracking import EPISODE_TABLE_STEPS, Tracker
from rl.wire.protocol import ScoredCompletion, ScoredGroup

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def group(task: int, turns: int) -> ScoredGroup:
    comps = {"turns": float(turns), "tool_calls": 1.0, "tool_errors": 0.0, "tool_s": 0.25, "observation_tokens": 9.0}
    episode = ScoredCompletion.model_construct(token_ids=[1, 2], logprobs=[-0.1, 0.0], finish_reason="stop",
                                               reward=1.0, components=comps, turns=[[0, 1, 7, 0]] * turns)  # fmt: skip
    return ScoredGroup.model_construct(task_id=task, row_index=task, prompt_token_ids=[5], policy_version=0,
                                       worker_id="w", worker_name="w1", completions=[episode, episode], seeds=[1, 2],
                                       gen_s=0.0, score_s=0.0, contributor=None)  # fmt: skip


def test_episode_table_at_step_one_and_every_n_steps(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_config(None, [f"run_dir={tmp_path}", "logging.wandb.mode=offline"])
    tracker = Tracker(cfg, tmp_path)
    for step in range(1, EPISODE_TABLE_STEPS + 1):
        tracker.log(step, {"loss": 0.5})
        tracker.log_batch(step, [group(step, 2), group(100 + step, 3)])
    tracker.finish(0)
    deadline = time.monotonic() + 60  # W&B's service may still be writing its offline file after finish()
    while True:
        rows = [r for r in h.wandb_history(tmp_path) if "episodes/table/_type" in r]
        if len(rows) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert [r["_step"] for r in rows] == [1, EPISODE_TABLE_STEPS]
    assert all(r["episodes/table/nrows"] == 4 and r["episodes/table/ncols"] == 10 for r in rows), rows
