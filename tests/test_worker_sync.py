"""WeightSync against the real hub serving a real policy store: verify, re-fetch, resume, cache, prune.

Downloads go through `FaultProxy`, which corrupts bytes or cuts a download halfway when a test asks.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from helpers.hub import WORKER, LiveHub, live_config
from helpers.policy import make_policy_store

from rl.models import sha256_file
from rl.weights import WEIGHTS_FILE, read_manifest, version_dir
from rollout_workers.client import HubClient
from rollout_workers.weight_sync import COMPLETE, WeightSync, WeightSyncError, default_cache_dir


@pytest.fixture(scope="module")
def live(tiny_model_dir, tmp_path_factory):
    run_dir: Path = tmp_path_factory.mktemp("run")
    make_policy_store(tiny_model_dir, run_dir / "policy", versions=3)
    with LiveHub(live_config(run_dir, tiny_model_dir)) as hub:
        yield hub


@pytest.fixture
def policy_dir(live) -> Path:
    return live.hub.policy_dir


@pytest.fixture
def hub(live):
    live.proxy.exchanges.clear()
    live.proxy.corrupt, live.proxy.cut = Counter(), Counter()
    with HubClient(live.url, WORKER, max_backoff_s=0.2) as client:
        live.client = client
        live.policy_dir = live.hub.policy_dir
        yield live


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
