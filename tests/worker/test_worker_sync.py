"""WeightSync against the real hub serving a real policy store: verify, re-fetch, resume, cache, prune;
sharded versions, and delta versions rebuilt bit for bit (or from the keyframe when anything is off).

Every hub here is the real app (`LiveHub`); downloads go through its `FaultProxy`, which corrupts
bytes or cuts a download halfway when a test asks. A version the hub lost is deleted from its disk.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers.hub import WORKER, LiveHub, live_config
from helpers.policy import make_policy_store, make_sharded_store, sparse_steps

from rl.models import sha256_file
from rl.rundir import RunDir
from rl.weights.store import WEIGHTS_FILE, read_manifest, version_dir
from rollout_workers.client import HubClient
from rollout_workers.weight_sync import COMPLETE, WeightSync, WeightSyncError, default_cache_dir


@pytest.fixture(scope="module")
def live(tiny_model_dir, tmp_path_factory):
    run_dir: Path = tmp_path_factory.mktemp("run")
    make_policy_store(tiny_model_dir, RunDir(run_dir).policy, versions=3)
    with LiveHub(live_config(run_dir, tiny_model_dir)) as hub:
        yield hub


@pytest.fixture
def policy_dir(live) -> Path:
    return live.hub.policy_dir


@contextlib.contextmanager
def connected(live: LiveHub) -> Iterator[LiveHub]:
    """`live` with its faults disarmed and its exchanges forgotten, and a worker's client as `live.client`."""
    live.proxy.reset()
    with HubClient(live.url, WORKER, max_backoff_s=0.2) as client:
        live.client = client
        live.policy_dir = live.hub.policy_dir
        yield live


@pytest.fixture
def hub(live):
    with connected(live) as hub:
        yield hub


def weight_gets(hub: LiveHub, version: int) -> list[str | None]:
    """Range headers of the GETs of a version's weights file."""
    return hub.proxy.file_gets(f"/v1/policy/{version}/files/{WEIGHTS_FILE}")


def paths(hub: LiveHub, since: int = 0) -> list[str]:
    return [e.path for e in hub.proxy.exchanges[since:]]


