"""Both halves of the weight-file format without a hub or a worker: what the trainer writes
(rl/weights/store.py) and what a worker makes of it (rl/weights/apply.py), for `delta` and `lora`.
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import pytest
import torch
from helpers.policy import make_sharded_store, sparse_steps
from safetensors.torch import load_file

from rl.models import sha256_file
from rl.weights.apply import delta_chain, delta_files, loadable_shards, merge_lora, rebuild_from_deltas
from rl.weights.files import WeightFileError
from rl.weights.lora import ADAPTER_FILE, merge_adapter
from rl.weights.store import WEIGHTS_FILE, read_manifest, version_dir, write_base, write_lora_version, write_version


@pytest.fixture(scope="module")
def state(tiny_model_dir) -> dict[str, torch.Tensor]:
    return load_file(str(tiny_model_dir / "model.safetensors"))


@pytest.fixture(scope="module")
def stores(tiny_model_dir, state, tmp_path_factory) -> tuple[Path, Path]:
    """The same five versions published `full` and `delta` (keyframes v0 and v3), in three shards."""
    states = sparse_steps(state, steps=4)
    shard_bytes = sum(t.numel() * 2 for t in state.values()) // 3
    root = tmp_path_factory.mktemp("stores")
    make_sharded_store(tiny_model_dir, root / "full", states, fmt="full", shard_bytes=shard_bytes)
    make_sharded_store(tiny_model_dir, root / "delta", states, fmt="delta", shard_bytes=shard_bytes, keyframe_every=3)
    return root / "full", root / "delta"


def shipped_copy(store: Path, version: int, into: Path) -> Path:
    """`into` holding what a worker downloads to rebuild `version` from the version before it."""
    into.mkdir(parents=True)
    for f in delta_files(read_manifest(store, version)):
        shutil.copy(version_dir(store, version) / f.name, into / f.name)
    return into


def test_deltas_rebuild_every_version_bit_for_bit(stores, tmp_path):
    full, delta = stores
    manifest = functools.partial(read_manifest, delta)
    assert [m.version for m in delta_chain(manifest(2), manifest)] == [2, 1, 0]
    assert [m.version for m in delta_chain(manifest(4), manifest)] == [4, 3]
    held = version_dir(delta, 0)  # the keyframe, as downloaded
    for v in range(1, 5):  # v3 is a keyframe: rebuilt from its `deltas`, as a worker holding v2 does
        vdir = shipped_copy(delta, v, tmp_path / f"v{v}")
        rebuild_from_deltas(manifest(v), manifest(v - 1), held, vdir)
        files = loadable_shards(manifest(v), vdir)
        assert [sha256_file(p) for p in files] == [s.sha256 for s in read_manifest(full, v).shards]
        assert not list(vdir.glob("*.delta.zst"))  # consumed
        held = vdir


def test_a_delta_applied_to_the_wrong_base_is_refused(stores, tmp_path):
    _, delta = stores
    vdir = shipped_copy(delta, 2, tmp_path / "v2")
    with pytest.raises(WeightFileError, match="hashes to"):
        rebuild_from_deltas(read_manifest(delta, 2), read_manifest(delta, 0), version_dir(delta, 0), vdir)


def test_lora_version_merges_into_its_base(tiny_model_dir, state, tmp_path):
    policy = tmp_path / "policy"
    write_base(policy, tiny_model_dir)
    write_version(policy, 0, state, "float32")
    name = next(k for k, t in state.items() if t.ndim == 2 and k.endswith("q_proj.weight")).removesuffix(".weight")
    out_dim, in_dim = state[f"{name}.weight"].shape
    g = torch.Generator().manual_seed(0)
    adapters = {
        f"{name}.lora_A": torch.randn(4, in_dim, generator=g),
        f"{name}.lora_B": torch.randn(out_dim, 4, generator=g),
    }
    write_lora_version(policy, 1, adapters, {"format": "pt", "scaling": "2.0"}, base_version=0)
    manifest = read_manifest(policy, 1)
    vdir = tmp_path / "v1"
    vdir.mkdir()
    shutil.copy(version_dir(policy, 1) / ADAPTER_FILE, vdir / ADAPTER_FILE)
    base_shards = [version_dir(policy, 0) / WEIGHTS_FILE]

    merged = merge_lora(manifest, vdir, 0, base_shards)
    assert merged == [vdir / WEIGHTS_FILE] == loadable_shards(manifest, vdir)
    expected = merge_adapter(load_file(base_shards[0]), adapters, 2.0)
    for key, tensor in load_file(merged[0]).items():
        torch.testing.assert_close(tensor, expected[key], rtol=0, atol=0, msg=key)

    narrow = adapters | {f"{name}.lora_A": adapters[f"{name}.lora_A"][:, :-1]}  # one input column short
    write_lora_version(policy, 2, narrow, {"format": "pt", "scaling": "2.0"}, base_version=0)
    shutil.copy(version_dir(policy, 2) / ADAPTER_FILE, vdir / ADAPTER_FILE)
    with pytest.raises(WeightFileError, match="does not fit base v0"):
        merge_lora(read_manifest(policy, 2), vdir, 0, base_shards)
    write_lora_version(policy, 3, adapters, {"format": "pt"}, base_version=0)
    shutil.copy(version_dir(policy, 3) / ADAPTER_FILE, vdir / ADAPTER_FILE)
    with pytest.raises(WeightFileError, match="no 'scaling'"):
        merge_lora(read_manifest(policy, 3), vdir, 0, base_shards)
