"""HubClient against the real hub app over loopback HTTP: retries, 4xx reasons, re-registration.

Faults come from `FaultProxy` in front of the hub (5xx, a refused port) and from restarting the
hub's state (`LiveHub.restart`: every worker id forgotten, as after a hub process restart).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from helpers.hub import WORKER, LiveHub, live_config
from helpers.net import free_port
from helpers.policy import make_policy_store

from rl.rundir import RunDir
from rl.wire.protocol import Completion, HeartbeatRequest, RegisterRequest, SubmitRequest, TaskResult
from rollout_workers.client import AuthError, HubClient, HubError, HubUnavailable, UnknownWorker


@pytest.fixture(scope="module")
def live(tiny_model_dir, tmp_path_factory):
    run_dir: Path = tmp_path_factory.mktemp("run")
    make_policy_store(tiny_model_dir, RunDir(run_dir).policy)
    with LiveHub(live_config(run_dir, tiny_model_dir)) as hub:
        yield hub


@pytest.fixture
def hub(live):
    """The module's hub with a fresh state and a clean record of requests."""
    live.restart()
    live.proxy.exchanges.clear()
    return live


def client(url: str, token: str = WORKER, **kw) -> HubClient:
    kw.setdefault("max_backoff_s", 0.2)
    return HubClient(url, token, **kw)


def registered_names(hub: LiveHub) -> list[str]:
    return [e.sent()["name"] for e in hub.proxy.calls("POST", "/v1/workers", status=200)]


def test_register_retries_5xx(hub):
    hub.proxy.fail_5xx = 2
    with client(hub.url) as c:
        reg = c.register(RegisterRequest(name="a"))
    assert reg.worker_id in hub.state.workers and reg.policy_version == 0
    assert [e.status for e in hub.proxy.calls("POST", "/v1/workers")] == [503, 503, 200]


def test_bad_token_is_auth_error_without_retry(hub):
    with client(hub.url, token="nope") as c, pytest.raises(AuthError) as e:
        c.register(RegisterRequest())
    assert e.value.status == 401 and e.value.reason == "bad_token"
    assert len(hub.proxy.exchanges) == 1


def test_4xx_carries_hub_reason(hub):
    with client(hub.url) as c:
        c.register(RegisterRequest())
        lease = c.lease(policy_version=0, max_tasks=1)
        one = [Completion(token_ids=[5, 6], logprobs=[-1.0, -1.0])]
        request = SubmitRequest(
            worker_id=c.worker_id,
            lease_id=lease.lease_id,
            policy_version=0,
            results=[TaskResult(task_id=lease.tasks[0].task_id, completions=one)],  # n=2 expected
        )
        with pytest.raises(HubError) as e:
            c.submit(request)
        assert e.value.status == 422 and e.value.reason == "wrong_group_size" and "want 2" in e.value.detail
        with pytest.raises(HubError) as e:
            c.submit(request.model_copy(update={"lease_id": "l-unknown"}))
        assert e.value.status == 409 and e.value.reason == "unknown_lease"
    assert hub.state.rejections == {"wrong_group_size": 1, "unknown_lease": 1}


def test_unknown_worker_reregisters_and_repeats(hub):
    with client(hub.url) as c:
        c.register(RegisterRequest(name="x"))
        hub.restart()
        answer = c.heartbeat(HeartbeatRequest(policy_version=0))
        assert answer.policy_version == 0
        assert c.registrations == 2 and list(hub.state.workers) == [c.worker_id]
        hub.restart()
        lease = c.lease(policy_version=0, max_tasks=2)
        assert lease.lease_id is not None and len(lease.tasks) == 2 and c.registrations == 3
        # A submission for a lease of the forgotten id cannot be repeated: re-register, then raise.
        hub.restart()
        stale_id = c.worker_id
        two = [Completion(token_ids=[5], logprobs=[-1.0])] * 2
        results = [TaskResult(task_id=t.task_id, completions=two) for t in lease.tasks]
        request = SubmitRequest(worker_id=stale_id, lease_id=lease.lease_id, policy_version=0, results=results)
        with pytest.raises(UnknownWorker):
            c.submit(request)
        assert c.registrations == 4 and c.worker_id != stale_id and list(hub.state.workers) == [c.worker_id]
    assert registered_names(hub) == ["x"] * 4


def test_concurrent_unknown_worker_registers_once(hub):
    """Heartbeat thread and main loop both hit the restarted hub: one re-registration, not one each."""
    with client(hub.url) as c:
        c.register(RegisterRequest(name="x"))
        hub.restart()
        barrier = threading.Barrier(6)
        errors: list[BaseException] = []

        def beat() -> None:
            try:
                barrier.wait()
                c.heartbeat(HeartbeatRequest(policy_version=0))
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=beat) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
    assert not errors
    assert c.registrations == 2 and len(registered_names(hub)) == 2
    assert list(hub.state.workers) == [c.worker_id]
    beats = [e for e in hub.proxy.calls("POST", f"/v1/workers/{c.worker_id}/heartbeat") if e.status == 200]
    assert len(beats) == 6


def test_survives_hub_restart(hub):
    """Connection refused until the hub comes up: the call waits and then succeeds."""
    hub.stop()
    result: dict = {}

    def call() -> None:
        with client(hub.url) as c:
            result["reg"] = c.register(RegisterRequest())

    thread = threading.Thread(target=call)
    try:
        thread.start()
        time.sleep(1.0)
        assert thread.is_alive() and not hub.proxy.exchanges
    finally:
        hub.start()
    thread.join(timeout=30)
    assert result["reg"].worker_id in hub.state.workers


def test_gives_up_after_max_retry_and_on_stop():
    """Nothing listens: `max_retry_s` ends the retries, and so does the stop event (no hang)."""
    url = f"http://127.0.0.1:{free_port()}"
    with client(url, max_retry_s=0.5) as c, pytest.raises(HubUnavailable):
        c.policy()
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    with client(url, stop_event=stop, max_backoff_s=5.0) as c, pytest.raises(HubUnavailable):
        c.policy()  # max_retry_s None: only the stop event ends this


def test_leave(hub):
    with client(hub.url) as c:
        assert not c.leave()  # not registered: nothing to do
        reg = c.register(RegisterRequest())
        c.lease(policy_version=0, max_tasks=2)
        assert c.leave()
    assert not hub.state.workers and len(hub.state.queue) == 2  # its leased tasks went back to the queue
    assert [e.status for e in hub.proxy.calls("DELETE", f"/v1/workers/{reg.worker_id}")] == [200]