def test_fetch_assembles_loadable_dir(hub, policy_dir, tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    local = WeightSync(hub.client, tmp_path).fetch()
    assert local.version == 2
    assert local.weight_files == [local.model_dir / WEIGHTS_FILE]
    assert sha256_file(local.weight_files[0]) == sha256_file(version_dir(policy_dir, 2) / WEIGHTS_FILE)
    assert AutoConfig.from_pretrained(local.model_dir).tie_word_embeddings
    assert AutoTokenizer.from_pretrained(local.model_dir).eos_token == "<|im_end|>"
    assert not list(tmp_path.rglob("*.part"))
    # Cached: a second fetch downloads nothing, base files are shared by later versions.
    before = len(hub.proxy.exchanges)
    again = WeightSync(hub.client, tmp_path).fetch()
    assert again == local
    assert paths(hub, before) == ["/v1/policy"]
    older = WeightSync(hub.client, tmp_path).fetch(read_manifest(policy_dir, 1))
    assert (older.model_dir / "config.json").stat().st_ino == (local.model_dir / "config.json").stat().st_ino
    assert not any("/base/" in p for p in paths(hub, before))


def test_corrupted_file_is_fetched_again(hub, tmp_path):
    hub.proxy.corrupt.update({WEIGHTS_FILE: 1, "config.json": 1})
    local = WeightSync(hub.client, tmp_path).fetch()
    assert weight_gets(hub, 2) == [None, None]
    assert sorted(hub.proxy.corrupted) == [f"/v1/policy/2/files/{WEIGHTS_FILE}", "/v1/policy/base/files/config.json"]
    assert sha256_file(local.weight_files[0]) == read_manifest(hub.policy_dir, 2).files[0].sha256


def test_always_corrupted_gives_clear_error(hub, tmp_path):
    hub.proxy.corrupt[WEIGHTS_FILE] = 1000
    with pytest.raises(WeightSyncError, match="sha256"):
        WeightSync(hub.client, tmp_path, max_hash_failures=2).fetch()
    assert len(weight_gets(hub, 2)) == 2
    assert WeightSync(hub.client, tmp_path).local(2) is None


def test_cut_download_resumes_with_range(hub, tmp_path):
    size = read_manifest(hub.policy_dir, 2).files[0].size
    hub.proxy.cut[WEIGHTS_FILE] = 1
    sync = WeightSync(hub.client, tmp_path)
    local = sync.fetch()
    assert weight_gets(hub, 2) == [None, f"bytes={size // 2}-"]
    assert sync.bytes_downloaded < size * 1.2 + 10_000  # the first half was not downloaded twice
    assert sha256_file(local.weight_files[0]) == read_manifest(hub.policy_dir, 2).files[0].sha256


def test_stalled_download_times_out_and_resumes(live, tmp_path):
    """A transfer that stops sending halfway with the connection left open (a stalled proxy): the worker's read
    timeout ends the wait, it resumes at the byte it had (Range) and loads the right version."""
    live.proxy.reset()
    size = read_manifest(live.hub.policy_dir, 2).files[0].size
    live.proxy.stall[WEIGHTS_FILE] = 1
    with HubClient(live.url, WORKER, timeout_s=2.0, max_backoff_s=0.2) as client:
        start = time.monotonic()
        local = WeightSync(client, tmp_path).fetch()
        took = time.monotonic() - start
    timing = f"stalled download detected by the 2 s read timeout and completed in {took:.1f} s"
    assert live.proxy.file_gets(f"/v1/policy/2/files/{WEIGHTS_FILE}") == [None, f"bytes={size // 2}-"], timing
    assert took < live.proxy.stall_s, f"the worker waited for the stalled connection to drop: {timing}"
    want = read_manifest(live.hub.policy_dir, 2).files[0].sha256
    assert local.version == 2 and sha256_file(local.weight_files[0]) == want, timing
    print(timing)


def test_worker_waiting_on_a_stopped_workers_cache_lock_moves_on(hub, tmp_path, monkeypatch, caplog):
    """Workers on one machine share a cache under a lock: one stopped (SIGSTOP) while holding it does not stall
    the others forever. They say who holds it, then move to a cache of their own and fetch the version."""
    import rollout_workers.weight_sync as ws

    monkeypatch.setattr(ws, "LOCK_STOPPED_S", 1.0)
    monkeypatch.setattr(ws, "LOCK_REPORT_S", 0.5)
    lock = tmp_path / ".lock"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, time
        f = open({str(lock)!r}, "a+")
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0); f.truncate(); f.write(f"{{os.getpid()}}\\n"); f.flush()
        print("locked", flush=True)
        time.sleep(120)
    """)], stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        holder.send_signal(signal.SIGSTOP)
        with caplog.at_level("WARNING", logger="rollout_workers.weight_sync"):
            local = WeightSync(hub.client, tmp_path).fetch()
    finally:
        holder.send_signal(signal.SIGCONT)
        holder.kill()
        holder.wait()
    assert local.version == 2 and local.model_dir.is_relative_to(tmp_path / ws.PRIVATE)
    text = caplog.text
    assert f"locked by pid {holder.pid} (state T)" in text and "a cache of its own" in text, text


def test_leftover_part_file_resumes(hub, tmp_path):
    src = version_dir(hub.policy_dir, 2) / WEIGHTS_FILE
    part = tmp_path / "v2" / f"{WEIGHTS_FILE}.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(src.read_bytes()[:1000])
    WeightSync(hub.client, tmp_path).fetch()
    assert weight_gets(hub, 2) == ["bytes=1000-"]
    # A bad leftover (not a prefix) fails the hash once and is fetched whole.
    part = tmp_path / "v1" / f"{WEIGHTS_FILE}.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"x" * 1000)
    WeightSync(hub.client, tmp_path).fetch(read_manifest(hub.policy_dir, 1))
    assert weight_gets(hub, 1) == ["bytes=1000-", None]


def test_vanished_version_falls_back_to_latest(hub, tmp_path):
    stale = read_manifest(hub.policy_dir, 2).model_copy(update={"version": 7})
    local = WeightSync(hub.client, tmp_path).fetch(stale)
    assert local.version == 2


def test_prune_keeps_in_use_and_newest(hub, policy_dir, tmp_path):
    sync = WeightSync(hub.client, tmp_path)
    for v in range(3):
        sync.fetch(read_manifest(policy_dir, v))
    assert sync.prune(keep={0}, keep_latest=1) == [1]
    assert sync.local(0) and sync.local(2) and not (tmp_path / "v1").exists()
    assert (tmp_path / "base" / "config.json").is_file()


def test_unsafe_names_and_default_dir(hub, tmp_path, monkeypatch):
    bad = read_manifest(hub.policy_dir, 2)
    bad.files[0].name = "../evil"
    with pytest.raises(WeightSyncError, match="unsafe"):
        WeightSync(hub.client, tmp_path).fetch(bad)
    monkeypatch.setenv("SCATTER_RL_CACHE", str(tmp_path))
    assert default_cache_dir("https://trainer.example:8443/") == tmp_path / "worker" / "trainer.example-8443"
    assert default_cache_dir("http://10.0.0.1") == tmp_path / "worker" / "10.0.0.1-80"


def test_cached_version_from_another_run_is_not_reused(hub, policy_dir, tmp_path):
    """The cache is keyed by hub address + version: a v2 with other hashes must be downloaded again."""
    local = WeightSync(hub.client, tmp_path).fetch()
    assert local.version == 2
    other = read_manifest(policy_dir, 1).model_copy(update={"version": 2})  # "v2" of another run
    (local.model_dir / COMPLETE).write_text(other.model_dump_json())
    before = len(weight_gets(hub, 2))
    again = WeightSync(hub.client, tmp_path).fetch()
    assert len(weight_gets(hub, 2)) == before + 1
    assert sha256_file(again.weight_files[0]) == read_manifest(policy_dir, 2).files[0].sha256


# --------------------------------------------------------------------------- sharded and delta versions

VERSIONS = 6


def random_bits(shape, generator) -> torch.Tensor:
    """float32 tensor of uniformly random bit patterns (NaNs included): incompressible."""
    return torch.randint(-(2**31), 2**31 - 1, shape, generator=generator, dtype=torch.int32).view(torch.float32)


@pytest.fixture(scope="module")
def stores(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """The same 6 versions (sparse bf16 updates, one dense) as full and as delta versions, in >= 3 shards each:
    the policy directories of two runs (`<run>/policy`)."""
    from safetensors.torch import load_file

    states = sparse_steps(load_file(str(tiny_model_dir / "model.safetensors")), steps=VERSIONS - 1)
    # v5 draws the last layer anew (every element, random bits): the shard holding only it ships whole.
    g = torch.Generator().manual_seed(99)
    states[-1] = {k: random_bits(t.shape, g) if k.startswith(("model.layers.1.", "model.norm")) else t
                  for k, t in states[-1].items()}  # fmt: skip
    shard_bytes = sum(t.numel() * 2 for t in states[0].values()) // 3
    out = {}
    for fmt in ("full", "delta"):
        out[fmt] = RunDir(tmp_path_factory.mktemp(fmt)).policy
        make_sharded_store(tiny_model_dir, out[fmt], states, fmt=fmt, shard_bytes=shard_bytes, keyframe_every=4)
    return out


@pytest.fixture(scope="module")
def sharded(stores, tiny_model_dir) -> Iterator[dict[str, LiveHub]]:
    """A real hub for each store, by format."""
    with contextlib.ExitStack() as stack:
        yield {fmt: stack.enter_context(LiveHub(live_config(policy.parent, tiny_model_dir)))
               for fmt, policy in stores.items()}  # fmt: skip


@pytest.fixture
def full_hub(sharded) -> Iterator[LiveHub]:
    with connected(sharded["full"]) as hub:
        yield hub


@pytest.fixture
def delta_hub(sharded) -> Iterator[LiveHub]:
    with connected(sharded["delta"]) as hub:
        yield hub


def shard_bytes_of(local) -> list[bytes]:
    return [p.read_bytes() for p in local.weight_files]


def test_sharded_full_version_loads_in_transformers(full_hub, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    local = WeightSync(full_hub.client, tmp_path).fetch()
    assert local.version == VERSIONS - 1
    assert len(local.weight_files) >= 3
    model, info = AutoModelForCausalLM.from_pretrained(local.model_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    shards = {}
    for p in local.weight_files:
        shards.update(load_file(str(p)))
    for name, tensor in model.state_dict().items():
        if name in shards:  # bit patterns: v5 holds NaNs
            assert torch.equal(tensor.to(torch.bfloat16).view(torch.int16), shards[name].view(torch.int16))


def test_delta_worker_is_bit_identical_to_full_worker(stores, full_hub, delta_hub, tmp_path):
    """Follow every version in both formats: the delta worker rebuilds exactly the full worker's shards."""
    full_sync = WeightSync(full_hub.client, tmp_path / "full")
    delta_sync = WeightSync(delta_hub.client, tmp_path / "delta")
    for v in range(VERSIONS):
        a = full_sync.fetch(read_manifest(stores["full"], v))
        b = delta_sync.fetch(read_manifest(stores["delta"], v))
        assert [p.name for p in a.weight_files] == [p.name for p in b.weight_files]
        assert shard_bytes_of(a) == shard_bytes_of(b), f"v{v} differs"
        assert (b.model_dir / "model.safetensors.index.json").is_file()
        assert not list(b.model_dir.glob("*.delta.zst"))  # applied, then removed
    assert any(f.name.endswith(".safetensors") for f in read_manifest(stores["delta"], 5).files)
    # Deltas cost a fraction of the full versions; only v0 (and v5's dense part) cost a full shard.
    assert delta_sync.bytes_downloaded < 0.5 * full_sync.bytes_downloaded
    fetched = {p.split("/")[3] for p in paths(delta_hub) if "/files/" in p and "/base/" not in p}
    assert fetched == {str(v) for v in range(VERSIONS)}
    # Keyframe v4 came as its deltas from v3: only v0 (and v5's dense shards) were downloaded whole.
    whole = {p.split("/")[3] for p in paths(delta_hub) if p.endswith(".safetensors")}
    assert whole == {"0", "5"}


