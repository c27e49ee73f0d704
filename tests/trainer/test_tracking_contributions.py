"""Contributions in W&B (rl/trainer/tracking.py, rl/trainer/receipts.py): the trainer's real receipts of two
steps, logged to a real offline W&B run, read back from its files: the per-contributor panels of each step
(samples, tokens, share so far) and the table the run ends with."""

from __future__ import annotations

import json

import helpers.train as h
import pytest
import torch
from helpers.contributions import scored_group

from rl.config import load_config
from rl.rundir import RunDir
from rl.trainer.receipts import Receipts, panel_name
from rl.trainer.tracking import TABLE_COLUMNS, Tracker
from rl.wire.protocol import ContributorStatus

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

ALICE = "ed25519:" + "a" * 64


def test_w_and_b_gets_per_contributor_panels_and_the_table(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_config(None, [f"run_dir={tmp_path}", "logging.wandb.mode=offline"])
    receipts = Receipts(RunDir(tmp_path), hub=None)
    tracker = Tracker(cfg, tmp_path)
    # step 1: alice's group (3 tokens each) trained whole, the token's half masked; step 2: alice's only
    steps = [
        ([scored_group(1, "w-a", ALICE, length=3), scored_group(2, "w-t", "token:t", length=2)],
         [True, True, True, False], [0, 0, 0, 1]),
        ([scored_group(3, "w-a", ALICE, length=3)], [True, True], [0, 0]),
    ]  # fmt: skip
    for step, (groups, trained, codes) in enumerate(steps, start=1):
        mask = torch.tensor([[1, 1, 1] if t else [0, 0, 0] for t in trained])
        tracker.log(step, {"loss": 0.5} | receipts.issue(step, groups, mask, torch.tensor(codes)))
    tracker.hub_contributors = [  # the hub's side, as the trainer last read it from /v1/status
        ContributorStatus(contributor=ALICE, counts={"submitted_groups": 3, "rejected_groups": 1,
                                                     "first_seen": 1_700_000_000.0, "last_seen": 1_700_000_060.0}),
        ContributorStatus(contributor="token:q", counts={"rejected_groups": 2, "quarantined_s": 30.0}),  # untrained
    ]  # fmt: skip
    tracker.finish(0)

    history = {row["_step"]: row for row in h.wandb_history(tmp_path)}
    a, t = panel_name(ALICE), panel_name("token:t")
    assert a == "ed25519_" + "a" * 16
    assert history[1][f"contributions/{a}/samples"] == 2 and history[1][f"contributions/{a}/tokens"] == 6
    assert history[1][f"contributions/{t}/samples"] == 1 and history[1][f"contributions/{t}/tokens"] == 2
    assert history[1][f"contributions/{a}/share"] == pytest.approx(6 / 8)
    assert f"contributions/{t}/samples" not in history[2]  # nothing of the token's trained at step 2
    assert history[2][f"contributions/{a}/share"] == pytest.approx(12 / 14)
    assert history[2][f"contributions/{t}/share"] == pytest.approx(2 / 14)  # shares move every step

    assert history[2]["contributions/table/_type"] == "table-file"  # on the last step's row, no extra step
    assert set(history) == {1, 2}
    [path] = (tmp_path / "wandb").glob(f"offline-run-*/files/{history[2]['contributions/table/path']}")
    table = json.loads(path.read_text())
    assert table["columns"] == TABLE_COLUMNS
    rows = {r[0]: dict(zip(TABLE_COLUMNS, r, strict=True)) for r in table["data"]}
    assert rows[ALICE] | {"share": 0} == {
        "contributor": ALICE,
        "trained_groups": 2,
        "trained_samples": 4,
        "trained_tokens": 12,
        "share": 0,
        "masked_samples": 0,
        "masked_tokens": 0,
        "masked_rate": 0.0,
        "submitted_groups": 3,
        "rejected_groups": 1,
        "rejected_rate": 0.25,
        "quarantined_s": 0.0,
        "first_step": 1,
        "last_step": 2,
        "versions": "3-3",
        "first_seen": "2023-11-14 22:13:20",
        "last_seen": "2023-11-14 22:14:20",
    }
    assert rows["token:t"]["masked_samples"] == 1 and rows["token:t"]["masked_tokens"] == 2
    assert rows["token:t"]["masked_rate"] == 0.5 and rows["token:t"]["share"] == pytest.approx(2 / 14)
    assert rows["token:q"]["trained_tokens"] == 0 and rows["token:q"]["quarantined_s"] == 30.0
    assert rows["token:q"]["rejected_rate"] == 1.0 and rows["token:q"]["share"] == 0.0
