"""Weight files (rl/weights/files.py) and the policy writer (rl/weights/store.py): shards, deltas, keyframes, GC.

The properties the workers rely on: a shard's bytes depend only on its tensors (so a sha256
proves a rebuilt shard exact), a delta applied to its base gives the new tensors bit for
bit, and anything that does not fit (truncated, reordered, foreign) is refused loudly.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zstandard
from helpers.policy import make_sharded_store, sparse_steps
from safetensors.torch import load_file

from rl.models import sha256_file
from rl.weights.files import (
    INDEX_FILE,
    TensorSpec,
    WeightFileError,
    apply_delta,
    encode_delta,
    plan_shards,
    read_shard,
    shard_spec_of,
    write_shards,
)
from rl.weights.store import CURRENT, garbage_collect, published_versions, read_manifest, version_dir


@pytest.fixture(scope="module")
def state(tiny_model_dir) -> dict[str, torch.Tensor]:
    return load_file(str(tiny_model_dir / "model.safetensors"))


def layout(state: dict, dtype=torch.bfloat16) -> list[TensorSpec]:
    return [TensorSpec(k, tuple(t.shape), dtype) for k, t in state.items()]


def test_shards_hold_the_tensors_and_are_deterministic(state, tmp_path):
    total = sum(t.numel() * 2 for t in state.values())
    shards = plan_shards(layout(state), total // 4)
    assert len(shards) >= 3
    assert [t.name for s in shards for t in s.tensors] == list(state)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = write_shards(tmp_path / "a", shards, state.items())
    again = write_shards(tmp_path / "b", shards, state.items())
    assert first == again  # same tensors, same bytes
    for spec, entry in zip(shards, first, strict=True):
        path = tmp_path / "a" / spec.name
        assert entry.size == path.stat().st_size and entry.sha256 == sha256_file(path)
        loaded = load_file(str(path))  # a plain safetensors file
        assert list(loaded) == [t.name for t in spec.tensors]
        for name, tensor in loaded.items():
            assert torch.equal(tensor, state[name].to(torch.bfloat16))
        assert shard_spec_of(path) == spec


def test_writer_refuses_tensors_out_of_plan(state, tmp_path):
    shards = plan_shards(layout(state), 10**9)
    items = list(state.items())
    with pytest.raises(WeightFileError, match="expected"):
        write_shards(tmp_path, shards, [items[1], items[0], *items[2:]])
    with pytest.raises(WeightFileError, match="ended"):
        write_shards(tmp_path, shards, items[:-1])
    with pytest.raises(WeightFileError, match="not in the shard plan"):
        write_shards(tmp_path, shards, [*items, ("extra", torch.zeros(2))])


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns, one integer per element (NaN == NaN here)."""
    return t.reshape(-1).view({2: torch.int16, 4: torch.int32}[t.element_size()])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_delta_rebuilds_exact_bits(dtype):
    g = torch.Generator().manual_seed(0)
    old = {"w": torch.randn(300, 70, generator=g).to(dtype), "b": torch.randn(70, generator=g).to(dtype),
           "s": torch.tensor(1.5, dtype=dtype), "same": torch.ones(5, dtype=dtype)}  # fmt: skip
    new = {k: v.clone() for k, v in old.items()}
    mask = torch.rand(300, 70, generator=g) < 0.02
    new["w"][mask] = (new["w"][mask].float() * 1.001 + 1e-3).to(dtype)
    new["w"][0, 0] = -new["w"][0, 0]  # a sign flip: a large jump in the bit pattern
    new["w"][-1, -1] = float("inf")
    new["b"][3] = float("nan")
    new["s"] = torch.tensor(-2.0, dtype=dtype)
    blob, changed = encode_delta(old.items(), new.items())
    assert changed == sum(int((bits(old[k]) != bits(new[k])).sum()) for k in old)
    rebuilt = dict(apply_delta(old.items(), blob))
    for k in old:
        assert rebuilt[k].dtype == dtype and rebuilt[k].shape == new[k].shape
        assert torch.equal(bits(rebuilt[k]), bits(new[k])), k  # bits, NaN included
    assert old["s"].item() == 1.5  # the base is not modified


