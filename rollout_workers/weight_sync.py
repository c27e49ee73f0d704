"""Download policy versions from the hub into a local cache, verified and resumable.

Cache layout (default `~/.cache/scatter-rl/worker/<host>-<port>/`, or
`$SCATTER_RL_CACHE/worker/...`, or `cache_dir`):

  base/                 config + tokenizer files (`GET /v1/policy/base/files/{name}`)
  base/.verified.json   the base entries already checked, so they are not hashed again
  v<N>/                 a loadable HF directory: the version's weight files
                        (`GET /v1/policy/{N}/files/{name}`) + hard links to base/
  v<N>/.complete        written last: the version is whole and verified
  .lock                 flock: workers on one machine share the cache safely

A file is streamed into `<name>.part`; after a dropped connection the next
attempt continues it with an HTTP Range request. Every file is checked against
the manifest's sha256; a mismatch deletes the part and fetches again, up to
`max_hash_failures` times, then `WeightSyncError`. Transport errors and 5xx
are retried like every other hub call (HubClient policy). `prune` removes
versions that are no longer needed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

import httpx

from rl.protocol import PolicyFile, PolicyManifest
from rollout_workers.client import HubClient, HubError

log = logging.getLogger(__name__)

COMPLETE = ".complete"
VERIFIED = ".verified.json"
CHUNK = 1 << 20


class WeightSyncError(RuntimeError):
    """A policy version could not be downloaded intact."""


@dataclass(frozen=True)
class LocalPolicy:
    """A downloaded, verified policy version."""

    version: int
    model_dir: Path
    """A normal HF directory (config, tokenizer, weights): what an engine starts from."""
    weight_files: list[Path]
    """The version's weight files inside `model_dir` (what an engine reloads)."""


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

    def __init__(self, client: HubClient, cache_dir: Path | None = None, *, max_hash_failures: int = 3) -> None:
        self.client = client
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir(client.base_url)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.max_hash_failures = max_hash_failures
        self.bytes_downloaded = 0

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.cache_dir / ".lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def version_dir(self, version: int) -> Path:
        return self.cache_dir / f"v{version}"

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
            _fingerprint(manifest.files) != _fingerprint(expected.files)
            or _fingerprint(manifest.base_files) != _fingerprint(expected.base_files)
        ):
            log.info("cached policy v%d is not the hub's v%d (different hashes); downloading again", version, version)
            return None
        files = [vdir / f.name for f in manifest.files]
        if not all(p.is_file() and p.stat().st_size == f.size for p, f in zip(files, manifest.files, strict=True)):
            return None
        if manifest.format == "lora":  # the engine loads the merged weights, not the adapters
            files = sorted(p for p in vdir.glob("*.safetensors") if p.name != "adapter.safetensors")
            if not files:
                return None
        return LocalPolicy(version=version, model_dir=vdir, weight_files=files)

    def fetch(self, manifest: PolicyManifest | None = None) -> LocalPolicy:
        """Download the version of `manifest` (default: the hub's latest) unless cached; return it.

        If the hub garbage-collected that version meanwhile (404), the latest manifest is fetched again.
        """
        for _ in range(5):
            manifest = manifest or self.client.policy()
            if manifest.format not in ("full", "lora"):
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
            start, before = time.perf_counter(), self.bytes_downloaded
            base = self.cache_dir / "base"
            self._sync_base(base, manifest.base_files)
            vdir = self.version_dir(manifest.version)
            (vdir / COMPLETE).unlink(missing_ok=True)
            for old in vdir.glob("*") if vdir.is_dir() else []:
                if old.is_file() and not old.name.endswith(".part"):
                    old.unlink()  # stale files of another v<N>; never rewrite a hard-linked inode in place
            vdir.mkdir(parents=True, exist_ok=True)
            for entry in manifest.files:
                name = _safe_name(entry.name)
                self._download(f"/v1/policy/{manifest.version}/files/{quote(name)}", vdir / name, entry)
            weight_names = {f.name for f in manifest.files}
            for entry in manifest.base_files:
                if entry.name not in weight_names:
                    _link(base / entry.name, vdir / entry.name)
            (vdir / COMPLETE).write_text(manifest.model_dump_json())
            size = self.bytes_downloaded - before
            seconds = time.perf_counter() - start
            log.info(
                "downloaded policy v%d: %.1f MB in %.1f s (%.1f MB/s)",
                manifest.version,
                size / 1e6,
                seconds,
                size / 1e6 / max(seconds, 1e-9),
            )
            return LocalPolicy(manifest.version, vdir, [vdir / f.name for f in manifest.files])

    def _fetch_lora(self, manifest: PolicyManifest) -> LocalPolicy:
        """A `lora` version: its full base version (cached after the first time), the adapters (a few MB,
        sha256-checked), merged here into a normal HF directory the engine loads (rl/lora.py)."""
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        from rl.lora import ADAPTER_FILE, merge_adapter

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
            adapter = vdir / ADAPTER_FILE
            if not adapter.is_file():
                raise WeightSyncError(f"lora policy v{manifest.version} has no {ADAPTER_FILE}")
            with safe_open(adapter, "pt") as f:
                scaling = float((f.metadata() or {}).get("scaling", "nan"))
            if not scaling == scaling:  # NaN: no scaling recorded
                raise WeightSyncError(f"{adapter}: no 'scaling' in its metadata (not a scatter-rl adapter file)")
            adapters = load_file(adapter)
            placed = set()
            for path in base.weight_files:
                mine = _adapters_for(adapters, path)
                placed |= set(mine)
                try:
                    merged = merge_adapter(load_file(path), mine, scaling)
                except ValueError as e:
                    raise WeightSyncError(
                        f"lora policy v{manifest.version} does not fit base v{base.version}: {e}"
                    ) from e
                tmp = vdir / f"{path.name}.merging"
                save_file(merged, str(tmp), metadata={"format": "pt", "policy_version": str(manifest.version)})
                os.replace(tmp, vdir / path.name)
            if stray := sorted(set(adapters) - placed):
                raise WeightSyncError(f"lora policy v{manifest.version}: no base weight for adapters {stray[:4]}")
            for p in base.model_dir.iterdir():
                if p.is_file() and not p.name.startswith(".") and not (vdir / p.name).exists():
                    _link(p, vdir / p.name)
            (vdir / COMPLETE).write_text(manifest.model_dump_json())
            log.info("merged lora policy v%d into base v%d in %.1f s", manifest.version, base.version,
                     time.perf_counter() - start)  # fmt: skip
            return LocalPolicy(manifest.version, vdir, [vdir / p.name for p in base.weight_files])

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

    def _download(self, url_path: str, dest: Path, entry: PolicyFile) -> None:
        """Stream `url_path` into `dest`, resuming `dest.part`, verifying size and sha256."""
        part = dest.with_name(dest.name + ".part")
        for failure in range(1, self.max_hash_failures + 1):
            self.client.with_retries(lambda: self._stream_into(url_path, part, entry))
            digest = _sha256(part)
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

    def _stream_into(self, url_path: str, part: Path, entry: PolicyFile) -> None:
        """Fill `part` up to `entry.size` bytes; raises transport errors so the caller retries (resumes)."""
        offset = part.stat().st_size if part.exists() else 0
        if offset > entry.size:
            part.unlink()
            offset = 0
        if offset == entry.size:
            return
        headers = {"Range": f"bytes={offset}-"} if offset else None
        if offset:
            log.info("resuming %s at byte %d of %d", entry.name, offset, entry.size)
        try:
            with self.client.stream(url_path, headers=headers) as response:
                if offset and response.status_code != 206:
                    offset = 0  # the server ignored the Range: start over
                with open(part, "ab" if offset else "wb") as f:
                    for chunk in response.iter_bytes():  # unbuffered: a cut keeps what arrived
                        f.write(chunk)
                        self.bytes_downloaded += len(chunk)
        except HubError as e:
            if e.status != 416 or not offset:
                raise
            log.warning("%s: the hub refused to resume at byte %d; starting over", entry.name, offset)
            part.unlink(missing_ok=True)
            return self._stream_into(url_path, part, entry)
        written = part.stat().st_size
        if written < entry.size:
            raise httpx.ReadError(f"{entry.name}: connection ended at byte {written} of {entry.size}")

    def prune(self, keep: set[int], keep_latest: int = 2) -> list[int]:
        """Delete cached versions not in `keep` and not among the `keep_latest` newest; returns them."""
        with self._locked():
            versions = sorted(int(p.name[1:]) for p in self.cache_dir.glob("v*") if p.is_dir() and p.name[1:].isdigit())
            removed = [v for v in versions[: max(0, len(versions) - keep_latest)] if v not in keep]
            for v in removed:
                shutil.rmtree(self.version_dir(v), ignore_errors=True)
        if removed:
            log.info("removed cached policy versions %s", removed)
        return removed


def _adapters_for(adapters: dict, weights_path: Path) -> dict:
    """The adapters whose base weights live in the file `weights_path` (all of them for one file)."""
    from safetensors import safe_open

    with safe_open(weights_path, "pt") as f:
        names = set(f.keys())
    return {k: v for k, v in adapters.items() if f"{k.rsplit('.', 1)[0]}.weight" in names}


def _link(src: Path, dst: Path) -> None:
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


__all__ = ["LocalPolicy", "WeightSync", "WeightSyncError", "default_cache_dir"]


def _fingerprint(files: list[PolicyFile]) -> list[tuple[str, str]]:
    return sorted((f.name, f.sha256) for f in files)
