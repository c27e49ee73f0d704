"""A worker's own copy of the base model, written as the hub's published shards (`rl rollout --base-model`).

The hub describes version 0, the weights before any optimizer step (`GET /v1/policy/base/weights`):
each shard's tensors in order, and its sha256. `rebuild_base_shards` writes those shards from a
local HF checkpoint with the trainer's own shard writer (rl/weights/files.py: a shard's bytes are
a pure function of its tensors), so a shard whose sha256 matches is exactly the published one and
is not downloaded; one that does not match (another revision, a missing tensor, a dtype that
rounded the weights) is reported and deleted, and downloaded as usual. One tensor in memory at a
time, one shard written at a time: a 72B checkpoint never has to fit in memory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from rl.models import sha256_file
from rl.weights.files import ShardSpec, WeightFileError, spec_of_layout, write_shards
from rl.wire.client import HubHTTP
from rl.wire.protocol import BaseWeights, HubError, PolicyFile

log = logging.getLogger(__name__)


class LocalCheckpoint:
    """The tensors of an HF model directory by name, read lazily from its `*.safetensors` files."""

    def __init__(self, model_dir: Path) -> None:
        from safetensors import safe_open

        self.model_dir = Path(model_dir)
        self._stack = contextlib.ExitStack()
        self._files: dict[str, object] = {}
        for path in sorted(self.model_dir.glob("*.safetensors")):
            handle = self._stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
            for name in handle.keys():  # noqa: SIM118 (safe_open is not iterable)
                self._files.setdefault(name, handle)
        if not self._files:
            raise WeightFileError(f"{self.model_dir} has no .safetensors weights")

    def tensor(self, name: str) -> torch.Tensor:
        handle = self._files.get(name)
        if handle is None:
            raise WeightFileError(f"the base model has no tensor {name}")
        return handle.get_tensor(name)

    def close(self) -> None:
        self._stack.close()


def rebuild_base_shards(
    model_dir: Path, base: BaseWeights, out_dir: Path, have: set[str] = frozenset()
) -> tuple[list[PolicyFile], list[str]]:
    """Write each shard of `base` not in `have` (sha256s) from `model_dir` as `out_dir/<sha256>`.

    Returns the shards that matched the hub's sha256 (now in `out_dir`) and one line per
    shard that did not (nothing of it is kept).
    """
    out_dir = Path(out_dir)
    work = out_dir / ".rebuild"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    matched, problems = [], []
    checkpoint = LocalCheckpoint(model_dir)
    try:
        for entry, layout in zip(base.shards, base.layout, strict=True):
            if entry.sha256 in have:
                continue
            try:
                spec = spec_of_layout(layout)

                def tensors(spec: ShardSpec = spec) -> Iterator[tuple[str, torch.Tensor]]:
                    for t in spec.tensors:
                        yield t.name, checkpoint.tensor(t.name)

                [written] = write_shards(work, [spec], tensors())
            except WeightFileError as e:
                problems.append(f"{entry.name}: {e}")
                continue
            if written.sha256 != entry.sha256 or written.size != entry.size:
                problems.append(f"{entry.name}: sha256 {written.sha256[:12]}, the hub's is {entry.sha256[:12]}")
                (work / spec.name).unlink()
                continue
            os.replace(work / spec.name, out_dir / entry.sha256)
            matched.append(entry)
    finally:
        checkpoint.close()
        shutil.rmtree(work, ignore_errors=True)
    return matched, problems


def seed_from_base_model(client: HubHTTP, model_dir: Path, base_files: list[PolicyFile], blob_dir: Path) -> None:
    """Put into `blob_dir` (as `<sha256>`) every file of the hub's base weights and `base_files`
    (config, tokenizer) that `model_dir` reproduces exactly; log what matched and what did not."""
    blob_dir.mkdir(parents=True, exist_ok=True)
    have = {p.name for p in blob_dir.iterdir()}
    for entry in base_files:  # config, tokenizer: the hub copied them from the same kind of directory
        local = Path(model_dir) / entry.name
        fits = local.is_file() and local.stat().st_size == entry.size
        if entry.sha256 not in have and fits and sha256_file(local) == entry.sha256:
            shutil.copyfile(local, blob_dir / f".{entry.sha256}.tmp")
            os.replace(blob_dir / f".{entry.sha256}.tmp", blob_dir / entry.sha256)
    try:
        base = client.call("GET", "/v1/policy/base/weights", BaseWeights)
    except HubError as e:
        log.warning("--base-model %s not used: the hub has no base weights (%s)", model_dir, e)
        return
    start = time.perf_counter()
    try:
        _, problems = rebuild_base_shards(model_dir, base, blob_dir, have)
    except WeightFileError as e:
        log.warning("--base-model %s not used: %s", model_dir, e)
        return
    for problem in problems:
        log.warning("base model %s differs from the hub's v%d in %s; downloading it", model_dir, base.version, problem)
    ready = [s for s in base.shards if (blob_dir / s.sha256).is_file()]
    log.info(
        "base model %s: %d of %d shards of the hub's v%d verified on disk (%.1f MB that need no download; %.1f s)",
        model_dir,
        len(ready),
        len(base.shards),
        base.version,
        sum(s.size for s in ready) / 1e6,
        time.perf_counter() - start,
    )


__all__ = ["LocalCheckpoint", "rebuild_base_shards", "seed_from_base_model"]
