"""Content-addressed policy files: `GET /v1/blobs/{sha256}`, cacheable by any HTTP cache.

Every file a manifest lists never changes under its sha256, so the hub also serves it at
`/v1/blobs/<sha256>`, immutable, with a strong `ETag` and `Range` support (docs/protocol.md),
and an HTTP cache in front of the hub relays a version to a whole site (docs/operations.md).
`BlobIndex` maps a hash to a file of a version still on disk; it rescans the manifests only
when the policy directory changed or `RESCAN_AFTER_S` passed, so an unknown hash costs a stat.
It also keeps the base weights' description (`GET /v1/policy/base/weights`): version 0's
shards and tensor layout, in `policy/base-weights.json`, written when version 0 is published
so it outlives that version.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

from pydantic import BaseModel
from starlette.responses import FileResponse, Response

from rl.weights.files import WeightFileError, shard_layout, shard_spec_of
from rl.weights.store import BASE, published_versions, read_manifest, version_dir
from rl.wire.protocol import BaseWeights, HubError, PolicyFile, WeightsServed

log = logging.getLogger(__name__)

SHA256_HEX = re.compile(r"[0-9a-f]{64}")
BASE_WEIGHTS = "base-weights.json"
BASE_VERSION = 0
"""The version a worker's `--base-model` is compared with: the weights before any optimizer step."""
RESCAN_AFTER_S = 2.0
"""A miss rescans anyway after this long (a filesystem with coarse timestamps may hide a change)."""
CACHE_CONTROL = "public, max-age=31536000, immutable"
"""One year (the customary maximum) and `immutable`: the bytes under a hash never change, so never revalidate."""


def manifest_files(manifest: BaseModel) -> Iterator[PolicyFile]:
    """Every `PolicyFile` in a manifest but its base files, wherever the manifest lists it.

    Walks the model instead of naming fields, so new kinds of files in a version (shards,
    deltas) are served by hash without changes here.
    """
    for name in type(manifest).model_fields:
        if name == "base_files":
            continue
        value = getattr(manifest, name)
        for item in value if isinstance(value, list | tuple) else [value]:
            if isinstance(item, PolicyFile):
                yield item
            elif isinstance(item, BaseModel):
                yield from manifest_files(item)


def etag_matches(if_none_match: str | None, sha256: str) -> bool:
    """Whether an If-None-Match header names this blob (weak comparison, as RFC 9110 asks for it)."""
    if not if_none_match:
        return False
    tags = [t.strip() for t in if_none_match.split(",")]
    return "*" in tags or any(t.removeprefix("W/") == f'"{sha256}"' for t in tags)


class CountingFileResponse(FileResponse):
    """A FileResponse that adds the body bytes it sends to `counter` (the hub's weights-served stats)."""

    def __init__(self, path: Path, counter: BlobIndex, **kw) -> None:
        super().__init__(path, **kw)
        self.counter = counter

    async def __call__(self, scope, receive, send) -> None:
        async def counting_send(message) -> None:
            if message["type"] == "http.response.body":
                self.counter.bytes_served += len(message.get("body", b""))
            await send(message)

        if scope["method"] != "HEAD":
            self.counter.files_served += 1
        await super().__call__(scope, receive, counting_send)


