"""A new policy version applied to the running engine in place: the worker's fast path for deltas.

When the hub's newest version is a delta of the version the engine holds (or a keyframe that
carries such deltas), the worker downloads only the delta files and the engine rewrites the
changed elements of its live tensors (rl/weights/inplace.py), checked against the manifest's
per-tensor hashes; no shard is rebuilt or re-hashed, no tensor reloaded whole. Anything that
fails leaves the engine at its old version (the apply rolls back) and the worker loads the full
version the usual way (weight_sync.py, `Engine.load_weights`). The deltas are downloaded while
the engine finishes the prompts in flight (`DeltaPrefetch`): generation pauses for the apply only.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from rl.weights.files import ChangeHashes, WeightFileError
from rl.wire.protocol import PolicyManifest
from rollout_workers.client import HubError
from rollout_workers.engines import Engine
from rollout_workers.weight_sync import WeightSync, WeightSyncError

log = logging.getLogger(__name__)


class DeltaPrefetch:
    """Downloads the deltas of the hub's newest version in a thread while the engine finishes the prompts
    in flight, so that generation pauses for the apply only. One download at a time; what it got is
    used only for the version and base it was made for."""

    def __init__(self, sync: WeightSync, latest: Callable[[], PolicyManifest]) -> None:
        self.sync, self.latest = sync, latest
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._got: tuple[int, int, list[bytes]] | None = None
        """(version, held, deltas) of the last download that succeeded."""

    def start(self, held: int) -> None:
        if held < 0 or (self._thread is not None and self._thread.is_alive()):
            return
        self._thread = threading.Thread(target=self._run, args=(held,), name="prefetch", daemon=True)
        self._thread.start()

    def _run(self, held: int) -> None:
        try:
            manifest = self.latest()
            deltas = self.sync.fetch_deltas(manifest, held) if manifest.version != held else None
        except Exception as e:  # the update downloads them again
            log.info("prefetching the next policy's deltas failed (%s)", e)
            return
        if deltas is not None:
            with self._lock:
                self._got = (manifest.version, held, deltas)

    def take(self, version: int, held: int) -> list[bytes] | None:
        """The deltas downloaded for `version` starting from `held` (waiting for a download under way), if any."""
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            got, self._got = self._got, None
        return got[2] if got is not None and got[:2] == (version, held) else None


def load_in_place(
    engine: Engine, sync: WeightSync, manifest: PolicyManifest, held: int, deltas: list[bytes] | None = None
) -> tuple[float, float] | None:
    """Make `engine` (holding version `held`) hold `manifest`'s version in place: (fetch seconds, apply
    seconds), or None when it could not (the engine still holds `held`; load the full version).
    `deltas`: the version's delta files, already downloaded (`DeltaPrefetch`)."""
    if not engine.applies_deltas or held < 0:
        return None
    start = time.perf_counter()
    try:
        deltas = deltas if deltas is not None else sync.fetch_deltas(manifest, held)
    except (WeightFileError, WeightSyncError) as e:
        log.warning("policy v%d: its deltas could not be downloaded (%s); loading the full version",
                    manifest.version, e)  # fmt: skip
        return None
    except HubError as e:
        if e.status != 404:
            raise
        return None  # garbage-collected meanwhile: the full fetch asks for the latest again
    if deltas is None:
        return None
    fetched = time.perf_counter()
    try:
        engine.apply_delta(deltas, ChangeHashes(manifest.tensor_sha256, manifest.changes_sha256))
    except Exception as e:  # rolled back: the engine holds `held`, bit for bit
        log.warning("policy v%d: applying its deltas in place failed (%s); loading the full version",
                    manifest.version, e)  # fmt: skip
        return None
    return fetched - start, time.perf_counter() - fetched
