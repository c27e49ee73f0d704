"""Content-addressed policy files: `GET /v1/blobs/{sha256}`, cacheable by any HTTP cache.

Every file a worker downloads (weights of a version, config and tokenizer files) is
listed in a manifest with its sha256. Such a file never changes under its hash, so the
hub also serves it at `/v1/blobs/<sha256>` with

  Cache-Control: public, max-age=31536000, immutable
  ETag: "<sha256>"            (strong; If-None-Match -> 304, If-Range honoured)
  Accept-Ranges: bytes        (Range -> 206)

and nginx `proxy_cache`, Varnish or a CDN in front of the hub relays a version to a whole
site while the hub sends each file once (docs/operations.md, configs/nginx/). Workers
check every byte against the manifest they got from the hub itself, so a cache cannot
poison them (rollout_workers/weight_sync.py).

`BlobIndex` maps a hash to a file of a version still on disk. It rescans the policy
store's manifests only when the store's directory changed (a version published or
garbage-collected renames an entry in it), so requests for unknown hashes cost a stat.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

from pydantic import BaseModel
from starlette.responses import FileResponse, Response

from rl.protocol import HubError, PolicyFile, WeightsServed
from rl.weights import BASE, published_versions, read_manifest, version_dir

log = logging.getLogger(__name__)

SHA256_HEX = re.compile(r"[0-9a-f]{64}")
CACHE_CONTROL = "public, max-age=31536000, immutable"
"""One year (the longest RFC 9111 advises) and `immutable`: revalidation is never needed."""


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
        self.files_served = 0
        """Blob and policy-file responses with a body (not 304s, not HEADs) since the hub started."""
        self.bytes_served = 0
        """Body bytes of those responses: what an HTTP cache in front of the hub saves."""

    def _scan(self) -> None:
        try:
            mtime = os.stat(self.policy_dir).st_mtime_ns
        except FileNotFoundError:
            return
        if mtime == self._scanned_mtime:
            return
        paths: dict[str, Path] = {}
        for version in published_versions(self.policy_dir):  # newest last: it wins a shared hash
            try:
                manifest = read_manifest(self.policy_dir, version)
            except (OSError, ValueError):
                continue  # garbage-collected while we read
            for entry in manifest.base_files:
                paths[entry.sha256] = self.policy_dir / BASE / entry.name
            for entry in manifest_files(manifest):
                paths[entry.sha256] = version_dir(self.policy_dir, version) / entry.name
        self._paths, self._scanned_mtime = paths, mtime

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

    def stats(self) -> WeightsServed:
        return WeightsServed(files=self.files_served, bytes=self.bytes_served)

    def file_response(self, path: Path) -> Response:
        """A policy file by version and name (the older route): counted, not marked cacheable."""
        return CountingFileResponse(path, self, media_type="application/octet-stream")


__all__ = ["CACHE_CONTROL", "BlobIndex", "etag_matches", "manifest_files"]