class BlobIndex:
    """sha256 -> path of a file of a published version (or the base files) still on disk."""

    def __init__(self, policy_dir: Path) -> None:
        self.policy_dir = Path(policy_dir)
        self._paths: dict[str, Path] = {}
        self._scanned_mtime: int | None = None
        self._scanned_at = 0.0
        self.files_served = 0
        """Blob and policy-file responses with a body (not 304s, not HEADs) since the hub started."""
        self.bytes_served = 0
        """Body bytes of those responses: what an HTTP cache in front of the hub saves."""

    def _scan(self) -> None:
        try:
            mtime = os.stat(self.policy_dir).st_mtime_ns
        except FileNotFoundError:
            return
        now = time.monotonic()
        if mtime == self._scanned_mtime and now - self._scanned_at < RESCAN_AFTER_S:
            return
        paths: dict[str, Path] = {}
        for version in published_versions(self.policy_dir):  # newest last: it wins a shared hash
            try:
                manifest = read_manifest(self.policy_dir, version)
            except (OSError, ValueError):
                continue  # garbage-collected while we read
            candidates = [(e, self.policy_dir / BASE / e.name) for e in manifest.base_files]
            candidates += [(e, version_dir(self.policy_dir, version) / e.name) for e in manifest_files(manifest)]
            for entry, path in candidates:
                # Only files on disk: a delta version also lists the shards it rebuilds to, which it does not hold.
                if path.is_file():
                    paths[entry.sha256] = path
        self._paths, self._scanned_mtime, self._scanned_at = paths, mtime, now

    def path(self, sha256: str) -> Path:
        """The file with this hash; HubError 422 for a malformed hash, 404 for an unknown one."""
        if not SHA256_HEX.fullmatch(sha256):
            raise HubError(422, "bad_hash", "a blob is named by its sha256: 64 lowercase hex digits")
        path = self._paths.get(sha256)
        if path is None or not path.is_file():
            self._scan()
            path = self._paths.get(sha256)
        if path is None or not path.is_file():
            raise HubError(
                404, "unknown_blob", f"no file of a policy version on this hub has sha256 {sha256} (collected?)"
            )
        return path

    def response(self, sha256: str, if_none_match: str | None) -> Response:
        """The blob as a cacheable response: 200 (or 206 for a Range), 304 if the client has it."""
        path = self.path(sha256)
        headers = {"cache-control": CACHE_CONTROL, "etag": f'"{sha256}"'}
        if etag_matches(if_none_match, sha256):
            return Response(status_code=304, headers=headers)
        return CountingFileResponse(path, self, headers=headers, media_type="application/octet-stream")

    def base_weights(self) -> BaseWeights:
        """Version 0's shards and layout (recorded now if version 0 is still on disk); 404 if unknown."""
        path = self.policy_dir / BASE_WEIGHTS
        if path.is_file():
            return BaseWeights.model_validate_json(path.read_text())
        if BASE_VERSION not in published_versions(self.policy_dir):
            raise HubError(404, "no_base_weights", f"policy version {BASE_VERSION} was never published on this hub")
        return self.record_base_weights()

    def record_base_weights(self) -> BaseWeights:
        """Describe version 0 in `policy/base-weights.json` (when it is published: it outlives the version)."""
        manifest = read_manifest(self.policy_dir, BASE_VERSION)
        if manifest.format != "full":
            raise HubError(404, "no_base_weights", f"policy version {BASE_VERSION} is not a full version")
        vdir = version_dir(self.policy_dir, BASE_VERSION)
        try:
            specs = [shard_spec_of(vdir / shard.name) for shard in manifest.full_shards()]
        except WeightFileError as e:
            raise HubError(404, "no_base_weights", f"version {BASE_VERSION}: {e}") from None
        base = BaseWeights(
            version=BASE_VERSION,
            shards=manifest.full_shards(),
            layout=[shard_layout(spec) for spec in specs],
        )
        tmp = self.policy_dir / f".{BASE_WEIGHTS}.tmp"
        tmp.write_text(base.model_dump_json())
        os.replace(tmp, self.policy_dir / BASE_WEIGHTS)
        return base

    def stats(self) -> WeightsServed:
        return WeightsServed(files=self.files_served, bytes=self.bytes_served)

    def file_response(self, path: Path) -> Response:
        """A policy file by version and name (the older route): counted, not marked cacheable."""
        return CountingFileResponse(path, self, media_type="application/octet-stream")


__all__ = ["CACHE_CONTROL", "BlobIndex", "etag_matches", "manifest_files"]
