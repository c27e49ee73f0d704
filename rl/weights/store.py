"""Policy store: versioned weights under `run_dir/policy/`, written atomically, with sha256 manifests.

  base/     config.json, tokenizer files, generation_config.json (+ manifest.json)
  v<N>/     one published version (+ manifest.json): its shards (full), or per changed shard a
            `<shard>.delta.zst` or the shard itself (delta), or `adapter.safetensors` (lora)
  current/  the trainer's full shards of the newest version: what the next delta is computed
            against (never served)

A version directory is written under a temporary name and renamed into place, so the hub and
workers never see half a version. `PolicyWriter` is the trainer's encoder (shards from files.py);
apply.py is the worker's decoder. `garbage_collect` keeps the newest keyframe and every version
after it, so a worker that joins late can rebuild the newest version.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from rl.models import atomic_dir, sha256_file
from rl.weights.files import (
    INDEX_FILE,
    ChangeHashes,
    ShardSpec,
    TensorSpec,
    encode_delta,
    index_json,
    plan_shards,
    read_shard,
    write_shards,
)
from rl.wire.protocol import PolicyFile, PolicyManifest

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
BASE = "base"
CURRENT = "current"
WEIGHTS_FILE = "model.safetensors"
DENSE_SHIP_WHOLE = 0.8
"""A delta at least this fraction of its shard's size ships the shard instead (rebuilding costs the worker CPU)."""
BASE_SUFFIXES = (".json", ".jinja", ".txt", ".model", ".tiktoken")


def version_dir(policy_dir: Path, version: int) -> Path:
    return Path(policy_dir) / f"v{version}"


def _file_entries(directory: Path) -> list[PolicyFile]:
    return [
        PolicyFile(name=p.name, size=p.stat().st_size, sha256=sha256_file(p))
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != MANIFEST
    ]


def write_base(policy_dir: Path, model_dir: Path) -> Path:
    """Copy the version-independent files (config, tokenizer) of `model_dir` to `policy_dir/base`."""

    def fill(tmp: Path) -> None:
        for p in sorted(Path(model_dir).iterdir()):
            if p.is_file() and p.suffix in BASE_SUFFIXES and not p.name.startswith(("scatter_rl_", "model.")):
                shutil.copy2(p, tmp / p.name)
        if not (tmp / "config.json").is_file():
            raise FileNotFoundError(f"{model_dir} has no config.json")
        files = _file_entries(tmp)
        (tmp / MANIFEST).write_text(json.dumps([f.model_dump() for f in files], indent=1))

    target = Path(policy_dir) / BASE
    atomic_dir(target, fill)
    return target


def write_version(policy_dir: Path, version: int, state_dict: dict[str, torch.Tensor], dtype: str) -> PolicyManifest:
    """Write `state_dict` as full version `version` (one shard of any size); returns its manifest."""
    torch_dtype = getattr(torch, dtype)
    layout = [TensorSpec(k, tuple(v.shape), torch_dtype) for k, v in state_dict.items()]
    writer = PolicyWriter(policy_dir, layout, shard_bytes=2**62, fmt="full")
    return writer.write(version, state_dict.items()).manifest


@dataclass
class Written:
    """What writing one version cost (the trainer logs it as `weights/*`)."""

    manifest: PolicyManifest
    seconds: float
    bytes_full: int
    bytes_shipped: int
    changed_fraction: float | None = None
    """delta: fraction of the elements whose rollout-dtype bits changed since the base version."""


