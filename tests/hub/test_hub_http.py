"""The hub as a real process over real HTTP: auth, validation of hostile requests, scoring, files.

Every bad request gets a 4xx with a reason, leaves the hub's state unchanged and the
hub still serving. Workers here are plain HTTP clients sending hand-made submissions.
"""

from __future__ import annotations

import hashlib
import json

import pytest
from helpers.hub import (
    ADMIN,
    OTHER_WORKER,
    WORKER,
    LiveHub,
    live_config,
    publish_initial_policy,
    start_hub,
    write_config,
)

from rl.wire.packed import pack_ids, pack_logprobs
from rl.wire.protocol import Batch, Completion, RegisterRequest, SubmitRequest, TaskResult
from rollout_workers.client import HubClient

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hub(tmp_path_factory, tiny_model_dir):
    run_dir = tmp_path_factory.mktemp("hub-run")
    config = write_config(run_dir, tiny_model_dir)
    publish_initial_policy(run_dir, tiny_model_dir)
    proc = start_hub(config, run_dir / "hub.log")
    yield proc
    proc.stop()


def state_snapshot(hub) -> dict:
    with hub.client(ADMIN) as c:
        st = c.get("/v1/status").json()
    for key in ("uptime_s", "verifier", "rejections"):
        st.pop(key)
    for w in st["workers"]:
        w.pop("last_seen_s")
    for row in st["contributors"]:  # like `rejections`: a refusal is counted against its contributor
        row.pop("counts")
    return st


SECRETS: dict[str, str] = {}
"""worker id -> its registration secret (sent as X-Worker-Secret)."""


def register(hub, token=WORKER) -> str:
    with hub.client(token) as c:
        r = c.post("/v1/workers", json={"name": "test", "engine": "hf"})
    assert r.status_code == 200, r.text
    SECRETS[r.json()["worker_id"]] = r.json()["worker_secret"]
    return r.json()["worker_id"]


def as_worker(hub, wid, token=WORKER):
    return hub.client(token, SECRETS[wid])


def lease(hub, wid, token=WORKER, max_tasks=1) -> dict:
    with as_worker(hub, wid, token) as c:
        r = c.post("/v1/leases", json={"worker_id": wid, "policy_version": 0, "max_tasks": max_tasks})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["lease_id"] is not None, body
    return body


def completions(n=2, tokens=(5, 6, 7), logprob=-0.5) -> list[dict]:
    return [{"token_ids": list(tokens), "logprobs": [logprob] * len(tokens), "finish_reason": "stop"}] * n


def packed(ids=None, logprobs=None, n=2) -> list[dict]:
    """Packed completions (rl/wire/packed.py) of three tokens, valid unless `ids` / `logprobs` say otherwise."""
    ids = pack_ids([5, 6, 7]) if ids is None else ids
    logprobs = pack_logprobs([-0.5] * 3) if logprobs is None else logprobs
    return [{"token_ids": ids, "logprobs": logprobs, "finish_reason": "stop"}] * n


def submission(wid, lease_body, comps=None, version=0) -> dict:
    return {
        "worker_id": wid,
        "lease_id": lease_body["lease_id"],
        "policy_version": version,
        "results": [{"task_id": t["task_id"], "completions": comps or completions()} for t in lease_body["tasks"]],
    }


def test_health_and_openapi(hub):
    with hub.client(None) as c:
        assert c.get("/healthz").json() == {"ok": True}
        for path in ("/openapi.json", "/docs", "/redoc"):  # every route but /healthz needs a token
            r = c.get(path)
            assert r.status_code == 401 and r.json()["reason"] == "missing_token", path
    with hub.client(WORKER) as c:
        spec = c.get("/openapi.json").json()
    assert "/v1/rollouts" in spec["paths"] and "/v1/leases" in spec["paths"]


