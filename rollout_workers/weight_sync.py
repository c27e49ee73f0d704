"""A worker's copy of the hub's policy versions: fetched, verified byte for byte, cached, resumable.

`WeightSync.fetch(manifest)` makes a version loadable under `cache_dir` (default
`~/.cache/scatter-rl/worker/<host>-<port>/`): `base/` (config, tokenizer), `v<N>/` (a normal HF
directory; `.complete` written last) and `.lock` (workers on one machine share the cache).
Each file comes from the first source that has it intact: the worker's own base model
(`blobs/`), the hub's policy directory on the same machine ($SCATTER_RL_HUB_POLICY_DIR), a
mirror by sha256 (`weights_url`, never trusted), then the hub itself, resumed with HTTP Range;
every file is checked against the manifest's sha256. rl/weights/apply.py turns the files into
shards (deltas, LoRA merges); a delta chain that fails is rebuilt from its keyframe, and then
`WeightSyncError`: never a silently wrong model. More in docs/operations.md, "The worker's cache".
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import get_args
from urllib.parse import quote, urlsplit

from rl.config import WeightsFormat
from rl.models import sha256_file
from rl.weights.apply import (
    delta_chain,
    delta_files,
    link_or_copy,
    loadable_shards,
    merge_lora,
    rebuild_from_deltas,
)
from rl.weights.files import DELTA_SUFFIX, WeightFileError
from rl.weights.store import BASE, version_dir, version_numbers
from rl.wire.protocol import PolicyFile, PolicyManifest
from rl.wire.waits import process_state
from rollout_workers.base_model import seed_from_base_model
from rollout_workers.client import HubClient, HubError
from rollout_workers.mirror import Mirror
from rollout_workers.transfer import from_mirror, stream_into

log = logging.getLogger(__name__)

COMPLETE = ".complete"
HUB_POLICY_DIR_ENV = "SCATTER_RL_HUB_POLICY_DIR"
VERIFIED = ".verified.json"
PRIVATE = "private"
"""Under the shared cache: the caches of workers that gave up waiting for its lock (`<host>-<pid>/`)."""
LOCK_STOPPED_S = 30.0
"""A worker holding the shared cache's lock stopped this long: the waiting worker moves to a cache of its own."""
LOCK_REPORT_S = 10.0
"""Seconds between log lines while a worker waits for the cache lock."""


class WeightSyncError(RuntimeError):
    """A policy version could not be downloaded intact."""


@dataclass(frozen=True)
class LocalPolicy:
    """A downloaded, verified policy version."""

    version: int
    model_dir: Path
    """A normal HF directory (config, tokenizer, weights): what an engine starts from."""
    weight_files: list[Path]
    """The version's safetensors shards inside `model_dir`, in order (what an engine reloads)."""


