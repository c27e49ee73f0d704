"""Policy store: versioned weights on disk, written atomically, with sha256 manifests.

Layout under `run_dir/policy/`:
  base/            config.json, tokenizer files, generation_config.json (+ manifest.json)
  v<N>/            model.safetensors (+ manifest.json), one directory per published version

A version directory is written under a temporary name and renamed into place,
so a reader (the hub serving files, a worker downloading) never sees half a
version. Workers combine `base/` with a version's weights into a normal HF
directory and load it. Old versions are deleted once no worker needs them.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from rl.models import atomic_dir, sha256_file
from rl.protocol import PolicyFile, PolicyManifest

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
BASE = "base"
WEIGHTS_FILE = "model.safetensors"
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
    """Write weights of `version` atomically; returns its manifest."""
    torch_dtype = getattr(torch, dtype)

    def fill(tmp: Path) -> None:
        tensors = {k: v.detach().to("cpu", torch_dtype).contiguous() for k, v in state_dict.items()}
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "policy_version": str(version)})
        manifest = PolicyManifest(version=version, format="full", files=_file_entries(tmp))
        (tmp / MANIFEST).write_text(manifest.model_dump_json(indent=1))

    atomic_dir(version_dir(policy_dir, version), fill)
    return read_manifest(policy_dir, version)


def write_lora_version(
    policy_dir: Path, version: int, adapters: dict[str, torch.Tensor], metadata: dict[str, str], base_version: int
) -> PolicyManifest:
    """Write LoRA adapters as version `version` (`adapter.safetensors`, fp32); workers merge them into
    full version `base_version` (rl/lora.py)."""
    from rl.lora import ADAPTER_FILE

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


def published_versions(policy_dir: Path) -> list[int]:
    out = []
    for p in Path(policy_dir).glob("v*"):
        if p.is_dir() and p.name[1:].isdigit() and (p / MANIFEST).is_file():
            out.append(int(p.name[1:]))
    return sorted(out)


def garbage_collect(policy_dir: Path, in_use: set[int], keep_latest: int) -> list[int]:
    """Delete versions that are neither among the `keep_latest` newest nor loaded by a worker."""
    versions = published_versions(policy_dir)
    keep = set(versions[-keep_latest:]) | in_use
    for v in list(keep):  # a LoRA version is only usable with the full version it merges into
        if v in versions and (base := read_manifest(policy_dir, v).lora_base_version) is not None:
            keep.add(base)
    removed = [v for v in versions if v not in keep]
    for v in removed:
        shutil.rmtree(version_dir(policy_dir, v), ignore_errors=True)
    if removed:
        log.info("garbage-collected policy versions %s", removed)
    return removed
