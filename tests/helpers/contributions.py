"""What a run's own logs say each contributor trained, to check `rl contributions` against (tests/e2e).

`batches.jsonl` says which contributor's groups each step trained, `metrics.jsonl` how many sequences the
trainer masked per worker (`trust/worker/<name>-<worker id>/masked`), and `receipts.jsonl` what it signed.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from pathlib import Path

import helpers.train as h


def expected_trained(run_dir: Path, group_size: int, contributor_of_name: dict[str, str]) -> Counter:
    """Contributor -> sequences trained (handed to the trainer and not masked), from batches.jsonl and metrics."""
    trained: Counter = Counter()
    for record in h.read_jsonl(run_dir / "batches.jsonl"):
        for contributor in record["contributors"]:
            trained[contributor] += group_size
    for record in h.read_jsonl(run_dir / "metrics.jsonl"):
        for key, value in record.items():
            if key.startswith("trust/worker/") and key.endswith("/masked"):
                name = key.removeprefix("trust/worker/").rsplit("-w-", 1)[0]
                trained[contributor_of_name[name]] -= int(value)
    return trained


def signed_totals(run_dir: Path) -> tuple[Counter, Counter, int]:
    """(samples, tokens) per contributor over receipts.jsonl's entries, and how many steps it signed."""
    samples, tokens, steps = Counter(), Counter(), 0
    for record in h.read_jsonl(run_dir / "receipts.jsonl"):
        steps += 1
        for e in record["entries"]:
            samples[e["contributor"]] += e["samples"]
            tokens[e["contributor"]] += e["tokens"]
    return samples, tokens, steps


def kill_hub(train_pid: int) -> int:
    """SIGKILL the hub process `rl train` started (it restarts it from its database); returns its pid."""
    for p in h.descendants(train_pid):
        cmd = " ".join(p.cmdline())
        if "rl.cli hub" in cmd:
            os.kill(p.pid, signal.SIGKILL)
            return p.pid
    raise AssertionError("no hub process under rl train")
