"""Leases, submissions and heartbeats answered by rl/hub/hot_routes.py say what FastAPI's routes say.

One in-process hub, two doors: the app `create_app` returns (the hot routes first) and the same FastAPI
app behind its own `Guard` with the hot routes left out. Every request below goes through both: the
same status, reason and detail for each refusal (validation errors included), the same fields for
each answer, the same rejection counts.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from helpers.hub import ADMIN, WORKER, WORKER_TOKENS, live_config, publish_initial_policy

from rl.hub.guard import Guard
from rl.hub.hot_routes import HotRoutes
from rl.wire.packed import pack_ids, pack_logprobs


@pytest.fixture(scope="module")
def doors(tmp_path_factory, tiny_model_dir):
    from rl.hub.main import build_hub
    from rl.hub.routes import create_app
    from rl.wire.tokens import Tokens

    run_dir = tmp_path_factory.mktemp("hot-routes")
    publish_initial_policy(run_dir, tiny_model_dir)
    cfg = live_config(run_dir, tiny_model_dir, sampling={"n": 2, "max_tokens": 8})
    hub = build_hub(cfg, tokens=Tokens(ADMIN, WORKER_TOKENS))
    hot = create_app(hub)
    assert isinstance(hot.app, HotRoutes)
    plain = Guard(hot.app.app, hot.tokens, hot.limit, hot.timeout_s, on_reject=hub.state.count_rejection)
    yield hub, hot, plain
    hub.pool.close()


def call(app, method: str, path: str, body=None, token: str = WORKER, secret: str | None = None,
         content_type: str = "application/json") -> tuple[int, dict]:  # fmt: skip
    headers = {"authorization": f"Bearer {token}", "content-type": content_type}
    if secret is not None:
        headers["x-worker-secret"] = secret
    content = body if isinstance(body, bytes) else json.dumps(body).encode()

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://hub") as client:
            return await client.request(method, path, content=content, headers=headers)

    r = asyncio.run(go())
    return r.status_code, r.json()


def both(doors, method, path, body=None, same_detail: bool = True, **kw) -> tuple[int, dict]:
    """The answer of both doors to the same request: the same, or (`same_detail` False: malformed bodies)
    the same status and reason with a detail worded by pydantic's JSON parser; the same rejections counted."""
    hub, hot, plain = doors
    before = dict(hub.state.rejections)
    a = call(hot, method, path, body, **kw)
    counted = {k: v - before.get(k, 0) for k, v in hub.state.rejections.items() if v != before.get(k, 0)}
    b = call(plain, method, path, body, **kw)
    if same_detail:
        assert a == b, (path, body)
    else:  # pydantic's JSON-mode wording ("Invalid JSON: ... at line 1 column 2", "a valid array")
        assert (a[0], a[1]["reason"]) == (b[0], b[1]["reason"]) and a[1]["detail"].startswith("body"), (a, b)
    assert {k: 2 * v for k, v in counted.items()} == {
        k: v - before.get(k, 0) for k, v in hub.state.rejections.items() if v != before.get(k, 0)
    }
    return a


def completion(tokens=(5, 6, 7), packed: bool = False) -> dict:
    ids, logprobs = list(tokens), [-0.5] * len(tokens)
    if packed:
        ids, logprobs = pack_ids(ids), pack_logprobs(logprobs)
    return {"token_ids": ids, "logprobs": logprobs, "finish_reason": "stop"}