@pytest.mark.parametrize(
    ("token", "method", "path", "status", "reason"),
    [
        (None, "get", "/v1/status", 401, "missing_token"),
        ("nope", "get", "/v1/status", 401, "bad_token"),
        (WORKER, "post", "/v1/batches", 403, "admin_only"),
        (WORKER, "get", "/v1/ledger", 403, "admin_only"),
        (WORKER, "post", "/v1/shutdown", 403, "admin_only"),
        (WORKER, "post", "/v1/policy", 403, "admin_only"),
    ],
)
def test_auth(hub, token, method, path, status, reason):
    before = state_snapshot(hub)
    with hub.client(token) as c:
        r = getattr(c, method)(
            path, **({"json": {"version": 0, "num_groups": 1, "step": 0}} if method == "post" else {})
        )
    assert r.status_code == status and r.json()["reason"] == reason
    assert state_snapshot(hub) == before


BAD_SUBMISSIONS = {
    "token id >= vocab": (dict(comps=completions(tokens=(5, 10**6))), 422, "token_out_of_vocab"),
    "negative token id": (dict(comps=completions(tokens=(-1, 5))), 422, "token_out_of_vocab"),
    "more tokens than max_tokens": (dict(comps=completions(tokens=tuple(range(5, 15)))), 422, "bad_length"),
    "positive logprob": (dict(comps=completions(logprob=0.3)), 422, "bad_logprob"),
    "wrong group size": (dict(comps=completions(n=3)), 422, "wrong_group_size"),
    "packed: not base64": (dict(comps=packed(ids="not base64!")), 422, "bad_packed"),
    "packed: bytes not whole int32s": (dict(comps=packed(ids="AQIDBA0=")), 422, "bad_packed"),
    "packed: logprobs not whole float32s": (dict(comps=packed(logprobs="AAAAvwA=")), 422, "bad_packed"),
    "packed: token id >= vocab": (
        dict(comps=packed(ids=pack_ids([5, 10**6]), logprobs=pack_logprobs([-1, -1]))),
        422,
        "token_out_of_vocab",
    ),  # fmt: skip
    "packed: negative token id": (dict(comps=packed(ids=pack_ids([-1, 5, 6]))), 422, "token_out_of_vocab"),
    "packed: fewer logprobs than tokens": (
        dict(comps=packed(logprobs=pack_logprobs([-1.0]))),
        422,
        "logprobs_mismatch",
    ),  # fmt: skip
    "packed: NaN logprob": (
        dict(comps=packed(logprobs=pack_logprobs([-1.0, float("nan"), -1.0]))),
        422,
        "bad_logprob",
    ),  # fmt: skip
    "packed: -inf logprob": (
        dict(comps=packed(logprobs=pack_logprobs([-1.0, float("-inf"), -1.0]))),
        422,
        "bad_logprob",
    ),  # fmt: skip
    "packed: positive logprob": (dict(comps=packed(logprobs=pack_logprobs([-1.0, 0.5, -1.0]))), 422, "bad_logprob"),
    "packed: no tokens": (dict(comps=packed(ids="", logprobs="")), 422, "bad_length"),
    "packed: a number for a text": (dict(comps=packed(ids=12)), 422, "invalid_request"),
    "future version": (dict(version=7), 422, "future_version"),
}


@pytest.mark.parametrize("case", list(BAD_SUBMISSIONS))
def test_bad_submissions_are_rejected_without_side_effects(hub, case):
    kwargs, status, reason = BAD_SUBMISSIONS[case]
    wid = register(hub)
    body = lease(hub, wid)
    before = state_snapshot(hub)
    with as_worker(hub, wid) as c:
        r = c.post("/v1/rollouts", json=submission(wid, body, kwargs.get("comps"), kwargs.get("version", 0)))
    assert r.status_code == status, r.text
    assert r.json()["reason"] == reason and r.json()["detail"]
    if case.startswith("packed"):  # the detail names the field
        assert "token_ids" in r.json()["detail"] or "logprobs" in r.json()["detail"]
    assert state_snapshot(hub) == before
    with as_worker(hub, wid) as c:
        c.delete(f"/v1/workers/{wid}")


