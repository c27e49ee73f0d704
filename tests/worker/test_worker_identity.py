"""HubClient with a contributor identity against the real hub app: each registration signs a fresh challenge,
and registering again after a hub restart (every worker id and challenge forgotten) keeps the contributor."""

from __future__ import annotations

import pytest
from helpers.hub import WORKER, LiveHub, live_config

from rl.wire.identity import public_id, write_key
from rl.wire.protocol import HeartbeatRequest, RegisterRequest
from rl.wire.tokens import token_id
from rollout_workers.client import HubClient


@pytest.fixture
def hub(tiny_model_dir, tmp_path):
    with LiveHub(live_config(tmp_path / "run", tiny_model_dir)) as live:
        yield live


def contributor_of(hub: LiveHub, worker_id: str) -> str:
    return next(w.contributor for w in hub.status().workers if w.worker_id == worker_id)


def test_an_identity_survives_re_registration_after_a_hub_restart(hub, tmp_path):
    key = write_key(tmp_path / "me.pem")
    with HubClient(hub.url, WORKER, identity=key, max_backoff_s=0.2) as c:
        first = c.register(RegisterRequest(name="me")).worker_id
        assert contributor_of(hub, first) == public_id(key)
        hub.restart()  # the hub forgets the worker id (and its challenges)
        c.heartbeat(HeartbeatRequest(policy_version=-1))  # 404 -> registers again, signing a new challenge
        second = c.worker_id
    assert second != first and c.registrations == 2
    assert contributor_of(hub, second) == public_id(key)
    proofs = [e.sent()["identity"] for e in hub.proxy.calls("POST", "/v1/workers", status=200)]
    assert len({p["challenge"] for p in proofs}) == 2 and {p["public_key"] for p in proofs} == {public_id(key)}
    with HubClient(hub.url, WORKER) as anonymous:  # no key: credited to the token
        plain = anonymous.register(RegisterRequest(name="anon")).worker_id
    assert contributor_of(hub, plain) == f"token:{token_id(WORKER)}"
