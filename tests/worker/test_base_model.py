"""`rl rollout --base-model`: a worker with the base model on disk downloads only what it lacks.

A real hub serves a delta run (v0 keyframe in bf16 shards, then sparse deltas). A worker
given the fp32 base checkpoint writes v0's shards itself, matches every sha256 and
downloads only the deltas; one with a changed tensor downloads just that shard. Either
way the result is bit-identical to a worker that downloaded everything.
"""

from __future__ import annotations

import logging
import shutil

import pytest
from helpers.hub import WORKER, start_hub, write_config
from helpers.policy import make_sharded_store, sparse_steps

from rl.hub.blobs import BASE_WEIGHTS, BlobIndex
from rl.rundir import RunDir
from rl.weights.store import read_manifest
from rl.wire.protocol import BaseWeights, HubError
from rollout_workers.client import HubClient
from rollout_workers.weight_sync import WeightSync

pytestmark = pytest.mark.slow
VERSIONS = 4


@pytest.fixture(scope="module")
def hub(tmp_path_factory, tiny_model_dir):
    from safetensors.torch import load_file

    run_dir = tmp_path_factory.mktemp("base-run")
    states = sparse_steps(load_file(str(tiny_model_dir / "model.safetensors")), steps=VERSIONS - 1)
    shard_bytes = sum(t.numel() * 2 for t in states[0].values()) // 3
    paths = RunDir(run_dir)
    make_sharded_store(tiny_model_dir, paths.policy, states, fmt="delta", shard_bytes=shard_bytes)
    proc = start_hub(write_config(run_dir, tiny_model_dir), run_dir / "hub.log")
    proc.policy_dir = paths.policy
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def reference(hub, tmp_path_factory):
    """The latest version as a worker without a base model gets it: everything downloaded."""
    with HubClient(hub.url, WORKER) as client:
        local = WeightSync(client, tmp_path_factory.mktemp("reference")).fetch()
    return {p.name: p.read_bytes() for p in local.model_dir.iterdir() if p.is_file() and not p.name.startswith(".")}


def delta_bytes(hub) -> int:
    """What a worker with the base model must download: v1..v3 (deltas, index) and v0's shard index."""
    v0 = read_manifest(hub.policy_dir, 0)
    index = sum(f.size for f in v0.files if f not in v0.full_shards())
    return index + sum(f.size for v in range(1, VERSIONS) for f in read_manifest(hub.policy_dir, v).files)


def test_base_model_on_disk_means_only_deltas_are_downloaded(hub, reference, tiny_model_dir, tmp_path, caplog):
    v0 = read_manifest(hub.policy_dir, 0)
    assert len(v0.full_shards()) >= 3 and read_manifest(hub.policy_dir, VERSIONS - 1).format == "delta"
    with HubClient(hub.url, WORKER) as client, caplog.at_level(logging.INFO):
        sync = WeightSync(client, tmp_path, base_model=tiny_model_dir)
        local = sync.fetch()
    assert local.version == VERSIONS - 1
    got = {p.name: p.read_bytes() for p in local.model_dir.iterdir() if p.is_file() and not p.name.startswith(".")}
    assert got == reference
    assert sync.bytes_from["hub"] == delta_bytes(hub)  # v1..v3's deltas, nothing else
    assert sync.bytes_from["local"] == sum(f.size for f in v0.full_shards() + v0.base_files)
    shards = len(v0.full_shards())
    assert f"{shards} of {shards} shards of the hub's v0 verified" in caplog.text
    assert (hub.policy_dir / BASE_WEIGHTS).is_file()  # the hub keeps the description past v0's collection


def test_changed_base_model_downloads_the_shard_that_differs(hub, reference, tiny_model_dir, tmp_path, caplog):
    import torch
    from safetensors.torch import load_file, save_file

    other = tmp_path / "other-model"
    shutil.copytree(tiny_model_dir, other)
    state = load_file(str(other / "model.safetensors"))
    state["model.norm.weight"] = state["model.norm.weight"] + 1.0  # another revision of the model
    save_file(state, str(other / "model.safetensors"), metadata={"format": "pt"})
    with HubClient(hub.url, WORKER) as client:
        base = client.call("GET", "/v1/policy/base/weights", BaseWeights)
        shards = len(base.shards)
        [changed] = [s for s, lay in zip(base.shards, base.layout, strict=True)
                     if any(t[0] == "model.norm.weight" for t in lay.tensors)]  # fmt: skip
        with caplog.at_level(logging.INFO):
            sync = WeightSync(client, tmp_path / "cache", base_model=other)
            local = sync.fetch()
    got = {p.name: p.read_bytes() for p in local.model_dir.iterdir() if p.is_file() and not p.name.startswith(".")}
    assert got == reference
    assert sync.bytes_from["hub"] == delta_bytes(hub) + changed.size
    assert f"differs from the hub's v0 in {changed.name}: sha256" in caplog.text
    assert f"{shards - 1} of {shards} shards" in caplog.text
    assert torch.equal(load_file(str(other / "model.safetensors"))["model.norm.weight"], state["model.norm.weight"])


def test_base_model_with_a_missing_tensor_and_a_hub_without_base_weights(hub, tiny_model_dir, tmp_path, caplog):
    from safetensors.torch import load_file, save_file

    partial = tmp_path / "partial"
    shutil.copytree(tiny_model_dir, partial)
    state = load_file(str(partial / "model.safetensors"))
    del state["model.norm.weight"]
    save_file(state, str(partial / "model.safetensors"), metadata={"format": "pt"})
    with HubClient(hub.url, WORKER) as client, caplog.at_level(logging.WARNING):
        sync = WeightSync(client, tmp_path / "cache", base_model=partial)
        sync.fetch(read_manifest(hub.policy_dir, 0))
    assert "the base model has no tensor model.norm.weight" in caplog.text
    # A policy store that never had a version 0: a clear 404, which the worker logs and ignores.
    empty = tmp_path / "empty-policy"
    empty.mkdir()
    with pytest.raises(HubError) as info:
        BlobIndex(empty).base_weights()
    assert info.value.status == 404 and info.value.reason == "no_base_weights"


def test_delta_files_and_rebuilt_shards_by_hash(hub):
    """Every file of every version is served by hash; a delta version's rebuilt shards are not files to serve."""
    index = BlobIndex(hub.policy_dir)
    for v in range(VERSIONS):
        manifest = read_manifest(hub.policy_dir, v)
        for entry in manifest.files + manifest.base_files:
            assert index.path(entry.sha256).stat().st_size == entry.size
    v0 = {s.sha256 for s in read_manifest(hub.policy_dir, 0).full_shards()}
    later = [s for s in read_manifest(hub.policy_dir, VERSIONS - 1).shards if s.sha256 not in v0]
    assert later  # shards the deltas changed exist nowhere on the hub as files
    with pytest.raises(HubError) as info:
        index.path(later[0].sha256)
    assert info.value.status == 404


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--base-model", "/nonexistent/model", "--base-model"),
        ("--base-model", "someorg/somemodel", "must be a local directory or an alias"),
        ("--weights-url", "ftp://mirror.example", "must be an http:// or https:// URL"),
    ],
)
def test_rollout_refuses_a_bad_base_model_or_weights_url(flag, value, message):
    import subprocess
    import sys

    from helpers.hub import ROOT

    res = subprocess.run(
        [sys.executable, "-m", "rl.cli", "rollout", "--hub", "http://127.0.0.1:9", "--token", "t", flag, value],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 2, res.stderr
    assert message in res.stderr and "Traceback" not in res.stderr