def test_nan_logprob_malformed_json_and_oversized_body(hub):
    wid = register(hub)
    body = lease(hub, wid)
    before = state_snapshot(hub)
    raw = json.dumps(submission(wid, body))
    with as_worker(hub, wid) as c:
        for bad in ("NaN", "Infinity", "-Infinity", "-1e999"):
            content = raw.replace("-0.5", bad, 1)
            r = c.post("/v1/rollouts", content=content, headers={"content-type": "application/json"})
            assert r.status_code == 422 and r.json()["reason"] == "invalid_request", bad
        r = c.post(f"/v1/workers/{wid}/heartbeat", content=b'{"policy_version":0,"tokens_per_s":1e999}',
                   headers={"content-type": "application/json"})  # fmt: skip
        assert r.status_code == 422 and r.json()["reason"] == "invalid_request"
        r = c.post("/v1/rollouts", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 422 and r.json()["reason"] == "invalid_request"
        r = c.post("/v1/rollouts", content=b"[" + b"1," * 400_000 + b"1]", headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["reason"] == "body_too_large"
        r = c.post("/v1/leases", json={"worker_id": wid, "policy_version": "x"})
        assert r.status_code == 422
    assert state_snapshot(hub) == before
    with hub.client(None) as c:
        assert c.get("/healthz").status_code == 200


HUGE = 2**64  # past SQLite's and C's integers


def test_integers_past_64_bits_are_a_4xx(hub):
    """Ints JSON allows but SQLite and C do not: in every integer field of every worker body, 4xx and no change."""
    wid = register(hub)
    body = lease(hub, wid)
    before = state_snapshot(hub)
    huge_token = submission(wid, body, completions(tokens=(5, HUGE)))
    huge_task = submission(wid, body)
    huge_task["results"][0]["task_id"] = HUGE
    with as_worker(hub, wid) as c:
        for path, payload in [
            ("/v1/rollouts", submission(wid, body, version=HUGE)),
            ("/v1/rollouts", huge_token),
            ("/v1/rollouts", huge_task),
            ("/v1/leases", {"worker_id": wid, "policy_version": HUGE}),
            (f"/v1/workers/{wid}/heartbeat", {"policy_version": HUGE}),
        ]:
            r = c.post(path, json=payload)
            assert 400 <= r.status_code < 500 and r.json()["reason"], (path, r.status_code, r.text[:200])
    with hub.client(ADMIN) as c:
        for path in (f"/v1/policy/{HUGE}", f"/v1/policy/{HUGE}/files/model.safetensors"):
            r = c.get(path)
            assert 400 <= r.status_code < 500 and r.json()["reason"], (path, r.status_code)
        r = c.post("/v1/batches", json={"num_groups": 1, "step": HUGE, "timeout_s": 0.1})
        assert 400 <= r.status_code < 500, r.text[:200]
        r = c.post("/v1/policy", json={"version": HUGE})
        assert 400 <= r.status_code < 500, r.text[:200]
    assert state_snapshot(hub) == before
    with as_worker(hub, wid) as c:
        c.delete(f"/v1/workers/{wid}")


def test_other_workers_lease_and_worker_are_off_limits(hub):
    a, b = register(hub, WORKER), register(hub, OTHER_WORKER)
    body = lease(hub, a)
    before = state_snapshot(hub)
    with as_worker(hub, b, OTHER_WORKER) as c:
        r = c.post("/v1/rollouts", json=submission(b, body))
        assert r.status_code == 403 and r.json()["reason"] == "not_your_lease"
        r = c.post("/v1/rollouts", json=submission(a, body))
        assert r.status_code == 403 and r.json()["reason"] == "not_your_worker"
        r = c.post(f"/v1/workers/{a}/heartbeat", json={"policy_version": 0})
        assert r.status_code == 403
        r = c.post("/v1/leases", json={"worker_id": "w-nonexistent", "policy_version": 0})
        assert r.status_code == 404 and r.json()["reason"] == "unknown_worker"
    assert state_snapshot(hub) == before
    for wid, tok in ((a, WORKER), (b, OTHER_WORKER)):
        with as_worker(hub, wid, tok) as c:
            c.delete(f"/v1/workers/{wid}")


def test_good_submission_is_scored_once_and_batched(hub, tiny_tokenizer):
    wid = register(hub)
    body = lease(hub, wid, max_tasks=2)
    answer_ids = tiny_tokenizer("<answer>3</answer>")["input_ids"]
    comps = [
        {"token_ids": answer_ids, "logprobs": [-0.1] * len(answer_ids), "finish_reason": "stop"},
        {"token_ids": [5, 6], "logprobs": [-1.0, -2.0], "finish_reason": "length"},
    ]
    sub = submission(wid, body, comps)
    with as_worker(hub, wid) as c:
        r = c.post("/v1/rollouts", json=sub)
        assert r.status_code == 200 and sorted(r.json()["accepted"]) == sorted(t["task_id"] for t in body["tasks"])
        again = c.post("/v1/rollouts", json=sub)  # the response was "lost": re-send
        assert again.status_code == 200 and again.json()["accepted"] == []
        assert sorted(again.json()["duplicates"]) == sorted(r.json()["accepted"])
    with hub.client(ADMIN) as c:
        batch = c.post("/v1/batches", json={"num_groups": 2, "step": 0, "timeout_s": 60}).json()
        status = c.get("/v1/status").json()
    assert batch["complete"] and len(batch["groups"]) == 2
    for group in Batch.model_validate(batch).groups:  # token ids and logprobs come packed: read them back
        assert [c.token_ids for c in group.completions] == [answer_ids, [5, 6]]
        assert group.completions[1].logprobs == [-1.0, -2.0]
        assert group.completions[1].reward == 0.0  # garbage scores 0
        assert group.policy_version == 0 and group.worker_id == wid
    assert status["submissions"] >= 1 and status["consumed"] >= 2
    with as_worker(hub, wid) as c:
        c.delete(f"/v1/workers/{wid}")


def test_batch_request_times_out_without_consuming(hub):
    with hub.client(ADMIN) as c:
        before = c.get("/v1/ledger").json()
        r = c.post("/v1/batches", json={"num_groups": 50, "step": 0, "timeout_s": 0.5})
        assert r.status_code == 200 and r.json() == {**r.json(), "groups": [], "complete": False}
        assert c.get("/v1/ledger").json() == before


def test_policy_files_with_range_and_no_traversal(hub, tiny_model_dir):
    with hub.client(WORKER) as c:
        manifest = c.get("/v1/policy").json()
        assert manifest["version"] == 0 and manifest["base_files"]
        weights = manifest["files"][0]
        full = c.get(f"/v1/policy/0/files/{weights['name']}").content
        assert hashlib.sha256(full).hexdigest() == weights["sha256"] and len(full) == weights["size"]
        part = c.get(f"/v1/policy/0/files/{weights['name']}", headers={"Range": "bytes=100-"})
        assert part.status_code == 206 and part.content == full[100:]
        base = {f["name"] for f in manifest["base_files"]}
        assert "config.json" in base and "tokenizer.json" in base
        assert c.get("/v1/policy/base/files/config.json").status_code == 200
        bad_paths = (
            "/v1/policy/0/files/..%2F..%2Fconfig.yaml",
            "/v1/policy/0/files/manifest.json",
            "/v1/policy/9/files/model.safetensors",
            "/v1/policy/base/files/..%2Fv0%2Fmodel.safetensors",
        )
        for bad in bad_paths:
            assert c.get(bad).status_code == 404, bad


def test_hub_survives_and_still_serves(hub):
    assert hub.proc.poll() is None
    with hub.client(None) as c:
        assert c.get("/healthz").status_code == 200


def test_status_lists_a_page_of_workers(hub):
    """`?offset=&limit=` page the worker list (thousands of workers); bad values are a 422, not a 5xx."""
    with hub.client(ADMIN) as c:
        full = c.get("/v1/status").json()
        none = c.get("/v1/status", params={"limit": 0}).json()
        assert none["workers"] == [] and none["worker_summary"]["total"] == full["worker_summary"]["total"] > 0
        assert c.get("/v1/status", params={"limit": -1}).status_code == 422
        assert c.get("/v1/status", params={"offset": "x"}).json()["reason"] == "invalid_request"
        assert c.get("/v1/status", params={"offset": 2**63}).status_code == 422  # past a C index: no 500


def test_lease_long_poll_answers_when_work_appears(tmp_path, tiny_model_dir):
    """`wait_s` holds an empty lease until work appears: tasks re-queued by a leaving worker, a new policy."""
    import threading
    import time

    config = write_config(tmp_path, tiny_model_dir, **{"async": {"max_staleness": 0}})
    publish_initial_policy(tmp_path, tiny_model_dir)
    proc = start_hub(config, tmp_path / "hub.log")
    try:
        a, b = register(proc), register(proc)
        held = lease(proc, a, max_tasks=64)  # the whole staleness window (prompts_per_step tasks)
        ask = {"worker_id": b, "policy_version": 0, "max_tasks": 64}

        def long_poll(wait_s: float) -> tuple[dict, float]:
            start = time.monotonic()
            with as_worker(proc, b) as c:
                r = c.post("/v1/leases", json={**ask, "wait_s": wait_s}, timeout=60)
            assert r.status_code == 200, r.text
            return r.json(), time.monotonic() - start

        empty, waited = long_poll(1.0)
        assert empty["lease_id"] is None and empty["retry_after_s"] == 0.0 and waited >= 1.0

        answers: list = []
        poller = threading.Thread(target=lambda: answers.append(long_poll(30.0)))
        poller.start()
        time.sleep(0.5)
        with as_worker(proc, a) as c:
            assert c.delete(f"/v1/workers/{a}").status_code == 200
        poller.join(timeout=40)
        got, waited = answers[0]
        assert got["lease_id"] is not None and waited < 30.0  # woken, not timed out
        assert sorted(t["task_id"] for t in got["tasks"]) == sorted(t["task_id"] for t in held["tasks"])

        # Window full again; a new policy version tells the long-polling worker to update at once.
        poller = threading.Thread(target=lambda: answers.append(long_poll(30.0)))
        poller.start()
        time.sleep(0.5)
        publish_initial_policy(tmp_path, tiny_model_dir, version=1)
        with proc.client(ADMIN) as c:
            assert c.post("/v1/policy", json={"version": 1}).status_code == 200
        poller.join(timeout=40)
        got, waited = answers[1]
        assert got["lease_id"] is None and got["min_policy_version"] == 1 and waited < 30.0
        with as_worker(proc, b) as c:
            r = c.post("/v1/leases", json={**ask, "wait_s": 31})
        assert r.status_code == 422 and r.json()["reason"] == "invalid_request"
    finally:
        proc.stop()


# --------------------------------------------------------------------------- in-process hub (LiveHub)


def live_hub(run_dir, model_dir) -> LiveHub:
    publish_initial_policy(run_dir, model_dir)
    return LiveHub(live_config(run_dir, model_dir))


def test_correct_completion_earns_reward_in_the_trainers_batch(tmp_path, tiny_model_dir, tiny_tokenizer):
    """A known-correct answer's token ids, submitted like a worker, reach the trainer's batch with reward 1;
    a wrong answer in the same group gets 0, so the group carries a learning signal."""
    from rl.hub.data import PromptSet, load_rows
    from rl.trainer.batch import build_batch

    with live_hub(tmp_path, tiny_model_dir) as live, live.admin() as trainer:
        cfg = live.cfg
        rows, _ = load_rows(cfg.data)  # the data as the trainer side knows it, rebuilt independently
        prompts = PromptSet.build(rows, cfg.data, tiny_tokenizer)
        answer_of = {tuple(ids): row["answer"] for ids, row in zip(prompts.prompt_ids, prompts.rows, strict=True)}
        with HubClient(live.url, WORKER) as worker:
            worker.register(RegisterRequest(name="oracle"))
            lease_ = worker.lease(policy_version=0, max_tasks=2)
            results, expected = [], {}
            for task in lease_.tasks:
                answer = answer_of[tuple(task.prompt_token_ids)]
                right = tiny_tokenizer(f"<answer>{answer}</answer>")["input_ids"]
                wrong = tiny_tokenizer(f"<answer>{int(answer) + 1}</answer>")["input_ids"]
                comps = [Completion(token_ids=ids, logprobs=[-0.5] * len(ids)) for ids in (right, wrong)]
                results.append(TaskResult(task_id=task.task_id, completions=comps))
                expected[task.task_id] = (right, wrong)
            answer = worker.submit(
                SubmitRequest(worker_id=worker.worker_id, lease_id=lease_.lease_id, policy_version=0, results=results)
            )
        assert sorted(answer.accepted) == sorted(expected)
        batch = trainer.pull(2, step=0, timeout_s=60)
    assert batch.complete
    for group in batch.groups:
        assert [c.token_ids for c in group.completions] == list(expected[group.task_id])
        right, wrong = group.completions
        assert right.reward > 0 and right.components["reasoning_gym"] == 1.0
        assert wrong.reward == 0.0
    train = build_batch(batch.groups, tiny_tokenizer.pad_token_id)
    assert train.rewards.tolist() == [c.reward for g in batch.groups for c in g.completions]
    assert train.rewards.tolist()[0::2] == [1.0, 1.0] and train.rewards.tolist()[1::2] == [0.0, 0.0]


def test_scoring_that_keeps_failing_is_retried_then_dropped_and_reported(tmp_path, tiny_model_dir, caplog):
    """Verifier processes that cannot start: each task is tried MAX_SCORING_ATTEMPTS times with backoff, then
    dropped and counted, with the error in /v1/status and the log; the hub keeps leasing new work."""
    from rich.console import Console

    from rl.cli.status_view import render
    from rl.config import RewardTerm
    from rl.hub.state import MAX_SCORING_ATTEMPTS
    from verifiers.pool import VerifierPool

    with live_hub(tmp_path, tiny_model_dir) as live:
        live.hub.pool.close()
        # A real pool whose worker processes die at start-up (address space capped below what Python needs).
        live.hub.pool = VerifierPool([RewardTerm(name="math")], workers=1, worker_memory_mb=40)
        live.state.scoring_retry_s = 0.05
        with HubClient(live.url, WORKER) as worker:
            worker.register(RegisterRequest(name="w"))
            lease_ = worker.lease(policy_version=0, max_tasks=2)
            two = [Completion(token_ids=[5, 6], logprobs=[-1.0, -1.0])] * 2
            results = [TaskResult(task_id=t.task_id, completions=two) for t in lease_.tasks]
            worker.submit(
                SubmitRequest(worker_id=worker.worker_id, lease_id=lease_.lease_id, policy_version=0, results=results)
            )
            live.wait_for(lambda: live.status().scoring_dropped == 2, timeout=120, what="both tasks dropped")
            status = live.status()
            assert status.scoring_failures == 2 * MAX_SCORING_ATTEMPTS and status.scoring == 0 and status.buffered == 0
            assert "verifier worker failed to start" in status.last_scoring_error
            console = Console(width=200, record=True)
            console.print(render(status))  # `rl status` shows it too
            shown = console.export_text()
            assert "scoring failures / dropped" in shown and "failed to start" in shown
            with live.admin() as admin:
                ledger = admin.ledger()
            dropped = {t.task_id for t in lease_.tasks}
            assert not dropped & set(ledger.pending) and ledger.consumed == 0
            again = worker.lease(policy_version=0, max_tasks=2)  # their room in the window is free again
            assert again.lease_id is not None and not dropped & {t.task_id for t in again.tasks}
    dropped_logs = [r for r in caplog.records if r.levelname == "ERROR" and "dropped" in r.getMessage()]
    assert len(dropped_logs) == 2


def test_accepted_connections_have_nodelay():
    """Each response is written as headers then body: without TCP_NODELAY on the connections uvicorn accepts
    from the hub's socket, each waits ~40 ms for the client's delayed ACK (44 ms per request instead of ~2 ms)."""
    import socket

    from rl.hub.listen import listening_socket

    server = listening_socket("127.0.0.1", 0)
    server.listen()
    with socket.create_connection(server.getsockname()) as _, server:
        accepted, _ = server.accept()
        with accepted:
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
