"""A new policy version applied to the running engine in place: the worker's fast path for deltas.

When the hub's newest version is a delta of the version the engine holds (or a keyframe that
carries such deltas), the worker downloads only the delta files and the engine rewrites the
changed elements of its live tensors (rl/weights/inplace.py), checked against the manifest's
per-tensor hashes; no shard is rebuilt or re-hashed, no tensor reloaded whole. Anything that
fails leaves the engine at its old version (the apply rolls back) and the worker loads the full
version the usual way (weight_sync.py, `Engine.load_weights`).
"""

from __future__ import annotations

import logging
import time

from rl.weights.files import ChangeHashes, WeightFileError
from rl.wire.protocol import PolicyManifest
from rollout_workers.client import HubError
from rollout_workers.engines import Engine
from rollout_workers.weight_sync import WeightSync, WeightSyncError

log = logging.getLogger(__name__)


def load_in_place(engine: Engine, sync: WeightSync, manifest: PolicyManifest, held: int) -> tuple[float, float] | None:
    """Make `engine` (holding version `held`) hold `manifest`'s version in place: (fetch seconds, apply
    seconds), or None when it could not (the engine still holds `held`; load the full version)."""
    if not engine.applies_deltas or held < 0:
        return None
    start = time.perf_counter()
    try:
        deltas = sync.fetch_deltas(manifest, held)
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
