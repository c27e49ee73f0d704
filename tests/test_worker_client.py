"""HubClient against a stub hub over real loopback HTTP: retries, 4xx reasons, re-registration."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from test_worker_helpers import TOKEN, StubHub, free_port, make_policy_store, serve  # noqa: E402

from rl.protocol import HeartbeatRequest, RegisterRequest, SubmitRequest, TaskResult  # noqa: E402
from rollout_workers.client import AuthError, HubClient, HubError, HubUnavailable, UnknownWorker  # noqa: E402


@pytest.fixture(scope="module")
def policy_dir(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("policy")
    make_policy_store(tiny_model_dir, out)
    return out


@pytest.fixture
def hub(policy_dir):
    stub = StubHub(policy_dir, prompts=[[1, 2, 3]] * 4)
    with serve(stub.app) as url:
        stub.url = url
        yield stub


def client(url: str, token: str = TOKEN, **kw) -> HubClient:
    kw.setdefault("max_backoff_s", 0.2)
    return HubClient(url, token, **kw)


def test_register_retries_5xx(hub):
    hub.fail_5xx = 2
    with client(hub.url) as c:
        reg = c.register(RegisterRequest(name="a"))
    assert reg.worker_id == "w0" and reg.policy_version == 0
    assert [p for _, p, _ in hub.requests].count("/v1/workers") == 3


def test_bad_token_is_auth_error_without_retry(hub):
    with client(hub.url, token="nope") as c, pytest.raises(AuthError) as e:
        c.register(RegisterRequest())
    assert e.value.status == 401 and e.value.reason == "bad_token"
    assert len(hub.requests) == 1


def test_4xx_carries_hub_reason(hub):
    with client(hub.url) as c:
        c.register(RegisterRequest())
        lease = c.lease(policy_version=0, max_tasks=1)
        hub.reject_submits = 1
        request = SubmitRequest(
            worker_id=c.worker_id,
            lease_id=lease.lease_id,
            policy_version=0,
            results=[TaskResult(task_id=lease.tasks[0].task_id, completions=[])],
        )
        with pytest.raises(HubError) as e:
            c.submit(request)
    assert e.value.status == 409 and e.value.reason == "lease_expired"


def test_unknown_worker_reregisters_and_repeats(hub):
    with client(hub.url) as c:
        c.register(RegisterRequest(name="x"))
        hub.forget_workers()
        answer = c.heartbeat(HeartbeatRequest(policy_version=0))
        assert answer.policy_version == 0
        assert c.worker_id == "w1" and c.registrations == 2
        assert hub.heartbeats[-1][0] == "w1"
        hub.forget_workers()
        lease = c.lease(policy_version=0, max_tasks=2)
        assert lease.lease_id.endswith("-w2") and len(lease.tasks) == 2
        # A submission for a lease of the forgotten id cannot be repeated: re-register, then raise.
        hub.forget_workers()
        request = SubmitRequest(
            worker_id="w2", lease_id=lease.lease_id, policy_version=0, results=[TaskResult(task_id=0, completions=[])]
        )
        with pytest.raises(UnknownWorker):
            c.submit(request)
        assert c.worker_id == "w3"
    assert [r.name for r in hub.registrations] == ["x"] * 4


def test_concurrent_unknown_worker_registers_once(hub):
    """Heartbeat thread and main loop both hit the forgetful hub: one re-registration, not one each.

    The stub hands out ids by count, so after a restart the new id can equal the old one; the
    client must still not register twice (this raced in CI).
    """
    with client(hub.url) as c:
        c.register(RegisterRequest(name="x"))
        hub.forget_workers()
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
    assert len(hub.registrations) == 2 and c.registrations == 2
    assert {wid for wid, _ in hub.heartbeats[-6:]} == {c.worker_id}


def test_survives_hub_restart(policy_dir):
    """Connection refused until the hub comes up: the call waits and then succeeds."""
    port = free_port()
    result: dict = {}

    def call() -> None:
        with client(f"http://127.0.0.1:{port}") as c:
            result["reg"] = c.register(RegisterRequest())

    thread = threading.Thread(target=call)
    thread.start()
    time.sleep(1.0)
    assert thread.is_alive()
    with serve(StubHub(policy_dir).app, port=port):
        thread.join(timeout=20)
    assert result["reg"].worker_id == "w0"


def test_gives_up_after_max_retry_and_on_stop():
    url = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with client(url, max_retry_s=0.5) as c, pytest.raises(HubUnavailable):
        c.policy()
    assert time.monotonic() - start < 5
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    start = time.monotonic()
    with client(url, stop_event=stop, max_backoff_s=5.0) as c, pytest.raises(HubUnavailable):
        c.policy()
    assert time.monotonic() - start < 3


def test_leave(hub):
    with client(hub.url) as c:
        assert not c.leave()  # not registered: nothing to do
        c.register(RegisterRequest())
        assert c.leave()
    assert hub.left == ["w0"]
