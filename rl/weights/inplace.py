"""A delta version applied to an engine's live tensors: only the changed elements, all or nothing.

The other way to load a delta (apply.py) rebuilds and re-hashes every shard and the engine reloads
every tensor. Here each changed tensor of `live` (checkpoint name -> the engine's tensor, same
dtype and layout as the shards) gets its changed elements rewritten in place; then its changed
elements (or, `verify="tensors"`, the whole tensor) are re-hashed and compared with the manifest's
`changes_sha256` (`tensor_sha256`); what the delta leaves alone was checked with the version
before. Any failure (a delta that does not fit, a hash that differs, a fault) puts the old bits
of every element changed so far back before it raises: the engine holds the previous version or
the new one, never a mix. $SCATTER_RL_FAULT_INPLACE_AFTER=k raises after k tensors (the fault
the tests inject; unset in a real run).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from rl.weights.files import ChangeHashes, WeightFileError, delta_changes, open_delta, tensor_sha256, unsigned_bits

log = logging.getLogger(__name__)

FAULT_ENV = "SCATTER_RL_FAULT_INPLACE_AFTER"
_SIGNED = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
"""Integer view of an element of each size: a torch view of the raw bits (torch lacks most uint ops)."""
HASH_THREADS = 4
"""Changed tensors hashed side by side (hashlib lets go of the GIL on large buffers)."""


class InjectedFault(RuntimeError):
    """The fault $SCATTER_RL_FAULT_INPLACE_AFTER asked for."""


@dataclass
class Applied:
    """What an in-place apply did (the worker logs it)."""

    tensors: int
    elements: int
    seconds: float
    hash_seconds: float


@dataclass
class _Undo:
    bits: torch.Tensor
    """The live tensor's flat integer view."""
    index: np.ndarray
    old: np.ndarray
    new: np.ndarray | None = None
    """The bits written at `index` (None: a tied tensor written under another name, read back to hash)."""


Verify = Literal["changes", "tensors"]
"""What is re-hashed after applying: each changed tensor's changed elements (O(changes); the others
were checked with the version before), or each changed tensor whole (O(model) when every tensor moves)."""


def apply_in_place(
    live: Mapping[str, torch.Tensor], deltas: list[bytes], expected: ChangeHashes, verify: Verify = "changes"
) -> Applied:
    """Apply `deltas` (a version's `<shard>.delta.zst` files, their sha256 checked already) to `live`,
    then check every changed tensor against `expected` (the manifest's hashes, as `verify` says).
    Raises `WeightFileError` (or the fault) with every element of `live` back at its old bits."""
    start = time.perf_counter()
    fault = os.environ.get(FAULT_ENV)
    want = expected.changes if verify == "changes" else expected.tensors
    undo: list[_Undo] = []
    changed: dict[str, _Undo] = {}
    storages: set[int] = set()  # tied weights (one tensor under two names) change once
    try:
        for delta in deltas:
            entries, body = open_delta(delta)
            pos = 0
            for name, entry in entries.items():
                tensor = live.get(name)
                if tensor is None:
                    raise WeightFileError(f"the delta changes {name}, which the engine does not hold")
                if name not in want:
                    raise WeightFileError(f"the manifest has no {verify} sha256 for {name}")
                first = tensor.data_ptr() not in storages
                storages.add(tensor.data_ptr())
                changed[name], pos = _apply_one(name, entry, body, pos, tensor, write=first)
                if first:
                    undo.append(changed[name])
                if fault is not None and len(changed) >= int(fault):
                    raise InjectedFault(f"{FAULT_ENV}={fault}: failing after {len(changed)} tensor(s)")
            if pos != len(body):
                raise WeightFileError("the delta is longer than its tensors' changes")
        hashed = time.perf_counter()
        if verify == "changes":  # a few MB: threads would cost more than they save
            digests = {name: _changes_sha256(step) for name, step in changed.items()}
        else:
            with ThreadPoolExecutor(HASH_THREADS) as pool:
                whole = pool.map(lambda step: tensor_sha256(step.bits), changed.values())
                digests = dict(zip(changed, whole, strict=True))
        if bad := [n for n, d in digests.items() if d != want[n]]:
            raise WeightFileError(f"{len(bad)} tensor(s) differ from the manifest after applying in place: {bad[:3]}")
    except BaseException:
        _roll_back(undo)
        raise
    now = time.perf_counter()
    return Applied(len(changed), sum(int(u.index.size) for u in undo), now - start, now - hashed)


def _apply_one(name: str, entry: dict, body: bytes, pos: int, tensor: torch.Tensor, write: bool) -> tuple[_Undo, int]:
    """Rewrite the changed elements of `tensor` in place (`write` False: a tied tensor changed already,
    only read past); returns what undoes it and the body position after its changes."""
    if not tensor.is_contiguous():
        raise WeightFileError(f"{name}: the engine's tensor is not contiguous (cannot be updated in place)")
    size = tensor.element_size()
    bits = tensor.detach().view(-1).view(_SIGNED[size])
    unsigned = np.dtype(unsigned_bits(size))
    index, diff, pos = delta_changes(name, entry, body, pos, unsigned, bits.numel())
    old = _gather(bits, index)
    if not write:
        return _Undo(bits, index, old), pos
    new = (old.view(unsigned) + diff).view(old.dtype)  # unsigned: wraps, like the encoder
    _scatter(bits, index, new)
    return _Undo(bits, index, old, new), pos


def _gather(bits: torch.Tensor, index: np.ndarray) -> np.ndarray:
    # torch's indexing runs on the torch threads (and on the tensor's device): ~1.4x numpy's on CPU
    return bits.index_select(0, torch.from_numpy(index).to(bits.device)).cpu().numpy()


def _scatter(bits: torch.Tensor, index: np.ndarray, values: np.ndarray) -> None:
    bits.index_copy_(0, torch.from_numpy(index).to(bits.device), torch.from_numpy(values).to(bits.device))


def _changes_sha256(step: _Undo) -> str:
    """sha256 of the changed elements' bits now, in index order (what `ChangeHashes.changes` records):
    the bits written (the old ones read from the tensor plus the delta; the indices strictly increase,
    so each element is written once), else read back."""
    bits = step.new if step.new is not None else _gather(step.bits, step.index)
    return hashlib.sha256(bits.tobytes()).hexdigest()


def _roll_back(undo: list[_Undo]) -> None:
    with torch.no_grad():
        for step in reversed(undo):
            _scatter(step.bits, step.index, step.old)
    if undo:
        log.warning("in-place apply failed: rolled back the %d tensor(s) changed so far", len(undo))
