"""Delta versions applied to a live engine in place (rl/weights/inplace.py, rollout_workers/in_place.py):
bit for bit what a full load gives, checked against the manifest's per-tensor hashes, and all or
nothing: a fault injected midway, a wrong hash or a wrong base leaves the previous version, bit for bit.

The engine is the real hf engine on the tiny model; the versions are a real delta run's (PolicyWriter),
served by the real hub for the worker's half.
"""

from __future__ import annotations

import contextlib
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
from rl.weights.store import export_version, read_manifest, version_dir
from rollout_workers.client import HubClient
from rollout_workers.engines import EngineSpec
from rollout_workers.engines.hf_engine import HFEngine
from rollout_workers.in_place import DeltaPrefetch, load_in_place
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


def engine_at(stores, version: int, tmp: Path) -> HFEngine:
    directory = export_version(stores["full"], version, tmp / f"full-v{version}")
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


# --------------------------------------------------------------------------- vLLM (slow)


def greedy_logprobs(engine, prompts: list[list[int]]) -> list[list[float]]:
    from rl.wire.protocol import SamplingParamsWire

    sampling = SamplingParamsWire(n=1, temperature=0.0, top_p=1.0, top_k=-1, max_tokens=12)
    return [c[0].logprobs for c in engine.generate(prompts, sampling)]


def _as_unmapped(wrapper) -> None:
    """Run in vLLM's worker process (`wrapper`: vLLM's wrapper of the worker that holds the extension's
    state): the state of a model whose tensors did not map, so deltas take vLLM's reload."""
    assert wrapper.worker.scatter_rl_maps is True
    wrapper.worker.scatter_rl_maps = False


@pytest.mark.slow
def test_vllm_in_place_equals_full_load_and_faults_roll_back(stores, tmp_path, monkeypatch, caplog):
    """vLLM keeps kernel-form weights (fused q/k/v and gate/up; on CPU packed for its GEMM): an in-place
    apply must give the logprobs of a full load of the same version exactly, and a fault midway the
    previous version's exactly. Deltas are written into vLLM's own tensors (and the changed layers
    re-packed), from a fresh engine's first delta on; a model whose tensors do not map that way goes
    through vLLM's reload, with the same result."""
    import logging

    from rollout_workers.engines import make_engine

    caplog.set_level(logging.INFO, logger="rollout_workers.engines.vllm_engine")
    prompts = [[5, 17, 42, 99, 7], [3, 3, 8, 120, 64, 11]]
    full = lambda v: sorted(version_dir(stores["full"], v).glob("*.safetensors"))  # noqa: E731
    directory = export_version(stores["full"], 0, tmp_path / "v0")
    engine = make_engine(EngineSpec(kind="vllm"), directory, max_model_len=64, dtype="bfloat16")

    def apply(v: int, how: str) -> None:
        caplog.clear()
        engine.apply_delta(*deltas_of(stores["delta"], v))
        assert f"; {how}," in caplog.text, f"v{v} was not {how}: {caplog.text}"

    try:
        apply(1, "written in place")  # the engine as vLLM loaded it: no plain weights kept yet
        first = greedy_logprobs(engine, prompts)
        expected = []
        for v in range(VERSIONS):
            engine.load_weights(full(v))
            expected.append(greedy_logprobs(engine, prompts))
        assert expected[0] != expected[-1], "the versions must differ for this test to mean anything"
        assert first == expected[1], "a fresh engine's first delta differs from the full load"
        engine.load_weights(full(0))
        for v in range(1, VERSIONS):
            deltas, hashes = deltas_of(stores["delta"], v)
            monkeypatch.setenv(FAULT_ENV, str(len(hashes.changes) // 2))
            with pytest.raises(Exception, match=FAULT_ENV):
                engine.apply_delta(deltas, hashes)
            assert greedy_logprobs(engine, prompts) == expected[v - 1], f"fault applying v{v}: not v{v - 1}"
            monkeypatch.delenv(FAULT_ENV)
            apply(v, "written in place")
            assert greedy_logprobs(engine, prompts) == expected[v], f"v{v} in place differs from its full load"

        engine.llm.collective_rpc(_as_unmapped)  # a model vLLM holds some other way: its reload path
        engine.load_weights(full(0))
        for v in range(1, VERSIONS):
            apply(v, "reloaded by vLLM")
            assert greedy_logprobs(engine, prompts) == expected[v], f"v{v} through vLLM's reload differs"
    finally:
        engine.close()


def test_prefetched_deltas_are_used_for_their_version_only(stores, reference, delta_hub, tmp_path):
    engine = engine_at(stores, 0, tmp_path)
    sync = WeightSync(delta_hub.client, tmp_path / "cache")
    prefetch = DeltaPrefetch(sync, lambda: read_manifest(stores["delta"], 1))
    prefetch.start(held=0)
    assert prefetch.take(version=2, held=0) is None  # another version: not used (and dropped)
    prefetch.start(held=0)
    deltas = prefetch.take(version=1, held=0)
    assert deltas == deltas_of(stores["delta"], 1)[0]
    since = len(delta_hub.proxy.exchanges)
    assert load_in_place(engine, sync, read_manifest(stores["delta"], 1), held=0, deltas=deltas) is not None
    assert not [e for e in delta_hub.proxy.exchanges[since:] if "/files/" in e.path], "nothing downloaded again"
    assert_same_bits(bits(engine), reference[1], "v1 from prefetched deltas")


LOCKSTEP = {"trainer": {"prompts_per_step": 2, "micro_batch_size": 4}, "async": {"max_staleness": 0}}


def test_worker_follows_a_delta_run_in_place(tiny_model_dir, tmp_path):
    """A worker (hf engine) at v0 gets delta v1 in place: no shard downloaded or rebuilt, and its v1
    completions carry v1's logprobs (the real hub, the trainer's side played by the test)."""
    from helpers.worker import accepted, check_logprobs, start_worker
    from safetensors.torch import load_file

    from rl.weights.files import TensorSpec
    from rl.weights.store import PolicyWriter, write_base

    states = sparse_steps(load_file(str(tiny_model_dir / "model.safetensors")), steps=1)
    policy = RunDir(tmp_path / "run").policy
    write_base(policy, tiny_model_dir)
    layout = [TensorSpec(k, tuple(t.shape), torch.float32) for k, t in states[0].items()]
    writer = PolicyWriter(policy, layout, shard_bytes=2**62, fmt="delta")
    writer.write(0, states[0].items())
    with LiveHub(live_config(tmp_path / "run", tiny_model_dir, **LOCKSTEP)) as hub, hub.admin() as trainer:
        thread, result = start_worker(hub.url, tmp_path, max_prompts=4, prompts_per_lease=2)
        assert [g.policy_version for g in trainer.pull(2, step=0, timeout_s=120).groups] == [0, 0]
        writer.write(1, states[1].items())
        trainer.publish(1)
        thread.join(timeout=120)
    assert result["rc"] == 0
    subs = accepted(hub)
    assert [s.policy_version for s in subs] == [0, 1]
    check_logprobs(tiny_model_dir, states[1], hub, subs[1:])
    v1_files = [e.path for e in hub.proxy.exchanges if e.path.startswith("/v1/policy/1/files/")]
    assert v1_files and all(p.endswith(".delta.zst") for p in v1_files)
    assert not (tmp_path / "cache" / "v1").exists(), "applied in place: no v1 rebuilt in the cache"
