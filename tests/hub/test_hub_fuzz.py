"""Arbitrary wire input never makes the hub answer 5xx, and its status always stays valid (hypothesis).

A real hub process over loopback HTTP. Hypothesis draws request bodies for every worker route: well
formed ones with extreme but finite numbers, ids of other workers and leases, and arbitrary JSON. Every
answer must be 2xx or 4xx, and `/v1/status` (every aggregate the hub derives from worker input) must
stay a valid `HubStatus` after each one.
"""

from __future__ import annotations

import json

import pytest
from helpers.hub import ADMIN, WORKER, publish_initial_policy, start_hub, write_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rl.wire.protocol import HubStatus

pytestmark = pytest.mark.slow

HUGE = st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(-(2**70), 2**70), st.just(1e308))
JSON = st.recursive(
    st.none() | st.booleans() | HUGE | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
NAMES = st.text(max_size=80) | st.from_regex(r"[A-Za-z0-9._:@+-]{1,64}", fullmatch=True)


@pytest.fixture(scope="module")
def live(tmp_path_factory, tiny_model_dir):
    run_dir = tmp_path_factory.mktemp("hub-fuzz")
    proc = start_hub(write_config(run_dir, tiny_model_dir), run_dir / "hub.log")
    publish_initial_policy(run_dir, tiny_model_dir)
    with proc.client(ADMIN) as c:
        assert c.post("/v1/policy", json={"version": 0}).status_code == 200
    with proc.client(WORKER) as c:
        r = c.post("/v1/workers", json={"name": "fuzz", "engine": "hf"})
    proc.worker_id, proc.secret = r.json()["worker_id"], r.json()["worker_secret"]
    yield proc
    proc.stop()


def heartbeats():
    return st.fixed_dictionaries(
        {"policy_version": st.integers(-5, 2**40)},
        optional={"tokens_per_s": HUGE, "fetch_s": HUGE, "load_s": HUGE, "busy": st.booleans()},
    )


def submissions(worker_id: st.SearchStrategy[str]):
    completion = st.fixed_dictionaries({
        "token_ids": st.lists(st.integers(-3, 2**40), max_size=6),
        "logprobs": st.lists(HUGE, max_size=6),
    }, optional={"finish_reason": st.sampled_from(["stop", "length", "other"])})  # fmt: skip
    result = st.fixed_dictionaries({"task_id": st.integers(-1, 2**40), "completions": st.lists(completion, max_size=3)})
    return st.fixed_dictionaries({
        "worker_id": worker_id, "lease_id": st.text(max_size=20), "policy_version": st.integers(-1, 2**40),
        "results": st.lists(result, max_size=3),
    }, optional={"gen_seconds": HUGE})  # fmt: skip


def check(live, route: str, body, method: str = "post") -> None:
    with live.client(WORKER, live.secret) as c:
        r = c.request(method.upper(), route, content=json.dumps(body, allow_nan=False).encode(),
                      headers={"content-type": "application/json"})  # fmt: skip
        assert r.status_code < 500, (route, body, r.status_code, r.text)
    with live.client(ADMIN) as c:
        s = c.get("/v1/status")
        assert s.status_code == 200, s.text
        HubStatus.model_validate(s.json())


SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(body=heartbeats() | JSON)
def test_heartbeats(live, body):
    check(live, f"/v1/workers/{live.worker_id}/heartbeat", body)


@SETTINGS
@given(body=st.fixed_dictionaries({}, optional={"name": NAMES, "host": st.text(max_size=300),
                                                "engine": st.sampled_from(["vllm", "hf", "x"])}) | JSON)  # fmt: skip
def test_registrations(live, body):
    check(live, "/v1/workers", body)


@SETTINGS
@given(body=st.fixed_dictionaries({"worker_id": st.just("w") | st.text(max_size=70),
                                   "policy_version": st.integers(-1, 2**40)},
                                  optional={"max_tasks": st.integers(-1, 10**6), "wait_s": HUGE}) | JSON)  # fmt: skip
def test_leases(live, body):
    check(live, "/v1/leases", body)


@SETTINGS
@given(body=submissions(st.just("w") | st.text(max_size=70)) | JSON)
def test_submissions(live, body):
    body = {**body, "worker_id": live.worker_id} if isinstance(body, dict) and "results" in body else body
    check(live, "/v1/rollouts", body)