def test_late_worker_rebuilds_from_keyframe(stores, full_hub, delta_hub, tmp_path):
    """A worker that joins at v3 (delta; keyframe v0) downloads v0 whole and the deltas v1..v3."""
    local = WeightSync(delta_hub.client, tmp_path / "late").fetch(read_manifest(stores["delta"], 3))
    reference = WeightSync(full_hub.client, tmp_path / "ref").fetch(read_manifest(stores["full"], 3))
    assert local.version == 3 and shard_bytes_of(local) == shard_bytes_of(reference)
    assert [p for p in paths(delta_hub) if p.startswith("/v1/policy/") and "/files/" not in p] == [
        "/v1/policy/2", "/v1/policy/1", "/v1/policy/0"]  # fmt: skip
    shard_gets = {p for p in paths(delta_hub) if p.endswith(".safetensors")}
    assert shard_gets and all(p.startswith("/v1/policy/0/") for p in shard_gets)


def test_corrupt_cached_base_falls_back_to_keyframe(stores, full_hub, delta_hub, tmp_path, caplog):
    """A cached base whose bytes rotted (same size): the rebuilt shard's hash fails, the worker
    starts over from the keyframe and still ends with exactly the right version."""
    sync = WeightSync(delta_hub.client, tmp_path / "w")
    held = sync.fetch(read_manifest(stores["delta"], 2))
    data = bytearray(held.weight_files[0].read_bytes())
    data[-3] ^= 0x01  # inside the last tensor
    held.weight_files[0].unlink()  # (a hard link may share the inode with v1's shard)
    held.weight_files[0].write_bytes(bytes(data))
    delta_hub.proxy.exchanges.clear()
    with caplog.at_level("WARNING"):
        local = sync.fetch(read_manifest(stores["delta"], 3))
    reference = WeightSync(full_hub.client, tmp_path / "ref").fetch(read_manifest(stores["full"], 3))
    assert shard_bytes_of(local) == shard_bytes_of(reference)
    assert "starting over from keyframe v0" in caplog.text
    assert any(p.startswith("/v1/policy/0/files/model-") for p in paths(delta_hub))


