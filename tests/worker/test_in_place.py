"""Delta versions applied to a live engine in place (rl/weights/inplace.py, rollout_workers/in_place.py):
bit for bit what a full load gives, checked against the manifest's per-tensor hashes, and all or
nothing: a fault injected midway, a wrong hash or a wrong base leaves the previous version, bit for bit.

The engine is the real hf engine on the tiny model; the versions are a real delta run's (PolicyWriter),
served by the real hub for the worker's half.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers.hub import WORKER, LiveHub, live_config
from helpers.policy import make_sharded_store, sparse_steps

from rl.rundir import RunDir
from rl.weights.apply import delta_files
from rl.weights.files import ChangeHashes, WeightFileError
from rl.weights.inplace import FAULT_ENV, InjectedFault
from rl.weights.store import MANIFEST, read_manifest, version_dir
from rollout_workers.client import HubClient
from rollout_workers.engines import EngineSpec
from rollout_workers.engines.hf_engine import HFEngine
from rollout_workers.in_place import load_in_place
from rollout_workers.weight_sync import WeightSync

VERSIONS = 4


@pytest.fixture(scope="module")
def stores(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """The same versions (sparse bf16 updates) as a `full` and a `delta` run, in 3 shards. The last one
    changes the first decoder layer only (vLLM then reloads that layer and keeps the others)."""
    from safetensors.torch import load_file

    states = sparse_steps(load_file(str(tiny_model_dir / "model.safetensors")), steps=VERSIONS - 1)
    states[-1] = {k: t if k.startswith("model.layers.0.") else states[-2][k] for k, t in states[-1].items()}
    shard_bytes = sum(t.numel() * 2 for t in states[0].values()) // 3
    out = {}
    for fmt in ("full", "delta"):
        out[fmt] = RunDir(tmp_path_factory.mktemp(fmt)).policy
        make_sharded_store(tiny_model_dir, out[fmt], states, fmt=fmt, shard_bytes=shard_bytes)
    return out


def model_dir(policy: Path, version: int, into: Path) -> Path:
    """A full version of `policy` as an HF directory (what a worker's cache holds)."""
    into.mkdir(parents=True, exist_ok=True)
    for src in [*(policy / "base").iterdir(), *version_dir(policy, version).iterdir()]:
        if src.name != MANIFEST:
            shutil.copy(src, into / src.name)
    return into


def engine_at(stores, version: int, tmp: Path) -> HFEngine:
    directory = model_dir(stores["full"], version, tmp / f"full-v{version}")
    return HFEngine(EngineSpec(kind="hf"), directory, max_model_len=64, dtype="bfloat16")


def deltas_of(store: Path, version: int) -> tuple[list[bytes], ChangeHashes]:
    manifest = read_manifest(store, version)
    files = [f for f in delta_files(manifest) if f.name.endswith(".delta.zst")]
    hashes = ChangeHashes(manifest.tensor_sha256, manifest.changes_sha256)
    return [(version_dir(store, version) / f.name).read_bytes() for f in files], hashes


def bits(engine: HFEngine) -> dict[str, torch.Tensor]:
    return {k: v.detach().view(torch.int16).clone() for k, v in engine.model.state_dict().items()}


def assert_same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{what}: {len(differ)} tensor(s) differ, e.g. {differ[:3]}"


@pytest.fixture(scope="module")
def reference(stores, tmp_path_factory) -> list[dict[str, torch.Tensor]]:
    """Each version's weights as the hf engine holds them after a full load of its shards."""
    engine = engine_at(stores, 0, tmp_path_factory.mktemp("ref"))
    out = [bits(engine)]
    for v in range(1, VERSIONS):
        engine.load_weights(sorted(version_dir(stores["full"], v).glob("*.safetensors")))
        out.append(bits(engine))
    return out


def test_manifest_has_hashes_of_the_changed_tensors(stores):
    for v in range(1, VERSIONS):
        manifest = read_manifest(stores["delta"], v)
        assert manifest.format == "delta" and manifest.tensor_sha256.keys() == manifest.changes_sha256.keys() != set()
        if v == VERSIONS - 1:
            assert all(name.startswith("model.layers.0.") for name in manifest.changes_sha256)
        assert not read_manifest(stores["full"], v).tensor_sha256  # a full run ships no deltas


@pytest.mark.parametrize("verify", ["changes", "tensors"])
def test_in_place_apply_equals_full_load_bit_for_bit(stores, reference, tmp_path, verify):
    engine = engine_at(stores, 0, tmp_path)
    assert_same_bits(bits(engine), reference[0], "v0 loaded")
    for v in range(1, VERSIONS):
        applied = engine.apply_delta(*deltas_of(stores["delta"], v), verify=verify)
        assert applied.tensors > 0 and applied.elements > 0
        assert_same_bits(bits(engine), reference[v], f"v{v} applied in place")


def test_fault_midway_leaves_the_previous_version(stores, reference, tmp_path, monkeypatch):
    """Raising after 1, about half, and all of the changed tensors (before the hash check): v0, bit for bit."""
    engine = engine_at(stores, 0, tmp_path)
    deltas, hashes = deltas_of(stores["delta"], 1)
    for after in (1, len(hashes.changes) // 2, len(hashes.changes)):
        monkeypatch.setenv(FAULT_ENV, str(after))
        with pytest.raises(InjectedFault):
            engine.apply_delta(deltas, hashes)
        assert_same_bits(bits(engine), reference[0], f"fault after {after} tensor(s)")
    monkeypatch.delenv(FAULT_ENV)
    engine.apply_delta(deltas, hashes)
    assert_same_bits(bits(engine), reference[1], "v1 after the faults")


def test_wrong_hash_or_wrong_base_is_rolled_back(stores, reference, tmp_path):
    engine = engine_at(stores, 0, tmp_path)
    deltas, hashes = deltas_of(stores["delta"], 1)
    name = next(iter(hashes.changes))
    for verify in ("changes", "tensors"):
        wrong = ChangeHashes({**hashes.tensors, name: "0" * 64}, {**hashes.changes, name: "0" * 64})
        with pytest.raises(WeightFileError, match="differ from the manifest"):
            engine.apply_delta(deltas, wrong, verify=verify)
        assert_same_bits(bits(engine), reference[0], f"wrong {verify} hash")
    with pytest.raises(WeightFileError, match="differ from the manifest"):
        engine.apply_delta(*deltas_of(stores["delta"], 2))  # v2's deltas start from v1, the engine holds v0
    assert_same_bits(bits(engine), reference[0], "wrong base")
    with pytest.raises(WeightFileError):
        engine.apply_delta([d[: len(d) // 2] for d in deltas], hashes)  # truncated files
    assert_same_bits(bits(engine), reference[0], "truncated delta")


# --------------------------------------------------------------------------- the worker's half, over the hub


@pytest.fixture(scope="module")
def delta_hub(stores, tiny_model_dir) -> Iterator[LiveHub]:
    with LiveHub(live_config(stores["delta"].parent, tiny_model_dir)) as hub, HubClient(hub.url, WORKER) as client:
        hub.client = client
        yield hub


def test_worker_applies_downloaded_deltas_or_falls_back(stores, reference, delta_hub, tmp_path, monkeypatch):
    engine = engine_at(stores, 0, tmp_path)
    sync = WeightSync(delta_hub.client, tmp_path / "cache")
    manifest = read_manifest(stores["delta"], 1)
    assert load_in_place(engine, sync, manifest, held=1) is None  # v1 does not start from v1
    assert_same_bits(bits(engine), reference[0], "nothing applied")
    monkeypatch.setenv(FAULT_ENV, "2")
    assert load_in_place(engine, sync, manifest, held=0) is None  # the caller loads the full version
    assert_same_bits(bits(engine), reference[0], "the fault rolled back")
    monkeypatch.delenv(FAULT_ENV)
    for v in range(1, VERSIONS):
        took = load_in_place(engine, sync, read_manifest(stores["delta"], v), held=v - 1)
        assert took is not None and min(took) >= 0
        assert_same_bits(bits(engine), reference[v], f"v{v} over the hub")
    gets = [e.path for e in delta_hub.proxy.exchanges if "/files/" in e.path]
    assert gets and all(p.endswith(".delta.zst") for p in gets), "only delta files are downloaded"
    assert not list(sync.cache_dir.glob(".inplace-*")), "the staging directory is removed"
    with contextlib.suppress(Exception):
        engine.close()


# --------------------------------------------------------------------------- vLLM (its reload path, slow)


def greedy_logprobs(engine, prompts: list[list[int]]) -> list[list[float]]:
    from rl.wire.protocol import SamplingParamsWire

    sampling = SamplingParamsWire(n=1, temperature=0.0, top_p=1.0, top_k=-1, max_tokens=12)
    return [c[0].logprobs for c in engine.generate(prompts, sampling)]


@pytest.mark.slow
def test_vllm_in_place_equals_full_load_and_faults_roll_back(stores, tmp_path, monkeypatch):
    """vLLM keeps kernel-form weights: an in-place apply must give the logprobs of a full load of the same
    version exactly, and a fault midway the previous version's exactly."""
    from rollout_workers.engines import make_engine

    prompts = [[5, 17, 42, 99, 7], [3, 3, 8, 120, 64, 11]]
    full = lambda v: sorted(version_dir(stores["full"], v).glob("*.safetensors"))  # noqa: E731
    directory = model_dir(stores["full"], 0, tmp_path / "v0")
    engine = make_engine(EngineSpec(kind="vllm"), directory, max_model_len=64, dtype="bfloat16")
    try:
        expected = []
        for v in range(VERSIONS):
            engine.load_weights(full(v))
            expected.append(greedy_logprobs(engine, prompts))
        assert expected[0] != expected[-1], "the versions must differ for this test to mean anything"
        engine.load_weights(full(0))
        for v in range(1, VERSIONS):
            deltas, hashes = deltas_of(stores["delta"], v)
            monkeypatch.setenv(FAULT_ENV, str(len(hashes.changes) // 2))
            with pytest.raises(Exception, match=FAULT_ENV):
                engine.apply_delta(deltas, hashes)
            assert greedy_logprobs(engine, prompts) == expected[v - 1], f"fault applying v{v}: not v{v - 1}"
            monkeypatch.delenv(FAULT_ENV)
            engine.apply_delta(deltas, hashes)
            assert greedy_logprobs(engine, prompts) == expected[v], f"v{v} in place differs from its full load"
    finally:
        engine.close()