def default_cache_dir(hub_url: str) -> Path:
    root = Path(os.environ.get("SCATTER_RL_CACHE") or Path.home() / ".cache" / "scatter-rl")
    parts = urlsplit(hub_url if "://" in hub_url else f"http://{hub_url}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = (parts.hostname or "hub").replace(":", "_")
    return root / "worker" / f"{host}-{port}"


def _safe_name(name: str) -> str:
    if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith("."):
        raise WeightSyncError(f"the hub sent an unsafe file name {name!r}")
    return name


class WeightSync:
    """Fetches policy versions for one hub into `cache_dir`."""

    def __init__(
        self,
        client: HubClient,
        cache_dir: Path | None = None,
        *,
        max_hash_failures: int = 3,
        weights_url: str | None = None,
        base_model: Path | None = None,
        hub_policy_dir: Path | None = None,
    ) -> None:
        """`hub_policy_dir` (default: $SCATTER_RL_HUB_POLICY_DIR): the hub's own policy directory, for a worker
        on the hub's machine: version files are hard-linked (or copied) from there and hashed like downloads."""
        self.client = client
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir(client.base_url)
        local = hub_policy_dir or os.environ.get(HUB_POLICY_DIR_ENV)
        self.hub_policy_dir = Path(local) if local else None
        self.bytes_local = 0
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.max_hash_failures = max_hash_failures
        self.weights_url = weights_url
        """Mirror to try first; None: the one the hub advertised at registration, if any."""
        self._mirror: Mirror | None = None
        self.bytes_downloaded = 0
        self.bytes_from: Counter[str] = Counter()
        """Bytes per source: "mirror" (including discarded ones), "hub", and "local" (from `base_model`)."""
        self.base_model = Path(base_model) if base_model else None
        """A local copy of the base model: the hub's version-0 shards are written from it, not downloaded."""
        self._base_model_checked = False

    @property
    def base_dir(self) -> Path:
        """The verified config and tokenizer files, linked into every version directory."""
        return self.cache_dir / BASE

    @property
    def blob_dir(self) -> Path:
        """Files by sha256 this worker already has (written from `base_model`)."""
        return self.cache_dir / "blobs"

    def _use_base_model(self, manifest: PolicyManifest) -> None:
        """Once per process: write the hub's base shards from `base_model` into `blob_dir`, keeping matches."""
        if self.base_model is not None and not self._base_model_checked:
            self._base_model_checked = True
            seed_from_base_model(self.client, self.base_model, manifest.base_files, self.blob_dir)

    def _from_local(self, dest: Path, entry: PolicyFile) -> bool:
        """Link `dest` to a file with `entry`'s hash this worker already has (from `base_model`)."""
        blob = self.blob_dir / entry.sha256
        if not blob.is_file() or blob.stat().st_size != entry.size:
            return False
        link_or_copy(blob, dest)
        dest.with_name(dest.name + ".part").unlink(missing_ok=True)
        self.bytes_from["local"] += entry.size
        return True

    def mirror(self) -> Mirror | None:
        """The mirror in use: `weights_url`, else the hub's advertised one (known after registering)."""
        registration = self.client.registration
        url = self.weights_url or (registration.weights_url if registration is not None else None)
        if not url:
            return None
        if self._mirror is None or self._mirror.url != url.rstrip("/"):
            if self._mirror is not None:
                self._mirror.close()
            self._mirror = Mirror(url, lambda: self.client.http.headers.get("authorization"))
            log.info("policy files come from mirror %s first (checked against the hub's hashes)", url)
        return self._mirror

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the cache's lock (its file names the holder's pid). While another process holds it, say so every
        `LOCK_REPORT_S`; if that process is stopped (SIGSTOP, a debugger) for `LOCK_STOPPED_S`, this worker moves
        to a cache of its own and goes on."""
        while True:
            with open(self.cache_dir / ".lock", "a+") as lock:
                if self._acquire(lock):
                    lock.seek(0)
                    lock.truncate()
                    lock.write(f"{os.getpid()}\n")
                    lock.flush()
                    try:
                        yield
                    finally:
                        fcntl.flock(lock, fcntl.LOCK_UN)
                    return
                holder = _holder(lock)
            private = self.cache_dir / PRIVATE / f"{socket.gethostname()}-{os.getpid()}"
            log.error("the worker cache %s is locked by %s, stopped for %.0f s: this worker uses a cache of its own "
                      "from now on, %s", self.cache_dir, holder, LOCK_STOPPED_S, private)  # fmt: skip
            self.cache_dir = private
            private.mkdir(parents=True, exist_ok=True)

    def _acquire(self, lock) -> bool:
        """The cache lock (True), or False once its holder has been stopped for `LOCK_STOPPED_S`."""
        start = reported = time.monotonic()
        stopped_since = None
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                pass
            now, holder = time.monotonic(), _holder(lock)
            stopped = holder.endswith("(state T)") or holder.endswith("(state t)")
            stopped_since = (stopped_since or now) if stopped else None
            if stopped_since is not None and now - stopped_since >= LOCK_STOPPED_S:
                return False
            if now - reported >= LOCK_REPORT_S:
                reported = now
                log.warning("waiting for the worker cache %s, locked by %s: %.0f s so far", self.cache_dir, holder,
                            now - start)  # fmt: skip
            time.sleep(0.2)

    def version_dir(self, version: int) -> Path:
        return version_dir(self.cache_dir, version)

    def local(self, version: int, expected: PolicyManifest | None = None) -> LocalPolicy | None:
        """The cached version if it is complete (and has `expected`'s files and hashes), else None.

        The cache is keyed by hub address and version number only: another run served at the same
        address (or a resumed one) can publish a different v<N>, so a hit must match the hashes.
        """
        vdir = self.version_dir(version)
        marker = vdir / COMPLETE
        if not marker.is_file():
            return None
        try:
            manifest = PolicyManifest.model_validate_json(marker.read_text())
        except ValueError:
            return None
        if expected is not None and (
            _fingerprint(manifest.full_shards()) != _fingerprint(expected.full_shards())
            or _fingerprint(manifest.base_files) != _fingerprint(expected.base_files)
        ):
            log.info("cached policy v%d is not the hub's v%d (different hashes); downloading again", version, version)
            return None
        files = loadable_shards(manifest, vdir)
        if files is None:
            return None
        return LocalPolicy(version=version, model_dir=vdir, weight_files=files)

    def cached_manifest(self, version: int) -> PolicyManifest | None:
        """The manifest a complete cached version was verified against."""
        try:
            return PolicyManifest.model_validate_json((self.version_dir(version) / COMPLETE).read_text())
        except (OSError, ValueError):
            return None

    def fetch(self, manifest: PolicyManifest | None = None) -> LocalPolicy:
        """Download the version of `manifest` (default: the hub's latest) unless cached; return it.

        If the hub garbage-collected that version meanwhile (404), the latest manifest is fetched again.
        """
        for _ in range(5):
            manifest = manifest or self.client.policy()
            if manifest.format not in get_args(WeightsFormat):
                raise WeightSyncError(f"policy format {manifest.format!r} is not supported by this worker yet")
            try:
                return self._fetch_lora(manifest) if manifest.format == "lora" else self._fetch(manifest)
            except HubError as e:
                if e.status != 404:
                    raise
                log.warning("policy v%d disappeared from the hub (%s); fetching the latest", manifest.version, e)
                shutil.rmtree(self.version_dir(manifest.version), ignore_errors=True)
                manifest = None
        raise WeightSyncError("the hub kept removing policy versions while they were downloaded")

    def _fetch(self, manifest: PolicyManifest) -> LocalPolicy:
        with self._locked():
            cached = self.local(manifest.version, expected=manifest)
            if cached is not None:
                return cached
            start, before, before_from = time.perf_counter(), self.bytes_downloaded, self.bytes_from.copy()
            before_local = self.bytes_local
            self._use_base_model(manifest)
            self._sync_base(self.base_dir, manifest.base_files)
            how = "rebuilt"
            if manifest.format == "delta":
                self._rebuild(manifest)
            elif not (manifest.deltas and self._keyframe_from_deltas(manifest)):
                self._download_full(manifest)
                how = "downloaded"
            size = self.bytes_downloaded - before
            seconds = time.perf_counter() - start
            sources = self.bytes_from - before_from
            log.info(
                "%s policy v%d: %.1f MB downloaded, %.1f MB linked from the hub's directory (full version: "
                "%.1f MB) in %.1f s (%.1f MB/s; %.1f MB from the mirror, %.1f MB from the hub, %.1f MB from the "
                "base model)",
                how,
                manifest.version,
                size / 1e6,
                (self.bytes_local - before_local) / 1e6,
                sum(f.size for f in manifest.full_shards()) / 1e6,
                seconds,
                size / 1e6 / max(seconds, 1e-9),
                sources["mirror"] / 1e6,
                sources["hub"] / 1e6,
                sources["local"] / 1e6,
            )
            local = self.local(manifest.version, expected=manifest)
            assert local is not None, "a version just completed must be complete"
            return local

    def _fresh_version_dir(self, version: int) -> Path:
        vdir = self.version_dir(version)
        (vdir / COMPLETE).unlink(missing_ok=True)
        for old in vdir.glob("*") if vdir.is_dir() else []:
            if old.is_file() and not old.name.endswith(".part"):
                old.unlink()  # stale files of another v<N>; never rewrite a hard-linked inode in place
        vdir.mkdir(parents=True, exist_ok=True)
        return vdir

    def _download_files(self, manifest: PolicyManifest, vdir: Path, files: list[PolicyFile] | None = None) -> None:
        for entry in manifest.files if files is None else files:
            name = _safe_name(entry.name)
            if self._take_local(manifest.version, entry, vdir / name):
                continue
            self._download(f"/v1/policy/{manifest.version}/files/{quote(name)}", vdir / name, entry)

    def _take_local(self, version: int, entry: PolicyFile, dest: Path) -> bool:
        """Link `entry` from the hub's own version directory (same machine) if it is there and intact."""
        if self.hub_policy_dir is None:
            return False
        src = version_dir(self.hub_policy_dir, version) / entry.name
        try:
            if src.stat().st_size != entry.size:
                return False
            link_or_copy(src, dest)
        except OSError:
            return False  # not there (garbage-collected, another machine): download it
        if sha256_file(dest) != entry.sha256:
            log.warning("%s in %s does not match the manifest; downloading it", entry.name, src.parent)
            dest.unlink(missing_ok=True)
            return False
        self.bytes_local += entry.size
        return True

    def _complete(self, manifest: PolicyManifest, vdir: Path) -> None:
        """Link the base files in and mark `vdir` whole."""
        weight_names = {f.name for f in manifest.files} | {f.name for f in manifest.full_shards()}
        for entry in manifest.base_files:
            if entry.name not in weight_names:
                link_or_copy(self.base_dir / entry.name, vdir / entry.name)
        (vdir / COMPLETE).write_text(manifest.model_dump_json())

    def _download_full(self, manifest: PolicyManifest) -> None:
        vdir = self._fresh_version_dir(manifest.version)
        self._download_files(manifest, vdir)
        self._complete(manifest, vdir)

    # ------------------------------------------------------------------ delta versions

    def _rebuild(self, target: PolicyManifest) -> None:
        """Make `target` (a delta version) complete in the cache: from a cached ancestor, else the keyframe."""
        for attempt in ("cached", "keyframe"):
            chain: list[PolicyManifest] = []  # newest first; ends at a version to start from
            try:
                for manifest in delta_chain(target, self.client.policy):
                    chain.append(manifest)
                    cached = attempt == "cached" and len(chain) > 1
                    if cached and self.local(manifest.version, expected=manifest) is not None:
                        break
                start = chain.pop()
                if attempt == "keyframe" or self.local(start.version, expected=start) is None:
                    if start.format != "full":
                        raise WeightFileError(f"v{target.version}: chain ends at v{start.version}, not a keyframe")
                    if attempt == "keyframe" or not (start.deltas and self._keyframe_from_deltas(start)):
                        self._download_full(start)
                for manifest in reversed(chain):
                    self._apply(manifest)
                return
            except (WeightFileError, WeightSyncError) as e:
                bad = e
            except HubError as e:
                if e.status != 404 or attempt == "keyframe":
                    raise
                bad = e
            for manifest in chain:  # drop what this attempt built: the next one starts clean
                shutil.rmtree(self.version_dir(manifest.version), ignore_errors=True)
            if attempt == "cached":
                log.warning(
                    "policy v%d: rebuilding from cached versions failed (%s); starting over from keyframe v%s",
                    target.version,
                    bad,
                    target.keyframe_version,
                )
                if target.keyframe_version is not None:
                    shutil.rmtree(self.version_dir(target.keyframe_version), ignore_errors=True)
        raise WeightSyncError(f"policy v{target.version} could not be rebuilt from its keyframe: {bad}")

    def _keyframe_from_deltas(self, manifest: PolicyManifest) -> bool:
        """A keyframe whose base version we hold: rebuild it from its deltas instead of downloading it."""
        if manifest.base_version is None or self.cached_manifest(manifest.base_version) is None:
            return False
        try:
            self._apply(manifest)
            return True
        except (WeightFileError, WeightSyncError, HubError) as e:
            if isinstance(e, HubError) and e.status != 404:
                raise
            log.warning("keyframe v%d: rebuilding from v%d failed (%s); downloading it whole",
                        manifest.version, manifest.base_version, e)  # fmt: skip
            return False

    def _apply(self, manifest: PolicyManifest) -> None:
        """Rebuild `manifest` (a delta version, or a keyframe's `deltas`) from its cached base version;
        every shard checked by sha256."""
        base_manifest = self.cached_manifest(manifest.base_version)
        base = self.local(manifest.base_version, expected=base_manifest) if base_manifest else None
        if base is None:
            raise WeightFileError(f"base v{manifest.base_version} of v{manifest.version} is not in the cache")
        vdir = self._fresh_version_dir(manifest.version)
        self._download_files(manifest, vdir, delta_files(manifest))
        for entry in manifest.full_shards():
            _safe_name(entry.name)
        rebuild_from_deltas(manifest, base_manifest, base.model_dir, vdir)
        self._complete(manifest, vdir)

    def fetch_deltas(self, manifest: PolicyManifest, held: int) -> list[bytes] | None:
        """The delta files (sha256-checked, in memory) that turn version `held` into `manifest`'s, for an
        engine that applies them in place; None when they cannot: `manifest` does not start from `held`,
        ships a shard whole (a dense change) or has no per-tensor hashes. The cache is left as it is."""
        files = [f for f in delta_files(manifest) if f.name.endswith(DELTA_SUFFIX)]
        whole = [f for f in delta_files(manifest) if f.name.endswith(".safetensors")]
        if manifest.base_version != held or manifest.format not in ("delta", "full") or whole or not files:
            return None
        if not manifest.tensor_sha256 or not manifest.changes_sha256:
            return None
        with self._locked():
            staging = self.cache_dir / f".inplace-v{manifest.version}"
            staging.mkdir(exist_ok=True)
            try:
                self._download_files(manifest, staging, files)
                return [(staging / f.name).read_bytes() for f in files]
            finally:
                shutil.rmtree(staging, ignore_errors=True)

    def _fetch_lora(self, manifest: PolicyManifest) -> LocalPolicy:
        """A `lora` version: its full base version (cached after the first time), the adapters (a few MB,
        sha256-checked), merged here into a normal HF directory the engine loads (rl/weights/apply.py)."""
        if manifest.lora_base_version is None:
            raise WeightSyncError(f"lora policy v{manifest.version} names no base version")
        cached = self.local(manifest.version, expected=manifest)
        if cached is not None:
            return cached
        base = self.fetch(self.client.policy(manifest.lora_base_version))
        with self._locked():
            start = time.perf_counter()
            vdir = self.version_dir(manifest.version)
            (vdir / COMPLETE).unlink(missing_ok=True)
            vdir.mkdir(parents=True, exist_ok=True)
            for entry in manifest.files:
                name = _safe_name(entry.name)
                self._download(f"/v1/policy/{manifest.version}/files/{quote(name)}", vdir / name, entry)
            try:
                merged = merge_lora(manifest, vdir, base.version, base.weight_files)
            except WeightFileError as e:
                raise WeightSyncError(str(e)) from e
            for p in base.model_dir.iterdir():
                if p.is_file() and not p.name.startswith(".") and not (vdir / p.name).exists():
                    link_or_copy(p, vdir / p.name)
            (vdir / COMPLETE).write_text(manifest.model_dump_json())
            log.info("merged lora policy v%d into base v%d in %.1f s", manifest.version, base.version,
                     time.perf_counter() - start)  # fmt: skip
            return LocalPolicy(manifest.version, vdir, merged)

    def _sync_base(self, base: Path, entries: list[PolicyFile]) -> None:
        base.mkdir(parents=True, exist_ok=True)
        record = base / VERIFIED
        try:
            verified = {f["name"]: PolicyFile.model_validate(f) for f in json.loads(record.read_text())}
        except (OSError, ValueError):
            verified = {}
        for entry in entries:
            path = base / _safe_name(entry.name)
            if verified.get(entry.name) == entry and path.is_file() and path.stat().st_size == entry.size:
                continue
            path.unlink(missing_ok=True)  # a changed base file: never rewrite a hard-linked inode in place
            self._download(f"/v1/policy/base/files/{quote(entry.name)}", path, entry)
            verified[entry.name] = entry
            record.write_text(json.dumps([f.model_dump() for f in verified.values()]))

    def _count(self, origin: str, nbytes: int) -> None:
        self.bytes_downloaded += nbytes
        self.bytes_from[origin] += nbytes

    def _download(self, url_path: str, dest: Path, entry: PolicyFile) -> None:
        """Fill `dest` with the file `entry`: from the mirror by hash if there is one, else (or on
        any failure there) from the hub's `url_path`; resuming `dest.part`, verifying size and sha256."""
        if self._from_local(dest, entry):
            return
        part = dest.with_name(dest.name + ".part")
        mirror = self.mirror()
        if mirror is not None and mirror.available() and from_mirror(mirror, part, entry, self._count):
            os.replace(part, dest)
            return
        for failure in range(1, self.max_hash_failures + 1):
            self.client.with_retries(lambda: stream_into(self.client, url_path, part, entry, self._count))
            digest = sha256_file(part)
            if digest == entry.sha256:
                os.replace(part, dest)
                return
            log.warning(
                "%s: sha256 mismatch (got %s, want %s), attempt %d/%d; fetching again",
                entry.name,
                digest[:12],
                entry.sha256[:12],
                failure,
                self.max_hash_failures,
            )
            part.unlink(missing_ok=True)
        raise WeightSyncError(
            f"{entry.name} from {self.client.base_url}{url_path} failed sha256 verification "
            f"{self.max_hash_failures} times (corrupting proxy or disk?)"
        )

    def prune(self, keep: set[int], keep_latest: int = 2) -> list[int]:
        """Delete cached versions not in `keep` and not among the `keep_latest` newest; returns them."""
        with self._locked():
            versions = version_numbers(self.cache_dir)
            removed = [v for v in versions[: max(0, len(versions) - keep_latest)] if v not in keep]
            for v in removed:
                shutil.rmtree(self.version_dir(v), ignore_errors=True)
        if removed:
            log.info("removed cached policy versions %s", removed)
        return removed


__all__ = ["LocalPolicy", "WeightSync", "WeightSyncError", "default_cache_dir"]


def _holder(lock) -> str:
    """Who holds the cache lock: 'pid N (state X)' from the lock file, as far as this machine can tell."""
    lock.seek(0)
    text = lock.read().strip()
    if not text.isdigit():
        return "another process"
    return f"pid {text} (state {process_state(int(text))})"


def _fingerprint(files: list[PolicyFile]) -> list[tuple[str, str]]:
    return sorted((f.name, f.sha256) for f in files)
