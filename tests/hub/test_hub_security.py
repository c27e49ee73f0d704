"""Hub hardening against untrusted workers, over real HTTP (docs/security.md).

Non-finite numbers, per-registration secrets, per-token views and caps, lease caps,
authentication before the body is read, bounded and timed bodies, odd policy URLs, version
claims. Each refusal is a 4xx `{reason, detail}` and the hub keeps serving.
"""

from __future__ import annotations

import http.server
import threading
import time

import pytest
from helpers.hub import ADMIN, OTHER_WORKER, WORKER, publish_initial_policy, start_hub, write_config

from rl.config import load_config
from rl.wire.admin import HubAdmin
from rl.wire.protocol import HubStatus

pytestmark = pytest.mark.slow

HUB = {
    "max_workers_per_token": 3,
    "max_tasks_per_lease": 2,
    "max_leased_per_worker": 3,
    "body_timeout_s": 1.0,
    "fair_share": False,
}  # the per-worker caps alone (fair shares: tests/hub/test_hub_operators.py)


@pytest.fixture(scope="module")
def hub(tmp_path_factory, tiny_model_dir):
    """A hub with no policy published yet (the first tests), published later by `published`."""
    run_dir = tmp_path_factory.mktemp("hub-sec")
    config = write_config(run_dir, tiny_model_dir, hub=HUB)
    proc = start_hub(config, run_dir / "hub.log")
    proc.run_dir, proc.model_dir = run_dir, tiny_model_dir
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def published(hub):
    publish_initial_policy(hub.run_dir, hub.model_dir)
    with hub.client(ADMIN) as c:
        assert c.post("/v1/policy", json={"version": 0}).status_code == 200
    return hub


def register(hub, token=WORKER) -> tuple[str, str]:
    with hub.client(token) as c:
        r = c.post("/v1/workers", json={"name": "sec", "engine": "hf"})
    assert r.status_code == 200, r.text
    return r.json()["worker_id"], r.json()["worker_secret"]


def leave(hub, wid, secret, token=WORKER) -> None:
    with hub.client(token, secret) as c:
        assert c.delete(f"/v1/workers/{wid}").status_code == 200


def test_no_policy_yet_is_a_4xx(hub):
    with hub.client(WORKER) as c:
        r = c.get("/v1/policy")
        assert r.status_code == 409 and r.json()["reason"] == "no_policy"
        r = c.get("/v1/policy/base/files/config.json")
        assert r.status_code == 404 and r.json()["reason"] == "unknown_version"


def test_odd_policy_versions_are_404(published):
    with published.client(WORKER) as c:
        for version in ("²", "٣", "1" * 300, "-1", "0x1", " 0"):
            r = c.get(f"/v1/policy/{version}/files/model.safetensors")
            assert r.status_code == 404 and r.json()["reason"] == "unknown_version", version


def test_non_finite_heartbeat_is_refused_and_status_stays_valid(published):
    wid, secret = register(published)
    with published.client(WORKER, secret) as c:
        for raw in (b'{"policy_version":0,"tokens_per_s":1e999}', b'{"policy_version":0,"tokens_per_s":NaN}',
                    b'{"policy_version":0,"tokens_per_s":Infinity}'):  # fmt: skip
            r = c.post(f"/v1/workers/{wid}/heartbeat", content=raw, headers={"content-type": "application/json"})
            assert r.status_code == 422 and r.json()["reason"] == "invalid_request", raw
        r = c.post(f"/v1/workers/{wid}/heartbeat", json={"policy_version": 5})  # never published
        assert r.status_code == 409 and r.json()["reason"] == "future_version"
    with HubAdmin(published.url, ADMIN) as admin:
        assert isinstance(admin.status(), HubStatus)  # validates: every number finite
    leave(published, wid, secret)


