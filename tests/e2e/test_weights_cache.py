"""Weights through an HTTP cache or a mirror: a real nginx in front of a real hub, and mirrors that lie.

Two workers fetch a version through nginx (the example config of configs/nginx/, as
docs/operations.md shows it) and the hub sends each file once. A mirror that flips,
reorders or truncates bytes is caught by the manifest's sha256 and the worker gets the
file from the hub instead: the model on disk is bit-identical to the hub's.
"""

from __future__ import annotations

import logging
import re
import threading
from pathlib import Path

import httpx
import pytest
from helpers.hub import (
    ADMIN,
    OTHER_WORKER,
    WORKER,
    free_port,
    publish_initial_policy,
    start_hub,
    start_worker,
    stop_process,
    write_config,
)
from helpers.mirror import NGINX_CONF, CorruptingMirror, start_nginx

from rl.weights.store import BASE, version_dir
from rl.wire.protocol import PolicyManifest, RegisterRequest
from rollout_workers.client import HubClient
from rollout_workers.weight_sync import WeightSync

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def site(tmp_path_factory, tiny_model_dir):
    """A hub that advertises an nginx cache in front of it (`hub.weights_url`), and that nginx."""
    run_dir = tmp_path_factory.mktemp("cache-run")
    hub_port, nginx_port = free_port(), free_port()
    config = write_config(run_dir, tiny_model_dir, hub={"weights_url": f"http://127.0.0.1:{nginx_port}"})
    publish_initial_policy(run_dir, tiny_model_dir)
    hub = start_hub(config, run_dir / "hub.log", port=hub_port)
    hub.policy_dir = run_dir / "policy"
    try:
        nginx = start_nginx(tmp_path_factory.mktemp("nginx"), hub.url, port=nginx_port)
    except BaseException:
        hub.stop()
        raise
    yield hub, nginx
    nginx.stop()
    hub.stop()


def served(hub) -> dict:
    with hub.client(ADMIN) as c:
        return c.get("/v1/status").json()["weights_served"]


def assert_identical(local_dir: Path, hub, manifest: PolicyManifest) -> None:
    published = version_dir(hub.policy_dir, manifest.version)
    for entry in manifest.files:
        assert (local_dir / entry.name).read_bytes() == (published / entry.name).read_bytes()
    for entry in manifest.base_files:
        assert (local_dir / entry.name).read_bytes() == (hub.policy_dir / BASE / entry.name).read_bytes()


def test_two_workers_through_nginx_hub_sends_each_file_once(site, tmp_path):
    hub, nginx = site
    before = served(hub)
    advertised = HubClient(hub.url, WORKER)  # learns the cache from its registration
    assert advertised.register(RegisterRequest(name="a", engine="hf")).weights_url == nginx.url
    explicit = HubClient(hub.url, OTHER_WORKER)  # `rl rollout --weights-url`
    syncs = [WeightSync(advertised, tmp_path / "a"), WeightSync(explicit, tmp_path / "b", weights_url=nginx.url)]
    manifest = advertised.policy()
    results, errors = {}, []

    def fetch(i: int) -> None:
        try:
            results[i] = syncs[i].fetch(manifest)
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=fetch, args=(i,)) for i in range(2)]  # both miss at once: cache lock
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    files = manifest.files + manifest.base_files
    total = sum(f.size for f in files)
    for i, sync in enumerate(syncs):
        assert_identical(results[i].model_dir, hub, manifest)
        assert sync.bytes_from == {"mirror": total}  # nothing from the hub directly
    after = served(hub)
    assert after["files"] - before["files"] == len(files)  # each file once, for two workers
    assert after["bytes"] - before["bytes"] == total
    blob_lines = [line for line in nginx.access_log() if "/v1/blobs/" in line]
    assert len(blob_lines) == 2 * len(files)

    # Served from the cache: Range and a conditional request, with nothing more from the hub.
    weights = manifest.files[0]
    path = f"/v1/blobs/{weights.sha256}"
    local = (results[0].model_dir / weights.name).read_bytes()
    with httpx.Client(base_url=nginx.url, headers={"Authorization": f"Bearer {WORKER}"}) as c:
        part = c.get(path, headers={"Range": "bytes=100-199"})
        assert part.status_code == 206 and part.content == local[100:200]
        assert part.headers["x-cache-status"] == "HIT"
        assert part.headers["etag"] == f'"{weights.sha256}"'
        assert c.get(path, headers={"If-None-Match": f'"{weights.sha256}"'}).status_code == 304
    assert served(hub) == after
    # The cache gives nothing, cached or not, to a request the hub would refuse.
    for headers in ({}, {"Authorization": "Bearer nope"}):
        assert httpx.get(nginx.url + path, headers=headers).status_code == 401
    assert httpx.get(f"{nginx.url}/v1/policy", headers={"Authorization": f"Bearer {WORKER}"}).status_code == 404