def test_hash_mismatched_delta_is_fetched_again_then_refused(stores, delta_hub, tmp_path):
    delta_name = read_manifest(stores["delta"], 1).files[0].name
    assert delta_name.endswith(".delta.zst")
    sync = WeightSync(delta_hub.client, tmp_path, max_hash_failures=2)
    sync.fetch(read_manifest(stores["delta"], 0))
    delta_hub.proxy.corrupt[delta_name] = 1
    assert sync.fetch(read_manifest(stores["delta"], 1)).version == 1  # one bad copy: fetched again
    assert delta_hub.proxy.corrupted == [f"/v1/policy/1/files/{delta_name}"]
    delta_hub.proxy.corrupt[read_manifest(stores["delta"], 2).files[0].name] = 1000  # every copy is bad
    with pytest.raises(WeightSyncError, match="could not be rebuilt from its keyframe"):
        sync.fetch(read_manifest(stores["delta"], 2))
    assert sync.local(2) is None  # nothing half-built is taken for a version


def test_delta_whose_chain_the_hub_lost_moves_to_the_latest(stores, full_hub, tiny_model_dir, tmp_path):
    """Rebuilding v3 needs v2's manifest, which the hub no longer has (deleted from its disk: 404): the
    worker does not guess; it takes the hub's latest version instead (keyframe v4 + delta v5), exactly."""
    policy = RunDir(tmp_path / "run").policy
    shutil.copytree(stores["delta"], policy)  # this hub loses a version: not the store other tests share
    with LiveHub(live_config(policy.parent, tiny_model_dir)) as live, connected(live) as hub:
        sync = WeightSync(hub.client, tmp_path / "w")
        sync.fetch(read_manifest(policy, 1))
        v3 = read_manifest(policy, 3)
        shutil.rmtree(version_dir(policy, 2))  # garbage-collected meanwhile
        local = sync.fetch(v3)
        assert hub.proxy.calls("GET", "/v1/policy/2", 404)
    reference = WeightSync(full_hub.client, tmp_path / "ref").fetch(read_manifest(stores["full"], 5))
    assert local.version == 5 and shard_bytes_of(local) == shard_bytes_of(reference)
    assert sync.local(3) is None


