"""Checkpoints: `run_dir/checkpoints/step_<N>/`, written under a temporary name, then renamed.

A checkpoint holds the DeepSpeed state (model, optimizer, LR schedule), the
trainer state (step, policy version), every rank's RNG states (python, numpy, torch,
CUDA), and the hub's ledger at that step, so `rl train --resume` continues with the
same data order and no prompt consumed twice or lost. What a run did after its last checkpoint
(a crash, a SIGKILL) is lost: `discard_after` removes its traces (policy versions,
metric and batch records) before the run continues, so they are redone once. Every file's size and
sha256 go to `files.json`; `usable_checkpoint` sets a checkpoint that no longer matches aside
(a truncated or corrupted file) and resumes from the one before.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from rl.rundir import RunDir
from rl.weights.store import version_dir, version_numbers
from rl.wire.protocol import Ledger

log = logging.getLogger(__name__)

LEDGER = "ledger.json"
STATE = "trainer_state.json"
FILES = "files.json"
"""Every other file of the checkpoint: relative path -> [size, sha256]."""
DAMAGED = "damaged-"
"""Prefix a damaged checkpoint is renamed with (kept for inspection, never loaded)."""


class CheckpointError(RuntimeError):
    """A run directory that cannot be resumed (or started) as asked; the message says what to do."""


def checkpoints_dir(run_dir: Path) -> Path:
    return RunDir(run_dir).checkpoints


def checkpoint_step(path: Path) -> int:
    return int(Path(path).name[5:])


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = [
        p
        for p in checkpoints_dir(run_dir).glob("step_*")
        if p.is_dir() and p.name[5:].isdigit() and (p / STATE).is_file()
    ]
    return max(found, key=checkpoint_step) if found else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def write_file_list(path: Path) -> None:
    """Record the size and sha256 of every file under the checkpoint directory `path` (FILES)."""
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name != FILES)
    listing = {str(p.relative_to(path)): [p.stat().st_size, _sha256(p)] for p in files}
    (path / FILES).write_text(json.dumps(listing, indent=0))


def damage(path: Path) -> str | None:
    """What is wrong with the checkpoint at `path` (the first bad file, named), or None when every file matches
    its record. A checkpoint from before file lists existed is taken as it is."""
    listing = path / FILES
    if not listing.is_file():
        return None
    try:
        recorded = json.loads(listing.read_text())
    except ValueError as e:
        return f"{listing} is unreadable ({e})"
    for name, (size, digest) in recorded.items():
        file = path / name
        if not file.is_file():
            return f"{file} is missing"
        if (actual := file.stat().st_size) != size:
            return f"{file} has {actual} bytes, {size} were written (truncated?)"
        if _sha256(file) != digest:
            return f"{file} does not match the sha256 written with it (corrupted)"
    return None


def usable_checkpoint(run_dir: Path) -> Path | None:
    """The latest checkpoint whose files match their records; damaged newer ones are renamed `damaged-step_<N>`
    (logged, naming the bad file) so that nothing loads them."""
    while (ckpt := latest_checkpoint(run_dir)) is not None:
        problem = damage(ckpt)
        if problem is None:
            return ckpt
        aside = ckpt.with_name(f"{DAMAGED}{ckpt.name}")
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(ckpt, aside)
        log.error("checkpoint %s is damaged: %s; set aside as %s, resuming from the checkpoint before it",
                  ckpt.name, problem, aside)  # fmt: skip
    return None


def discard_after(run_dir: Path, step: int) -> None:
    """Remove what a run wrote after the checkpoint at `step`: it is redone on resume.

    Policy versions > step (the hub would serve the newest on disk), the local workers'
    cached copies of them, half-written checkpoints, `final/`, and records of later steps
    in the step logs (metrics.jsonl, batches.jsonl).
    """
    paths = RunDir(run_dir)
    for parent in paths.versioned:
        for version in version_numbers(parent):
            if version > step:
                shutil.rmtree(version_dir(parent, version), ignore_errors=True)
    for p in checkpoints_dir(run_dir).glob(".tmp-step_*"):
        shutil.rmtree(p, ignore_errors=True)
    shutil.rmtree(paths.final, ignore_errors=True)
    for path in paths.step_logs:
        if not path.is_file():
            continue
        kept = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by the kill
        path.write_text("".join(f"{line}\n" for line in kept))


def prepare_fresh(run_dir: Path) -> None:
    """A fresh run may not overwrite checkpoints; leftovers of a run that never saved one are removed."""
    paths = RunDir(run_dir)
    if (ckpt := latest_checkpoint(run_dir)) is not None:
        raise CheckpointError(
            f"{run_dir} already holds a run (checkpoint {ckpt.name}): continue it with --resume, "
            f"or start over with another --run-dir (or delete {run_dir})"
        )
    for directory in (*paths.versioned, paths.final, paths.checkpoints):
        shutil.rmtree(directory, ignore_errors=True)
    for path in (*paths.step_logs, paths.curves, paths.wandb_run_id):
        path.unlink(missing_ok=True)
    paths.remove_hub_db()


def rng_state() -> dict:
    """This process's RNG states: python, numpy, torch CPU, and every visible CUDA device's (if any)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore `rng_state()`; CUDA states are restored on as many devices as this process sees."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is None:
        return
    if not torch.cuda.is_available():
        log.warning("checkpoint holds CUDA RNG states but CUDA is not available here: not restored")
        return
    visible = torch.cuda.device_count()
    if len(cuda) != visible:
        log.warning("checkpoint holds CUDA RNG states of %d devices, %d visible: restoring %d",
                    len(cuda), visible, min(len(cuda), visible))  # fmt: skip
    for device, device_state in enumerate(cuda[:visible]):
        torch.cuda.set_rng_state(device_state, device)


def save_checkpoint(strategy, run_dir: Path, step: int, state: dict, ledger: Ledger | None, keep: int) -> Path:
    """All ranks call; rank 0 writes the trainer state and ledger and renames into place."""
    root = checkpoints_dir(run_dir)
    final = RunDir(run_dir).checkpoint(step)
    tmp = root / f".tmp-step_{step}"
    if strategy.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    strategy.barrier()
    strategy.save_checkpoint(tmp, {"step": step})
    torch.save(rng_state(), tmp / f"rng_rank{strategy.rank}.pt")
    strategy.barrier()
    if strategy.is_main:
        if ledger is not None:
            (tmp / LEDGER).write_text(ledger.model_dump_json())
        (tmp / STATE).write_text(json.dumps({**state, "step": step}))
        write_file_list(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in sorted(root.glob("step_*"), key=checkpoint_step)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint saved: %s", final)
    strategy.barrier()
    return final


def load_checkpoint(strategy, path: Path) -> dict:
    """Restore model/optimizer/scheduler and this rank's RNG; returns the trainer state."""
    strategy.load_checkpoint(path)
    rng_file = path / f"rng_rank{strategy.rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return json.loads((path / STATE).read_text())
