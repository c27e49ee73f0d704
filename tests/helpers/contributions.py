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


def scored_group(task_id: int, worker: str, contributor: str, n: int = 2, length: int = 2):
    """A scored group of `n` completions of `length` tokens (ids start with the task id), as the hub labels it."""
    from rl.wire.protocol import ScoredCompletion, ScoredGroup

    comps = [ScoredCompletion(token_ids=[task_id] + [j + 1] * (length - 1), logprobs=[-1.0] * length,
                              finish_reason="stop", reward=0.0, components={}) for j in range(n)]  # fmt: skip
    return ScoredGroup(task_id=task_id, row_index=0, prompt_token_ids=[1], policy_version=3, worker_id=worker,
                       worker_name="w", completions=comps, contributor=contributor)  # fmt: skip


# --------------------------------------------------------------------------- a worker's calls, over HTTP


def post(c, path: str, body: dict | None = None) -> dict:
    r = c.post(path, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def register(c, key=None) -> str:
    """Register on the hub client `c` (under an identity key: signing a fresh challenge); its later calls on `c`
    carry the registration's secret. Returns the worker id."""
    from rl.wire.identity import challenge_message, public_id, sign

    body: dict = {"name": "w", "engine": "hf"}
    if key is not None:
        challenge = post(c, "/v1/challenges")["challenge"]
        body["identity"] = {"public_key": public_id(key), "challenge": challenge,
                            "signature": sign(key, challenge_message(challenge, "register"))}  # fmt: skip
    reg = post(c, "/v1/workers", body)
    c.headers["X-Worker-Secret"] = reg["worker_secret"]
    return reg["worker_id"]


def results(task_ids) -> list[dict]:
    """Valid results (two completions each, as `sampling.n: 2` asks) for `task_ids`."""
    completions = [{"token_ids": [5, 6], "logprobs": [-1.0, -2.0], "finish_reason": "length"}] * 2
    return [{"task_id": t, "completions": completions} for t in task_ids]


def lease(c, worker_id: str, max_tasks: int) -> tuple[str, list[int]]:
    got = post(c, "/v1/leases", {"worker_id": worker_id, "policy_version": 0, "max_tasks": max_tasks})
    assert got["lease_id"], got
    return got["lease_id"], [t["task_id"] for t in got["tasks"]]


def submit(c, worker_id: str, lease_id: str, task_ids):
    body = {"worker_id": worker_id, "lease_id": lease_id, "policy_version": 0, "results": results(task_ids),
            "gen_seconds": 0.5}  # fmt: skip
    return c.post("/v1/rollouts", json=body)


def generate(c, worker_id: str, max_tasks: int) -> list[int]:
    """Lease up to `max_tasks` tasks and submit them (the hub scores them); their task ids."""
    lease_id, task_ids = lease(c, worker_id, max_tasks)
    r = submit(c, worker_id, lease_id, task_ids)
    assert r.status_code == 200, r.text
    return task_ids


def wait_until(predicate, what: str, timeout: float = 120.0):
    """Poll `predicate` until it returns something true (returned); generous `timeout` for a loaded machine."""
    import time

    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(0.2)
    return value
