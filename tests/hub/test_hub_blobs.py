"""The hub's content-addressed route `GET /v1/blobs/{sha256}` over real HTTP: cache headers, Range, 304, errors."""

from __future__ import annotations

import hashlib

import pytest
from helpers.hub import ADMIN, WORKER, publish_initial_policy, start_hub, write_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hub(tmp_path_factory, tiny_model_dir):
    run_dir = tmp_path_factory.mktemp("blob-run")
    config = write_config(run_dir, tiny_model_dir)
    publish_initial_policy(run_dir, tiny_model_dir)
    proc = start_hub(config, run_dir / "hub.log")
    proc.run_dir = run_dir
    yield proc
    proc.stop()


def manifest(hub) -> dict:
    with hub.client(WORKER) as c:
        return c.get("/v1/policy").json()


def served(hub) -> dict:
    with hub.client(WORKER) as c:
        return c.get("/v1/status").json()["weights_served"]


def test_blob_is_cacheable_with_range_and_etag(hub):
    weights = manifest(hub)["files"][0]
    sha = weights["sha256"]
    before = served(hub)
    with hub.client(WORKER) as c:
        full = c.get(f"/v1/blobs/{sha}")
        assert full.status_code == 200
        assert hashlib.sha256(full.content).hexdigest() == sha and len(full.content) == weights["size"]
        assert full.headers["cache-control"] == "public, max-age=31536000, immutable"
        assert full.headers["etag"] == f'"{sha}"'
        assert full.headers["accept-ranges"] == "bytes"
        assert "vary" not in full.headers and "set-cookie" not in full.headers

        part = c.get(f"/v1/blobs/{sha}", headers={"Range": "bytes=100-"})
        assert part.status_code == 206
        assert part.content == full.content[100:]
        assert part.headers["content-range"] == f"bytes 100-{weights['size'] - 1}/{weights['size']}"
        assert part.headers["etag"] == f'"{sha}"'
        # If-Range with our strong ETag keeps the range; a stale validator gets the whole file.
        assert c.get(f"/v1/blobs/{sha}", headers={"Range": "bytes=10-19", "If-Range": f'"{sha}"'}).status_code == 206
        assert c.get(f"/v1/blobs/{sha}", headers={"Range": "bytes=10-19", "If-Range": '"other"'}).status_code == 200

        for tag in (f'"{sha}"', f'W/"{sha}"', f'"x", "{sha}"', "*"):
            unchanged = c.get(f"/v1/blobs/{sha}", headers={"If-None-Match": tag})
            assert unchanged.status_code == 304, tag
            assert unchanged.content == b"" and unchanged.headers["etag"] == f'"{sha}"'
        assert c.get(f"/v1/blobs/{sha}", headers={"If-None-Match": '"x"'}).status_code == 200
    after = served(hub)
    assert after["files"] == before["files"] + 5  # 200, 206, 206, 200 (If-Range), 200: the 304s send nothing
    assert after["bytes"] == before["bytes"] + 3 * weights["size"] + (weights["size"] - 100) + 10


def test_base_files_by_hash(hub, tiny_model_dir):
    config = next(f for f in manifest(hub)["base_files"] if f["name"] == "config.json")
    with hub.client(WORKER) as c:
        r = c.get(f"/v1/blobs/{config['sha256']}")
    assert r.status_code == 200 and r.content == (tiny_model_dir / "config.json").read_bytes()


@pytest.mark.parametrize(
    ("token", "name", "status", "reason"),
    [
        (None, "0" * 64, 401, "missing_token"),
        ("nope", "0" * 64, 401, "bad_token"),
        (WORKER, "0" * 64, 404, "unknown_blob"),
        (WORKER, "A" * 64, 422, "bad_hash"),
        (WORKER, "abc", 422, "bad_hash"),
        (WORKER, "..manifest.json", 422, "bad_hash"),
        (WORKER, "..%2Fmanifest.json", 404, "http_error"),  # a slash: no such route at all
    ],
)
def test_blob_errors(hub, token, name, status, reason):
    with hub.client(token) as c:
        r = c.get(f"/v1/blobs/{name}")
    assert r.status_code == status, r.text
    assert r.json()["reason"] == reason
    assert "cache-control" not in r.headers  # an error is never cached as the blob


def test_new_version_is_served_by_hash(hub, tiny_model_dir):
    from safetensors.torch import load_file

    from rl.weights.store import write_version

    state = load_file(tiny_model_dir / "model.safetensors")
    state = {k: v + 1.0 for k, v in state.items()}
    written = write_version(hub.run_dir / "policy", 1, state, "float32")
    sha = written.files[0].sha256
    with hub.client(ADMIN) as c:
        assert c.post("/v1/policy", json={"version": 1}).status_code == 200
    with hub.client(WORKER) as c:
        r = c.get(f"/v1/blobs/{sha}")
    assert r.status_code == 200 and hashlib.sha256(r.content).hexdigest() == sha
