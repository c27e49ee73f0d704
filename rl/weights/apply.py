"""The worker's half of the weight-file format: a downloaded version turned into loadable shards.

The trainer encodes versions (store.py: full shards, deltas, LoRA adapters); here every format is
applied. A `delta` version (or a keyframe's `deltas`) is rebuilt from its base version's shards,
a `lora` version's adapters are merged into its base version's shards, and every rebuilt shard
must hash to the manifest's sha256 (`WeightFileError` otherwise: never a silently wrong model).
Fetching, verifying downloaded bytes and caching stay with the worker
(rollout_workers/weight_sync.py), which hands the files it has to these functions.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from rl.weights.files import WeightFileError, apply_delta, read_shard, shard_spec_of, write_shards
from rl.weights.lora import ADAPTER_FILE, merge_adapter
from rl.wire.protocol import PolicyFile, PolicyManifest


def link_or_copy(src: Path, dst: Path) -> None:
    """Make `dst` the file `src`: a hard link where the filesystem allows it, else a copy."""
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def loadable_shards(manifest: PolicyManifest, vdir: Path) -> list[Path] | None:
    """The safetensors files an engine loads from `vdir` (a version directory built from `manifest`), in
    order; None when a file of the manifest is missing or has the wrong size. A `lora` version's are the
    shards merged into (its adapter file checked); any other's, its full shards."""
    shards = manifest.full_shards()
    files = [vdir / f.name for f in shards]
    if not all(p.is_file() and p.stat().st_size == f.size for p, f in zip(files, shards, strict=True)):
        return None
    if manifest.format == "lora":
        files = sorted(p for p in vdir.glob("*.safetensors") if p.name != ADAPTER_FILE)
        if not files:
            return None
    return files


# --------------------------------------------------------------------------- delta versions


def delta_chain(target: PolicyManifest, manifest_of: Callable[[int], PolicyManifest]) -> Iterator[PolicyManifest]:
    """`target`, then each version its deltas apply to (`manifest_of(version)`), back to a version that is
    not a delta (the keyframe). A caller holding one of them stops there."""
    manifest = target
    yield manifest
    while manifest.format == "delta":
        if manifest.base_version is None:
            raise WeightFileError(f"delta version v{manifest.version} names no base version")
        manifest = manifest_of(manifest.base_version)
        yield manifest


def delta_files(manifest: PolicyManifest) -> list[PolicyFile]:
    """The files that rebuild `manifest` from its base version: a delta version's files, a keyframe's deltas."""
    return manifest.deltas if manifest.format == "full" else manifest.files


def rebuild_from_deltas(manifest: PolicyManifest, base: PolicyManifest, base_dir: Path, vdir: Path) -> None:
    """Write into `vdir` every full shard of `manifest` from the shards of its base version `base` (in
    `base_dir`) and the `delta_files(manifest)` already downloaded into `vdir` (the delta files are
    consumed); each shard checked against the manifest's sha256 and size."""
    base_shards = {f.name: f for f in base.full_shards()}
    shipped = {f.name for f in delta_files(manifest)}
    for entry in manifest.full_shards():
        name = entry.name
        if name not in base_shards:
            raise WeightFileError(f"v{manifest.version}: shard {name} is not a shard of base v{base.version}")
        source = base_dir / name
        spec = shard_spec_of(source)
        if name in shipped:  # shipped whole (a dense change): downloaded and verified already
            rebuilt = entry
        elif spec.delta_name in shipped:
            with open(vdir / spec.delta_name, "rb") as f:
                [rebuilt] = write_shards(vdir, [spec], apply_delta(read_shard(source, spec), f.read()))
            (vdir / spec.delta_name).unlink()
        else:  # unchanged since the base: the same file
            link_or_copy(source, vdir / name)
            rebuilt = base_shards[name]
        if rebuilt.sha256 != entry.sha256 or rebuilt.size != entry.size:
            raise WeightFileError(
                f"v{manifest.version}: shard {name} rebuilt from v{base.version} hashes to "
                f"{rebuilt.sha256[:12]}, the hub's is {entry.sha256[:12]}"
            )


# --------------------------------------------------------------------------- lora versions


def merge_lora(manifest: PolicyManifest, vdir: Path, base_version: int, base_shards: list[Path]) -> list[Path]:
    """Merge the adapters of `manifest` (a `lora` version, its adapter file downloaded into `vdir`) into
    `base_shards`, the shards of version `base_version`; writes the merged shards, same names, into
    `vdir` and returns them in the same order (lora.py: W + scaling * B @ A)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    adapter = vdir / ADAPTER_FILE
    if not adapter.is_file():
        raise WeightFileError(f"lora policy v{manifest.version} has no {ADAPTER_FILE}")
    with safe_open(adapter, "pt") as f:
        scaling = float((f.metadata() or {}).get("scaling", "nan"))
    if not scaling == scaling:  # NaN: no scaling recorded
        raise WeightFileError(f"{adapter}: no 'scaling' in its metadata (not a scatter-rl adapter file)")
    adapters = load_file(adapter)
    placed = set()
    for path in base_shards:
        mine = _adapters_for(adapters, path)
        placed |= set(mine)
        try:
            merged = merge_adapter(load_file(path), mine, scaling)
        except ValueError as e:
            raise WeightFileError(f"lora policy v{manifest.version} does not fit base v{base_version}: {e}") from e
        tmp = vdir / f"{path.name}.merging"
        save_file(merged, str(tmp), metadata={"format": "pt", "policy_version": str(manifest.version)})
        os.replace(tmp, vdir / path.name)
    if stray := sorted(set(adapters) - placed):
        raise WeightFileError(f"lora policy v{manifest.version}: no base weight for adapters {stray[:4]}")
    return [vdir / p.name for p in base_shards]


def _adapters_for(adapters: dict, weights_path: Path) -> dict:
    """The adapters whose base weights live in the file `weights_path` (all of them for one file)."""
    from safetensors import safe_open

    with safe_open(weights_path, "pt") as f:
        names = set(f.keys())
    return {k: v for k, v in adapters.items() if f"{k.rsplit('.', 1)[0]}.weight" in names}