class PolicyWriter:
    """Rank 0's writer of policy versions: shards streamed from the gather, full or delta.

    `layout` is the ordered list of tensors every version has (names, shapes, rollout dtype);
    `write` takes the tensors in that order. In `delta` format the first version this writer
    writes is a keyframe (full), then every `keyframe_every`-th; the others hold only what
    changed since the previous version, computed against `policy/current/` (the previous
    version's full shards, one shard in memory at a time). A keyframe after the first carries
    those deltas too (`deltas`), so workers that hold the previous version never download a
    whole version again; only a worker that joins (or falls behind the keyframe) does.
    """

    def __init__(
        self,
        policy_dir: Path,
        layout: list[TensorSpec],
        *,
        shard_bytes: int,
        fmt: str = "full",
        keyframe_every: int = 10,
    ) -> None:
        if fmt not in ("full", "delta"):
            raise ValueError(f"weights.format {fmt!r} cannot be written")
        self.policy_dir = Path(policy_dir)
        self.shards: list[ShardSpec] = plan_shards(layout, shard_bytes)
        self.fmt, self.keyframe_every = fmt, keyframe_every
        self.previous: PolicyManifest | None = None
        self.since_keyframe = 0

    def write(self, version: int, tensors: Iterable[tuple[str, torch.Tensor]]) -> Written:
        start = time.perf_counter()
        keyframe = self.fmt == "full" or self.previous is None or self.since_keyframe + 1 >= self.keyframe_every
        index = index_json(self.shards)
        changed: list[int] = []
        hashes = ChangeHashes()

        def fill(tmp: Path) -> None:
            with_deltas = self.fmt == "delta" and self.previous is not None
            shard_dir = tmp if keyframe else self.policy_dir / f".{CURRENT}-v{version}"
            if shard_dir != tmp:
                shutil.rmtree(shard_dir, ignore_errors=True)
                shard_dir.mkdir(parents=True)
            shard_files = write_shards(shard_dir, self.shards, tensors)
            deltas = self._deltas(shard_dir, shard_files, tmp, changed, hashes) if with_deltas else []
            extra = []
            if index is not None:
                (tmp / INDEX_FILE).write_bytes(index)
                extra.append(_entry(tmp / INDEX_FILE))
            manifest = PolicyManifest(
                version=version,
                format="full" if keyframe else "delta",
                files=(shard_files if keyframe else deltas) + extra,
                shards=shard_files,
                deltas=deltas + extra if keyframe and with_deltas else [],
                base_version=self.previous.version if with_deltas else None,
                keyframe_version=version if keyframe else self.previous.keyframe_version,
                bytes_full=sum(f.size for f in shard_files),
                tensor_sha256=hashes.tensors,
                changes_sha256=hashes.changes,
            )
            (tmp / MANIFEST).write_text(manifest.model_dump_json(indent=1))

        atomic_dir(version_dir(self.policy_dir, version), fill)
        if self.fmt == "delta":
            self._keep_current(version, keyframe)
        manifest = read_manifest(self.policy_dir, version)
        self.previous = manifest
        self.since_keyframe = 0 if keyframe else self.since_keyframe + 1
        numel = sum(t.numel for s in self.shards for t in s.tensors)
        return Written(
            manifest=manifest,
            seconds=time.perf_counter() - start,
            bytes_full=manifest.bytes_full,
            bytes_shipped=sum(f.size for f in manifest.deltas or manifest.files),
            changed_fraction=sum(changed) / max(numel, 1) if manifest.base_version is not None else None,
        )

    def _deltas(
        self, shard_dir: Path, shards: list[PolicyFile], tmp: Path, changed: list[int], hashes: ChangeHashes
    ) -> list[PolicyFile]:
        """Into `tmp`: per shard that changed since the previous version, its delta, or (a dense change)
        a link to the shard itself. Returns their entries; `changed` gets the changed element counts,
        `hashes` the sha256s of each changed tensor."""
        out = []
        current = self.policy_dir / CURRENT
        for spec, new, old in zip(self.shards, shards, self.previous.full_shards(), strict=True):
            if new.sha256 == old.sha256:
                continue  # unchanged shard: nothing to ship
            old_tensors, new_tensors = read_shard(current / spec.name, spec), read_shard(shard_dir / spec.name, spec)
            blob, count = encode_delta(old_tensors, new_tensors, hashes)
            changed.append(count)
            if len(blob) >= DENSE_SHIP_WHOLE * new.size:  # a dense change: ship the shard itself
                if shard_dir != tmp:
                    os.link(shard_dir / spec.name, tmp / spec.name)
                out.append(new)
                continue
            (tmp / spec.delta_name).write_bytes(blob)
            out.append(_entry(tmp / spec.delta_name))
        return out

    def _keep_current(self, version: int, keyframe: bool) -> None:
        """Make `policy/current/` the full shards of `version` (the base of the next delta)."""
        current = self.policy_dir / CURRENT
        if keyframe:
            vdir = version_dir(self.policy_dir, version)

            def link(tmp: Path) -> None:
                for spec in self.shards:
                    os.link(vdir / spec.name, tmp / spec.name)

            atomic_dir(current, link)
        else:
            staged = self.policy_dir / f".{CURRENT}-v{version}"
            shutil.rmtree(current, ignore_errors=True)
            os.replace(staged, current)


