"""The W&B contributions table (rl/trainer/tracking.py): written at the end of a run from receipts.jsonl, read
back from the offline W&B files."""

from __future__ import annotations

import json

import helpers.train as h
import pytest

from rl.config import load_config
from rl.trainer.tracking import Tracker

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_the_run_ends_with_a_contributions_table(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_config(None, [f"run_dir={tmp_path}", "logging.wandb.mode=offline"])
    entries = [{"contributor": "token:a", "samples": 2, "tokens": 6}, {"contributor": "ed25519:" + "b" * 64,
               "samples": 1, "tokens": 2}]  # fmt: skip
    (tmp_path / "receipts.jsonl").write_text(json.dumps({"step": 1, "entries": entries}) + "\n")
    tracker = Tracker(cfg, tmp_path)
    tracker.log(1, {"loss": 0.5})
    tracker.finish(0)
    history = h.wandb_history(tmp_path)
    assert [row["_step"] for row in history] == [1]  # on the last step's row: no extra step in the history
    rows = [row for row in history if "contributions/table/_type" in row]
    assert len(rows) == 1 and rows[0]["contributions/table/_type"] == "table-file"
    assert rows[0]["contributions/table/nrows"] == 2 and rows[0]["contributions/table/ncols"] == 5
