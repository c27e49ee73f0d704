"""The real hub process serving delta versions: older manifests, the chain kept by GC, and
the workers' fetch/load times in /v1/status. A real WeightSync rebuilds the newest version."""

from __future__ import annotations

import pytest
from helpers.hub import ADMIN, WORKER, start_hub, write_config  # noqa: E402
from helpers.policy import make_sharded_store, sparse_steps  # noqa: E402

from rl.weights.store import published_versions, read_manifest  # noqa: E402
from rollout_workers.client import HubClient  # noqa: E402
from rollout_workers.weight_sync import WeightSync  # noqa: E402


@pytest.fixture(scope="module")
def hub(tmp_path_factory, tiny_model_dir):
    from safetensors.torch import load_file

    run_dir = tmp_path_factory.mktemp("hub-weights") / "run"
    config = write_config(run_dir, tiny_model_dir, weights={"keep_versions": 1})
    states = sparse_steps(load_file(str(tiny_model_dir / "model.safetensors")), steps=5)
    shard_bytes = sum(t.numel() * 2 for t in states[0].values()) // 3
    make_sharded_store(tiny_model_dir, run_dir / "policy", states, fmt="delta", shard_bytes=shard_bytes,
                       keyframe_every=3)  # fmt: skip
    make_sharded_store(tiny_model_dir, run_dir.parent / "full", states, fmt="full", shard_bytes=shard_bytes)
    proc = start_hub(config, run_dir.parent / "hub.log")
    proc.run_dir = run_dir
    yield proc
    proc.stop()


def test_older_manifests_and_unknown_versions(hub):
    with hub.client(WORKER) as c:
        latest = c.get("/v1/policy").json()
        assert latest["version"] == 5 and latest["format"] == "delta" and latest["keyframe_version"] == 3
        assert c.get("/v1/policy/4").json() == read_manifest(hub.run_dir / "policy", 4).model_dump()
        for missing in ("99", "6", "-1"):
            r = c.get(f"/v1/policy/{missing}")
            assert r.status_code in (404, 422), (missing, r.status_code)
        assert c.get("/v1/policy/99").json()["reason"] == "unknown_version"


def test_worker_rebuilds_latest_and_reports_times(hub, tmp_path):
    with HubClient(hub.url, WORKER) as client:
        local = WeightSync(client, tmp_path).fetch()
        assert local.version == 5
        full = read_manifest(hub.run_dir.parent / "full", 5)
        assert [p.name for p in local.weight_files] == [s.name for s in full.shards]
        assert all(
            p.read_bytes() == (hub.run_dir.parent / "full" / "v5" / p.name).read_bytes() for p in local.weight_files
        )
        with hub.client(WORKER) as c:
            reg = c.post("/v1/workers", json={"name": "w", "engine": "hf"}).json()
            wid, secret = reg["worker_id"], {"X-Worker-Secret": reg["worker_secret"]}
            beat = {"policy_version": 5, "fetch_s": 1.25, "load_s": 0.5}
            assert c.post(f"/v1/workers/{wid}/heartbeat", json=beat, headers=secret).status_code == 200
            worker = next(w for w in c.get("/v1/status").json()["workers"] if w["worker_id"] == wid)
        assert worker["fetch_s"] == 1.25 and worker["load_s"] == 0.5


def test_gc_keeps_the_keyframe_and_the_deltas_after_it(hub):
    with hub.client(ADMIN) as c:
        assert c.post("/v1/policy", json={"version": 5}).status_code == 200
    assert published_versions(hub.run_dir / "policy") == [3, 4, 5]  # keep_versions 1, yet the chain stays