@pytest.mark.parametrize("mode", CorruptingMirror.MODES)
def test_lying_mirror_is_caught_and_the_hub_serves_the_file(site, tmp_path, caplog, mode):
    hub, _ = site
    client = HubClient(hub.url, WORKER, max_backoff_s=0.2)
    manifest = client.policy()
    with CorruptingMirror(hub.url, mode) as mirror, caplog.at_level(logging.WARNING):
        sync = WeightSync(client, tmp_path, weights_url=mirror.url)
        local = sync.fetch(manifest)
    assert_identical(local.model_dir, hub, manifest)
    assert len(mirror.requests) == 1  # the first file failed; the mirror sits out its cool-down
    assert sync.mirror().failures == 1
    first = manifest.base_files[0]  # base files come first
    expected = "discarded" if mode != "truncate" else "failed"
    assert any(expected in r.message and first.name in r.message for r in caplog.records), caplog.text
    total = sum(f.size for f in manifest.files + manifest.base_files)
    if mode == "truncate":  # the hub resumed after the mirror's (correct) first half
        assert sync.bytes_from["hub"] == total - first.size // 2
    else:
        assert sync.bytes_from["hub"] == total
    assert not list(tmp_path.rglob("*.part"))


def test_unreachable_mirror_falls_back_to_hub(site, tmp_path, caplog):
    hub, _ = site
    client = HubClient(hub.url, WORKER)
    with caplog.at_level(logging.WARNING):
        sync = WeightSync(client, tmp_path, weights_url=f"http://127.0.0.1:{free_port()}")
        local = sync.fetch()
    assert_identical(local.model_dir, hub, client.policy())
    assert sync.bytes_from["mirror"] == 0 and sync.mirror().failures == 1
    assert "ConnectError" in caplog.text


def test_example_config_is_the_documented_one():
    """docs/operations.md shows configs/nginx/weights-cache.conf verbatim (the file this test runs)."""
    docs = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text()
    assert NGINX_CONF.read_text().strip() in docs


def test_rollout_cli_with_weights_url_and_base_model(site, tmp_path, tiny_model_dir):
    """`rl rollout --weights-url` and `--base-model` as real worker processes: weights from the cache, or from disk."""
    hub, nginx = site
    mirror_log, base_log = tmp_path / "mirror.log", tmp_path / "base.log"
    workers = [
        start_worker(hub.url, mirror_log, tmp_path / "a", name="via-cache", engine="hf",
                     extra=["--max-prompts", "1", "--weights-url", nginx.url]),
        start_worker(hub.url, base_log, tmp_path / "b", name="has-base", engine="hf",
                     extra=["--max-prompts", "1", "--base-model", str(tiny_model_dir)]),
    ]  # fmt: skip
    try:
        codes = [w.wait(180) for w in workers]
    finally:
        for w in workers:
            stop_process(w)
    assert codes == [0, 0], mirror_log.read_text()[-3000:] + base_log.read_text()[-3000:]
    mirror_text, base_text = mirror_log.read_text(), base_log.read_text()
    from_mirror = r"downloaded policy v0: .* MB from\s+the\s+mirror, 0\.0 MB from\s+the\s+hub"  # rich may wrap
    assert re.search(from_mirror, mirror_text, re.S), mirror_text
    assert "1 of 1 shards of the hub's v0 verified on disk" in base_text, base_text
    local = re.search(r"0\.0 MB from the hub, (\d+\.\d) MB from\s+the\s+base\s+model", base_text)  # rich may wrap
    assert local and float(local.group(1)) > 0, base_text