def test_each_registration_has_its_own_secret(published):
    a, secret_a = register(published)
    b, secret_b = register(published)  # same token
    assert secret_a != secret_b
    with published.client(WORKER) as c:  # the token alone is not enough
        r = c.post(f"/v1/workers/{a}/heartbeat", json={"policy_version": 0})
        assert r.status_code == 403 and r.json()["reason"] == "bad_worker_secret"
    with published.client(WORKER, secret_b) as c:  # b's secret cannot act for a
        for method, path, body in (
            ("post", f"/v1/workers/{a}/heartbeat", {"policy_version": 0}),
            ("post", "/v1/leases", {"worker_id": a, "policy_version": 0}),
            ("post", "/v1/rollouts", {"worker_id": a, "lease_id": "l-x", "policy_version": 0,
                                      "results": [{"task_id": 0, "completions": []}]}),
            ("delete", f"/v1/workers/{a}", None),
        ):  # fmt: skip
            r = c.request(method.upper(), path, json=body)
            assert r.status_code == 403 and r.json()["reason"] == "bad_worker_secret", path
        assert c.post(f"/v1/workers/{b}/heartbeat", json={"policy_version": 0}).status_code == 200
    leave(published, a, secret_a)
    leave(published, b, secret_b)


def test_worker_status_shows_only_its_own_token(published):
    a, secret_a = register(published, WORKER)
    b, secret_b = register(published, OTHER_WORKER)
    with published.client(OTHER_WORKER) as c:
        st = c.get("/v1/status").json()
    assert [w["worker_id"] for w in st["workers"]] == [b] and st["workers_total"] == 2
    with published.client(ADMIN) as c:
        assert {w["worker_id"] for w in c.get("/v1/status").json()["workers"]} == {a, b}
    leave(published, a, secret_a)
    leave(published, b, secret_b, OTHER_WORKER)


def test_register_flood_and_lease_hoarding_are_capped(published):
    workers = [register(published) for _ in range(HUB["max_workers_per_token"])]
    with published.client(WORKER) as c:
        r = c.post("/v1/workers", json={"name": "flood"})
    assert r.status_code == 429 and r.json()["reason"] == "too_many_workers"
    with published.client(OTHER_WORKER) as c:  # another token is not affected
        other = c.post("/v1/workers", json={"name": "other"}).json()
    wid, secret = workers[0]
    with published.client(WORKER, secret) as c:
        first = c.post("/v1/leases", json={"worker_id": wid, "policy_version": 0, "max_tasks": 4096}).json()
        second = c.post("/v1/leases", json={"worker_id": wid, "policy_version": 0, "max_tasks": 4096}).json()
        third = c.post("/v1/leases", json={"worker_id": wid, "policy_version": 0, "max_tasks": 4096}).json()
    assert len(first["tasks"]) == HUB["max_tasks_per_lease"]
    assert len(second["tasks"]) == HUB["max_leased_per_worker"] - HUB["max_tasks_per_lease"]
    assert third["lease_id"] is None  # holds its maximum: nothing more until it submits or the lease expires
    for wid, secret in workers:
        leave(published, wid, secret)
    leave(published, other["worker_id"], other["worker_secret"], OTHER_WORKER)


