"""The policy versions the hub serves: manifests, files by version and name or by hash, collection.

The trainer writes versions into the policy directory (rl/weights/store.py) and announces
them; this module answers the workers' reads of that directory — a manifest, a file of a
version (`Range` supported), a file by sha256 (rl/hub/blobs.py: `ETag`, immutable, for
HTTP caches) — and deletes the versions no worker needs any more after a publish.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from starlette.responses import Response

from rl.hub.blobs import BlobIndex
from rl.weights.store import BASE, MANIFEST, garbage_collect, published_versions, read_manifest, version_dir
from rl.wire.protocol import BaseWeights, HubError, PolicyManifest, WeightsServed

log = logging.getLogger(__name__)

VERSION_PATTERN = re.compile(r"[0-9]{1,12}")
"""A policy version in a file URL: ASCII digits only (str.isdigit also accepts '²', int() does not)."""


class PolicyFiles:
    """The policy directory as the hub serves it; `current` is the current version at each call (-1: none)."""

    def __init__(self, policy_dir: Path) -> None:
        self.policy_dir = Path(policy_dir)
        self.blobs = BlobIndex(self.policy_dir)
        """Policy files by sha256 (`GET /v1/blobs/{sha256}`) and the count of bytes served."""

    def newest_on_disk(self) -> int:
        """The newest version the trainer published in the directory, -1 if none."""
        versions = published_versions(self.policy_dir) if self.policy_dir.exists() else []
        return versions[-1] if versions else -1

    def manifest(self, version: int) -> PolicyManifest:
        return read_manifest(self.policy_dir, version)

    def manifest_of(self, version: int, current: int) -> PolicyManifest:
        """One version's manifest, 404 unless published and on disk (a worker rebuilding a delta chain)."""
        if not 0 <= version <= current or not (version_dir(self.policy_dir, version) / MANIFEST).is_file():
            raise HubError(404, "unknown_version", f"policy version {version} is not available")
        return read_manifest(self.policy_dir, version)

    def file(self, version: str, name: str, current: int) -> Response:
        """A file of a version (`base`: config and tokenizer files) listed in its manifest; 404 otherwise."""
        if version == BASE and current >= 0:
            directory = self.policy_dir / BASE
            allowed = {f.name for f in read_manifest(self.policy_dir, current).base_files}
        elif VERSION_PATTERN.fullmatch(version) and version_dir(self.policy_dir, int(version)).is_dir():
            directory = version_dir(self.policy_dir, int(version))
            manifest = read_manifest(self.policy_dir, int(version))
            allowed = {f.name for f in manifest.files + manifest.deltas}
        else:
            raise HubError(404, "unknown_version", f"policy version {version} is not available")
        if name not in allowed:  # also rules out any path traversal
            raise HubError(404, "unknown_file", f"{name} is not a file of policy version {version}")
        return self.blobs.file_response(directory / name)

    def blob(self, sha256: str, if_none_match: str | None) -> Response:
        return self.blobs.response(sha256, if_none_match)

    def base_weights(self) -> BaseWeights:
        return self.blobs.base_weights()

    def served(self) -> WeightsServed:
        return self.blobs.stats()

    def check_publishable(self, version: int) -> None:
        """422 `bad_policy` unless the trainer wrote a readable manifest for `version`."""
        try:
            read_manifest(self.policy_dir, version)
        except (OSError, ValueError) as e:
            raise HubError(422, "bad_policy", f"version {version} has no readable manifest: {e}") from None

    def describe_base(self, version: int) -> None:
        """After publishing version 0: describe its shards (`GET /v1/policy/base/weights`) while it is on disk."""
        if version != 0:
            return
        try:
            self.blobs.record_base_weights()
        except (HubError, OSError) as e:
            log.warning("could not describe the base weights of version 0: %s", e)

    def collect(self, keep: set[int], keep_versions: int) -> None:
        """Delete the versions no worker needs (rl/weights/store.py's `garbage_collect`)."""
        garbage_collect(self.policy_dir, keep, keep_versions)