def test_worker_on_the_hub_machine_links_files_and_still_verifies(stores, delta_hub, full_hub, tmp_path):
    """With the hub's policy directory at hand, version files are hard-linked, not downloaded; a file
    there that does not match the manifest is downloaded instead."""
    hub_dir = tmp_path / "hub-policy"
    shutil.copytree(stores["delta"], hub_dir)
    hub = delta_hub

    def downloads() -> list[str]:
        return [e.path for e in hub.proxy.exchanges if "/files/" in e.path and "/base/" not in e.path]

    sync = WeightSync(hub.client, tmp_path / "w", hub_policy_dir=hub_dir)
    for v in range(3):
        local = sync.fetch(read_manifest(stores["delta"], v))
    assert not downloads()
    assert sync.bytes_local > 0
    v0 = read_manifest(stores["delta"], 0).shards[0].name
    assert (sync.version_dir(0) / v0).stat().st_ino == (hub_dir / "v0" / v0).stat().st_ino
    # A rotted file in the hub's directory (same size) is caught by the hash and downloaded.
    bad = read_manifest(stores["delta"], 3).files[0].name
    data = bytearray((hub_dir / "v3" / bad).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (hub_dir / "v3" / bad).write_bytes(bytes(data))
    local = sync.fetch(read_manifest(stores["delta"], 3))
    assert downloads() == [f"/v1/policy/3/files/{bad}"]
    reference = WeightSync(full_hub.client, tmp_path / "ref").fetch(read_manifest(stores["full"], 3))
    assert shard_bytes_of(local) == shard_bytes_of(reference)


def test_keyframe_comes_as_deltas_unless_they_fail(stores, delta_hub, full_hub, tmp_path, caplog):
    """v4 is a keyframe: a worker holding v3 applies its deltas; with a delta that never arrives intact
    it downloads the keyframe whole instead, and either way holds exactly v4."""
    keyframe = read_manifest(stores["delta"], 4)
    assert keyframe.format == "full" and keyframe.base_version == 3 and keyframe.deltas
    hub = delta_hub
    reference = WeightSync(full_hub.client, tmp_path / "ref").fetch(read_manifest(stores["full"], 4))
    for case in ("deltas", "corrupt"):
        sync = WeightSync(hub.client, tmp_path / case, max_hash_failures=1)
        sync.fetch(read_manifest(stores["delta"], 3))
        if case == "corrupt":
            hub.proxy.corrupt[keyframe.deltas[0].name] = 1000
        hub.proxy.exchanges.clear()
        with caplog.at_level("WARNING"):
            local = sync.fetch(keyframe)
        assert shard_bytes_of(local) == shard_bytes_of(reference)
        whole = [e.path for e in hub.proxy.exchanges if e.path.endswith(".safetensors")]
        assert bool(whole) == (case == "corrupt"), (case, whole)
    assert "downloading it whole" in caplog.text