def test_authentication_comes_before_the_body(published):
    big = b"x" * (31 * 1024 * 1024)
    with published.client(None) as c:
        r = c.post("/v1/rollouts", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 401 and r.json()["reason"] == "missing_token"

    def chunks():  # no Content-Length: the hub counts streamed bytes
        for _ in range(8):
            yield b"x" * 100_000

    with published.client(WORKER) as c:
        r = c.post("/v1/rollouts", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["reason"] == "body_too_large"


def test_slow_body_is_cut_off(published):
    def slow():
        yield b'{"worker_id": "w'
        time.sleep(HUB["body_timeout_s"] + 1.5)
        yield b'"}'

    with published.client(WORKER) as c:
        r = c.post("/v1/leases", content=slow(), headers={"content-type": "application/json"})
    assert r.status_code == 408 and r.json()["reason"] == "body_timeout"
    with published.client(None) as c:
        assert c.get("/healthz").status_code == 200


class _BadStatus(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's naming
        body = b'{"policy_version": 0, "tokens_per_s": 1e999}'
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_trainer_survives_a_bad_status_answer(caplog):
    """A hub (or a proxy) answering /v1/status with garbage costs the trainer one step's hub metrics."""
    from rl.trainer.loop import Trainer

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _BadStatus)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        trainer = Trainer.__new__(Trainer)  # only the hub side of the trainer is exercised
        trainer.hub = HubAdmin(f"http://127.0.0.1:{server.server_address[1]}", ADMIN, patience_s=1.0)
        assert trainer._hub_metrics() == {}
        assert "could not read the hub's status" in caplog.text
    finally:
        server.shutdown()


def test_stale_version_claims_do_not_pin_old_versions():
    from rl.hub.data import PromptSet
    from rl.hub.state import HubState
    from rl.wire.protocol import HubError, RegisterRequest

    cfg = load_config(None, ["async.max_staleness=1"])
    prompts = PromptSet(rows=[{}] * 4, prompt_ids=[[1, 2]] * 4, skipped_too_long=0)
    state = HubState(cfg, prompts, vocab_size=100)
    old = state.register(RegisterRequest(), "tok", 0.0).worker_id
    new = state.register(RegisterRequest(), "tok", 0.0).worker_id
    state.policy_version = 0
    state.heartbeat(old, "tok", 0, 1.0, 0.0)
    state.policy_version = 5
    state.heartbeat(new, "tok", 5, 1.0, 0.0)
    assert state.versions_in_use() == {5}  # version 0 is outside the staleness window: collectable
    with pytest.raises(HubError, match="never published"):
        state.heartbeat(new, "tok", 6, 1.0, 0.0)


def test_admin_quarantine_release_and_revoke(published):
    """Operator actions at run time, through `rl admin` (last in this module: it revokes a token)."""
    import os
    import subprocess
    import sys

    from helpers.hub import ROOT

    def rl_admin(*args: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "RL_HUB_ADMIN_TOKEN": ADMIN}
        cmd = [sys.executable, "-m", "rl.cli", "admin", *args, "--hub", published.url]
        return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)

    wid, secret = register(published)
    assert rl_admin("quarantine", wid, "--reason", "looks odd").returncode == 0
    with published.client(WORKER, secret) as c:
        r = c.post("/v1/leases", json={"worker_id": wid, "policy_version": 0})
        assert r.status_code == 403 and r.json()["reason"] == "quarantined"
        shown = {w["worker_id"]: w for w in c.get("/v1/status").json()["workers"]}
        assert shown[wid]["quarantined"] == "looks odd"
    assert rl_admin("release", wid).returncode == 0
    with published.client(WORKER, secret) as c:
        assert c.post("/v1/leases", json={"worker_id": wid, "policy_version": 0}).status_code == 200
    assert rl_admin("release", wid).returncode == 2  # not quarantined any more: a clear error
    assert rl_admin("revoke-worker", wid).returncode == 0
    with published.client(WORKER, secret) as c:
        assert c.post(f"/v1/workers/{wid}/heartbeat", json={"policy_version": 0}).status_code == 404
    # registered just before: a worker silent for 3 heartbeat intervals (6 s here) is dropped, and each `rl admin`
    # above is a process start (seconds on a loaded machine)
    other, other_secret = register(published, OTHER_WORKER)
    done = rl_admin("revoke-token", OTHER_WORKER)
    assert done.returncode == 0 and "1 workers removed" in done.stdout, done.stdout + done.stderr
    with published.client(OTHER_WORKER, other_secret) as c:
        r = c.post(f"/v1/workers/{other}/heartbeat", json={"policy_version": 0})
        assert r.status_code == 401 and r.json()["reason"] == "revoked_token"
    with published.client(WORKER) as c:  # other tokens are unaffected
        assert c.get("/v1/status").status_code == 200