def _entry(path: Path) -> PolicyFile:
    return PolicyFile(name=path.name, size=path.stat().st_size, sha256=sha256_file(path))


def write_lora_version(
    policy_dir: Path, version: int, adapters: dict[str, torch.Tensor], metadata: dict[str, str], base_version: int
) -> PolicyManifest:
    """Write LoRA adapters as version `version` (`adapter.safetensors`, fp32); workers merge them into
    full version `base_version` (rl/weights/lora.py)."""
    from safetensors.torch import save_file

    from rl.weights.lora import ADAPTER_FILE

    def fill(tmp: Path) -> None:
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in adapters.items()}
        save_file(tensors, str(tmp / ADAPTER_FILE), metadata=metadata)
        manifest = PolicyManifest(
            version=version, format="lora", files=_file_entries(tmp), lora_base_version=base_version
        )
        (tmp / MANIFEST).write_text(manifest.model_dump_json(indent=1))

    atomic_dir(version_dir(policy_dir, version), fill)
    return read_manifest(policy_dir, version)


def read_manifest(policy_dir: Path, version: int) -> PolicyManifest:
    manifest = PolicyManifest.model_validate_json((version_dir(policy_dir, version) / MANIFEST).read_text())
    base = Path(policy_dir) / BASE / MANIFEST
    if base.is_file():
        manifest.base_files = [PolicyFile.model_validate(f) for f in json.loads(base.read_text())]
    return manifest


def export_version(policy_dir: Path, version: int, into: Path) -> Path:
    """A full version of `policy_dir` copied out as a normal HF directory (base files and shards) in `into`."""
    into.mkdir(parents=True, exist_ok=True)
    for src in [*(Path(policy_dir) / BASE).iterdir(), *version_dir(policy_dir, version).iterdir()]:
        if src.is_file() and src.name != MANIFEST:
            shutil.copy(src, into / src.name)
    return into


def version_numbers(directory: Path) -> list[int]:
    """The versions that have a `v<N>/` directory under `directory` (a policy dir, or a copy of one), ascending."""
    return sorted(int(p.name[1:]) for p in Path(directory).glob("v*") if p.is_dir() and p.name[1:].isdigit())


def published_versions(policy_dir: Path) -> list[int]:
    return [v for v in version_numbers(policy_dir) if (version_dir(policy_dir, v) / MANIFEST).is_file()]


def garbage_collect(policy_dir: Path, in_use: set[int], keep_latest: int) -> list[int]:
    """Delete versions that are neither among the `keep_latest` newest, nor loaded by a worker, nor in
    the newest version's delta chain (its keyframe and every version after it: what a joining worker needs)."""
    versions = published_versions(policy_dir)
    keep = set(versions[-keep_latest:]) | in_use
    for v in list(keep):  # a LoRA version is only usable with the full version it merges into
        if v in versions and (base := read_manifest(policy_dir, v).lora_base_version) is not None:
            keep.add(base)
    if versions:
        try:
            latest = read_manifest(policy_dir, versions[-1])
            if latest.keyframe_version is not None:
                keep |= {v for v in versions if v >= latest.keyframe_version}
        except (OSError, ValueError) as e:
            log.warning("policy v%d: unreadable manifest (%s); keeping every version", versions[-1], e)
            return []
    removed = [v for v in versions if v not in keep]
    for v in removed:
        shutil.rmtree(version_dir(policy_dir, v), ignore_errors=True)
    if removed:
        log.info("garbage-collected policy versions %s", removed)
    return removed
