"""The worker under test and what the hub saw of it: shared by tests/test_worker*.py.

A worker runs either in a thread (`start_worker`, HF engine by default: fast) or as the real
`rl rollout` process (`rollout_cli`); the hub is a `LiveHub`, whose `FaultProxy` records every
exchange, so these helpers read what the worker sent and what the real hub answered.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

from helpers.hub import WORKER, LiveHub, live_config
from helpers.policy import hf_logprobs, make_policy_store
from rl.wire.protocol import Lease, SubmitRequest
from rollout_workers.engines import EngineSpec
from rollout_workers.worker import run_worker

REPO = Path(__file__).resolve().parents[2]


def live_hub(run_dir: Path, model_dir: Path, **sections) -> LiveHub:
    make_policy_store(model_dir, run_dir / "policy")
    return LiveHub(live_config(run_dir, model_dir, **sections))


def start_worker(url: str, tmp_path: Path, **kw) -> tuple[threading.Thread, dict]:
    """run_worker (HF engine) in a thread; the exit code lands in result["rc"]."""
    result: dict = {}
    kw = {"spec": EngineSpec(kind="hf"), "cache_dir": tmp_path / "cache", "name": "t", **kw}

    def target() -> None:
        result["rc"] = run_worker(url, WORKER, **kw)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, result


def accepted(hub: LiveHub, *, raw: bool = False) -> list[SubmitRequest]:
    """The submissions the hub accepted, in order; token ids and logprobs as lists unless `raw` (as sent:
    packed texts from a worker that negotiated the packed wire, rl/wire/packed.py)."""
    sent = [SubmitRequest.model_validate_json(e.request) for e in hub.proxy.calls("POST", "/v1/rollouts", status=200)]
    return sent if raw else [as_lists(s) for s in sent]


def as_lists(request: SubmitRequest) -> SubmitRequest:
    from rl.wire.packed import as_ids, as_logprobs
    from rl.wire.protocol import Completion, TaskResult

    results = [TaskResult(task_id=r.task_id, completions=[
        Completion(token_ids=as_ids(c.token_ids).tolist(), logprobs=as_logprobs(c.logprobs).tolist(),
                   finish_reason=c.finish_reason) for c in r.completions]) for r in request.results]  # fmt: skip
    return request.model_copy(update={"results": results})


def leased_prompts(hub: LiveHub) -> dict[int, list[int]]:
    leases = [Lease.model_validate_json(e.response) for e in hub.proxy.calls("POST", "/v1/leases", status=200)]
    return {t.task_id: t.prompt_token_ids for lease in leases for t in lease.tasks}


def check_logprobs(model_dir: Path, state: dict | None, hub: LiveHub, submissions) -> None:
    prompt_of = leased_prompts(hub)
    for sub in submissions:
        result = sub.results[0]
        c = result.completions[0]
        ref = hf_logprobs(model_dir, state, prompt_of[result.task_id], c.token_ids)
        assert max(abs(a - b) for a, b in zip(ref, c.logprobs, strict=True)) < 1e-3


def rollout_cli(url: str, tmp_path: Path, *args: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "SCATTER_RL_CACHE": str(tmp_path / "cache"),
        "PYTHONPATH": str(REPO),
    }
    cmd = [sys.executable, "-m", "rl.cli", "rollout", "--hub", url, "--token", WORKER, *args]
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
