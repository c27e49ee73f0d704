"""Moving one policy file into place (rollout_workers/weight_sync.py): a resumable stream from the hub or
a mirror, capped at the manifest's size, and the sha256 that decides whether the bytes are kept."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import httpx

from rl.models import sha256_file
from rl.wire.protocol import PolicyFile
from rollout_workers.client import HubClient, HubError
from rollout_workers.mirror import MIRROR_COOLDOWN_S, Mirror, MirrorError

log = logging.getLogger(__name__)

Counted = Callable[[str, int], None]
"""Called with (origin: "hub" or "mirror", bytes written) as a stream lands on disk."""


def stream_into(source: HubClient | Mirror, url_path: str, part: Path, entry: PolicyFile, counted: Counted) -> None:
    """Fill `part` up to `entry.size` bytes from `source` (the hub's client or a mirror), resuming
    what is there; raises transport errors so the caller retries (resumes)."""
    origin = "mirror" if isinstance(source, Mirror) else "hub"
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
        with source.stream(url_path, headers=headers) as response:
            if offset and response.status_code != 206:
                offset = 0  # the server ignored the Range: start over
            with open(part, "ab" if offset else "wb") as f:
                for chunk in response.iter_bytes():  # unbuffered: a cut keeps what arrived
                    chunk = chunk[: entry.size - f.tell()]  # never more than the manifest's size
                    f.write(chunk)
                    counted(origin, len(chunk))
                    if f.tell() >= entry.size:
                        break  # the sha256 check decides about these bytes; ignore any excess
    except (HubError, MirrorError) as e:
        if e.status != 416 or not offset:
            raise
        log.warning("%s: the %s refused to resume at byte %d; starting over", entry.name, origin, offset)
        part.unlink(missing_ok=True)
        return stream_into(source, url_path, part, entry, counted)
    written = part.stat().st_size
    if written < entry.size:
        raise httpx.ReadError(f"{entry.name}: connection ended at byte {written} of {entry.size}")


def from_mirror(mirror: Mirror, part: Path, entry: PolicyFile, counted: Counted) -> bool:
    """One try at the mirror; True when `part` is whole and has the manifest's sha256."""
    try:
        stream_into(mirror, mirror.blob_path(entry.sha256), part, entry, counted)
    except (httpx.HTTPError, MirrorError, OSError) as e:
        not_there = isinstance(e, MirrorError) and e.status == 404
        log.warning(
            "mirror %s failed for %s (%s: %s); fetching it from the hub%s",
            mirror.url,
            entry.name,
            type(e).__name__,
            e,
            "" if not_there else f", and skipping the mirror for {MIRROR_COOLDOWN_S:.0f} s",
        )
        mirror.failed(cool_down=not not_there)
        return False
    digest = sha256_file(part)
    if digest == entry.sha256:
        return True
    log.warning(
        "mirror %s sent %s with sha256 %s, but the hub's manifest says %s: discarded; fetching it from the hub "
        "and skipping the mirror for %.0f s",
        mirror.url,
        entry.name,
        digest[:12],
        entry.sha256[:12],
        MIRROR_COOLDOWN_S,
    )
    part.unlink(missing_ok=True)
    mirror.failed()
    return False