def test_refusals_are_the_same_through_both_doors(doors):
    hub = doors[0]
    status, reg = call(doors[1], "POST", "/v1/workers", {"name": "t", "engine": "hf"})
    assert status == 200
    wid, secret = reg["worker_id"], reg["worker_secret"]
    lease_body = {"worker_id": wid, "policy_version": 0, "max_tasks": 1}
    submission = {"worker_id": wid, "lease_id": "nope", "policy_version": 0,
                  "results": [{"task_id": 0, "completions": [completion()] * 2}]}  # fmt: skip
    cases = [
        ("/v1/leases", b"{not json", {"same_detail": False}),
        ("/v1/leases", {}, {}),
        ("/v1/leases", {**lease_body, "max_tasks": 0, "extra": 1}, {}),
        ("/v1/leases", {**lease_body, "wait_s": 1e999}, {}),
        ("/v1/leases", lease_body, {"content_type": "text/plain", "same_detail": False}),
        ("/v1/leases", lease_body, {}),  # no secret
        ("/v1/leases", lease_body, {"secret": "wrong"}),
        ("/v1/leases", {**lease_body, "worker_id": "w-unknown"}, {"secret": secret}),
        ("/v1/leases", {**lease_body, "policy_version": 7}, {"secret": secret}),
        ("/v1/rollouts", b"[1, 2]", {"secret": secret, "same_detail": False}),
        ("/v1/rollouts", {**submission, "results": []}, {"secret": secret}),
        ("/v1/rollouts", submission, {"secret": secret}),
        ("/v1/rollouts", json.dumps(submission).replace("-0.5", "NaN", 1).encode(), {"secret": secret}),
        (
            "/v1/rollouts",
            {**submission, "results": [{"task_id": 0, "completions": [{"token_ids": 3}]}]},
            {"secret": secret, "same_detail": False},
        ),  # fmt: skip
        (f"/v1/workers/{wid}/heartbeat", {"policy_version": 0, "tokens_per_s": -1}, {"secret": secret}),
        (f"/v1/workers/{wid}/heartbeat", {"policy_version": 5}, {"secret": secret}),
        (f"/v1/workers/{wid}/heartbeat", {"policy_version": 0}, {}),
        ("/v1/workers/w-nobody/heartbeat", {"policy_version": 0}, {"secret": secret}),
    ]
    for path, body, kw in cases:
        status, answer = both(doors, "POST", path, body, **kw)
        assert 400 <= status < 500 and set(answer) == {"reason", "detail"}, (path, body, answer)
    assert hub.state.rejections["invalid_request"] >= 2 * 8
    # Answers that change nothing are the same too.
    status, beat = both(doors, "POST", f"/v1/workers/{wid}/heartbeat", {"policy_version": 0}, secret=secret)
    assert status == 200 and beat["policy_version"] == 0


@pytest.mark.parametrize("packed", [False, True])
def test_a_lease_and_its_submission_through_each_door(doors, packed):
    """A lease and its submission via the hot routes and via FastAPI: the same fields, both accepted."""
    answers = []
    for app in doors[1:]:
        offer = {"name": "t", "engine": "hf", "wire": ["packed" if packed else "json"]}
        status, reg = call(app, "POST", "/v1/workers", offer)
        wid, secret = reg["worker_id"], reg["worker_secret"]
        status, lease = call(app, "POST", "/v1/leases", {"worker_id": wid, "policy_version": 0, "max_tasks": 1},
                             secret=secret)  # fmt: skip
        assert status == 200 and lease["lease_id"] is not None, lease
        (task,) = lease["tasks"]
        results = [{"task_id": task["task_id"], "completions": [completion(packed=packed)] * 2}]
        body = {"worker_id": wid, "lease_id": lease["lease_id"], "policy_version": 0, "results": results}
        status, answer = call(app, "POST", "/v1/rollouts", body, secret=secret)
        assert status == 200 and answer == {"accepted": [task["task_id"]], "duplicates": []}, answer
        status, again = call(app, "POST", "/v1/rollouts", body, secret=secret)  # a re-sent submission
        assert status == 200 and again == {"accepted": [], "duplicates": [task["task_id"]]}, again
        answers.append(lease)
    hot_lease, plain_lease = answers
    assert set(hot_lease) == set(plain_lease)
    assert {k: v for k, v in hot_lease.items() if k not in ("lease_id", "tasks")} == {
        k: v for k, v in plain_lease.items() if k not in ("lease_id", "tasks")
    }
    assert set(hot_lease["tasks"][0]) == set(plain_lease["tasks"][0])