def test_bad_deltas_are_refused():
    g = torch.Generator().manual_seed(1)
    old = {"a": torch.randn(1000, generator=g).bfloat16(), "b": torch.randn(10, generator=g).bfloat16()}
    new = {"a": old["a"] + 1, "b": old["b"]}
    blob, _ = encode_delta(old.items(), new.items())
    with pytest.raises(WeightFileError, match="unreadable"):
        list(apply_delta(old.items(), blob[: len(blob) // 2]))
    with pytest.raises(WeightFileError, match="does not fit"):
        list(apply_delta({"b": old["b"]}.items(), blob))  # a base without the changed tensor
    with pytest.raises(WeightFileError, match="truncated|outside"):
        list(apply_delta({"a": old["a"][:10]}.items(), blob))  # a smaller base tensor
    with pytest.raises(WeightFileError, match="different tensors"):
        encode_delta(old.items(), {"b": new["b"], "a": new["a"]}.items())
    # A gap of 0 names one element twice: applied in place, the hash of the bits written would not be
    # the tensor's (the second write wins), so such a delta is refused outright.
    head = json.dumps([{"name": "b", "count": 2, "wide": False}]).encode() + b"\n"
    body = np.array([3, 0], np.uint32).tobytes() + np.array([1, 1], np.uint16).tobytes()
    twice = zstandard.ZstdCompressor().compress(head + body)
    with pytest.raises(WeightFileError, match="changes an element twice"):
        list(apply_delta(old.items(), twice))


def test_read_shard_refuses_foreign_or_truncated_files(state, tmp_path):
    shards = plan_shards(layout(state), sum(t.numel() * 2 for t in state.values()) // 3)
    write_shards(tmp_path, shards, state.items())
    first, second = shards[0], shards[1]
    (tmp_path / second.name).rename(tmp_path / "other")
    (tmp_path / "other").rename(tmp_path / second.name)
    with pytest.raises(WeightFileError, match="header"):
        list(read_shard(tmp_path / second.name, first))  # another shard's layout
    data = (tmp_path / first.name).read_bytes()
    (tmp_path / first.name).write_bytes(data[:-10])
    with pytest.raises(WeightFileError, match="bytes"):
        list(read_shard(tmp_path / first.name, first))


def test_delta_versions_keyframes_and_gc(tiny_model_dir, state, tmp_path):
    states = sparse_steps(state, steps=6)
    shard_bytes = sum(t.numel() * 2 for t in state.values()) // 3
    full, delta = tmp_path / "full", tmp_path / "delta"
    make_sharded_store(tiny_model_dir, full, states, fmt="full", shard_bytes=shard_bytes)
    make_sharded_store(tiny_model_dir, delta, states, fmt="delta", shard_bytes=shard_bytes, keyframe_every=3)
    formats = [read_manifest(delta, v).format for v in range(7)]
    assert formats == ["full", "delta", "delta", "full", "delta", "delta", "full"]
    for v in range(7):
        f, d = read_manifest(full, v), read_manifest(delta, v)
        assert d.shards == f.shards  # a delta version names exactly the full version's shards
        assert d.bytes_full == sum(s.size for s in f.shards)
        assert d.keyframe_version == v // 3 * 3
        if v:
            assert d.base_version == v - 1
        if d.format == "full" and v:  # a later keyframe carries the deltas from v - 1 too
            assert d.deltas and sum(x.size for x in d.deltas) < 0.2 * d.bytes_full
        if d.format == "delta":
            shipped = sum(x.size for x in d.files)
            assert shipped < 0.2 * d.bytes_full, (v, shipped, d.bytes_full)
            assert all(x.name.endswith(".delta.zst") or x.name == INDEX_FILE for x in d.files)
    # The trainer's base for the next delta is the newest version's full shards.
    for s in read_manifest(delta, 6).shards:
        assert sha256_file(delta / CURRENT / s.name) == s.sha256
    index = json.loads((version_dir(delta, 5) / INDEX_FILE).read_text())
    assert set(index["weight_map"]) == set(state)

    # GC keeps the newest keyframe and the deltas after it, whatever keep_versions says.
    make_sharded_store(tiny_model_dir, tmp_path / "gc", states[:6], fmt="delta", shard_bytes=shard_bytes,
                       keyframe_every=3)  # fmt: skip
    assert garbage_collect(tmp_path / "gc", in_use=set(), keep_latest=1) == [0, 1, 2]
    assert published_versions(tmp_path / "gc") == [3, 4, 5]
