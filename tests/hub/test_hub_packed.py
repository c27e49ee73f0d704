"""Packed and JSON submissions through the real hub app reach the trainer as the same batch.

Three workers submit the same completions to three fresh hubs of one config (same tasks, same
seeds): one that negotiated the packed wire, one that asked for JSON, and an older worker that
says nothing about the wire (plain HTTP, JSON lists). The trainer's tensors must be identical.
"""

from __future__ import annotations

import httpx
import pytest
from helpers.hub import WORKER, LiveHub, live_config, publish_initial_policy

from rl.wire.protocol import WORKER_SECRET_HEADER, Completion, RegisterRequest, SubmitRequest, TaskResult
from rollout_workers.client import HubClient

pytestmark = pytest.mark.slow

# Not exact in float32: the JSON path must round them as the packed path does.
LOGPROBS = [-0.1234567891, -2.5e-7, -13.000000123, 0.0, -1e-30]


def live_hub(run_dir, model_dir) -> LiveHub:
    publish_initial_policy(run_dir, model_dir)
    return LiveHub(live_config(run_dir, model_dir))


def group_of(task) -> list[Completion]:
    """Two completions made from the task's prompt, so every hub (same tasks) gets the same ones."""
    ids = [(t * 7 + 3) % 90 + 4 for t in task.prompt_token_ids[-5:]]
    return [
        Completion(token_ids=ids, logprobs=LOGPROBS, finish_reason="length"),
        Completion(token_ids=ids[:3] + [2], logprobs=LOGPROBS[:4], finish_reason="stop"),
    ]


def submit_with_client(url: str, wire: list[str]) -> str:
    """A current worker's client offering `wire`; returns the encoding the hub chose."""
    with HubClient(url, WORKER) as worker:
        reg = worker.register(RegisterRequest(name="w", wire=wire))
        lease = worker.lease(policy_version=0, max_tasks=2)
        results = [TaskResult(task_id=t.task_id, completions=group_of(t)) for t in lease.tasks]
        request = SubmitRequest(worker_id=worker.worker_id, lease_id=lease.lease_id, policy_version=0, results=results)
        assert sorted(worker.submit(request).accepted) == sorted(t.task_id for t in lease.tasks)
    return reg.wire


def submit_as_old_worker(url: str) -> dict:
    """A worker from before the packed wire: no `wire` in its registration, JSON lists; returns the registration."""
    from rl.wire.protocol import Lease

    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {WORKER}"}, timeout=60) as http:
        reg = http.post("/v1/workers", json={"name": "old", "engine": "vllm"}).json()
        http.headers[WORKER_SECRET_HEADER] = reg["worker_secret"]
        body = {"worker_id": reg["worker_id"], "policy_version": 0, "max_tasks": 2}
        lease = Lease.model_validate(http.post("/v1/leases", json=body).json())
        results = [{"task_id": t.task_id, "completions": [c.model_dump() for c in group_of(t)]} for t in lease.tasks]
        answer = http.post("/v1/rollouts", json={"worker_id": reg["worker_id"], "lease_id": lease.lease_id,
                                                 "policy_version": 0, "results": results})  # fmt: skip
        assert answer.status_code == 200, answer.text
    return reg


def test_packed_json_and_old_workers_give_identical_batches(tmp_path, tiny_model_dir, tiny_tokenizer):
    from rl.trainer.batch import build_batch

    batches, chosen = {}, {}
    for kind in ("packed", "json", "old"):
        with live_hub(tmp_path / kind, tiny_model_dir) as live, live.admin() as trainer:
            if kind == "old":
                reg = submit_as_old_worker(live.url)
                assert "wire" not in reg  # an older worker's strict model knows no such field
            else:
                chosen[kind] = submit_with_client(live.url, ["packed", "json"] if kind == "packed" else ["json"])
            batch = trainer.pull(2, step=0, timeout_s=60)
        assert batch.complete
        batches[kind] = batch
    assert chosen == {"packed": "packed", "json": "json"}
    trained = {kind: build_batch(b.groups, tiny_tokenizer.pad_token_id) for kind, b in batches.items()}
    reference = trained["packed"]
    for kind in ("json", "old"):
        got = trained[kind]
        assert got.task_ids == reference.task_ids
        for name in (
            "input_ids",
            "attention_mask",
            "completion_mask",
            "behaviour_logprobs",
            "prompt_lengths",
            "rewards",
            "seeds",
        ):  # fmt: skip:
            assert getattr(got, name).equal(getattr(reference, name)), (kind, name)
        for g, ref in zip(batches[kind].groups, batches["packed"].groups, strict=True):
            assert g.completions == ref.completions
    first = batches["packed"].groups[0].completions[0]
    assert first.logprobs[:2] == pytest.approx(LOGPROBS[:2], rel=1e-6) and first.finish_reason == "length"
