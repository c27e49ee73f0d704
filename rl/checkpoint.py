"""Checkpoints: `run_dir/checkpoints/step_<N>/`, written under a temporary name, then renamed.

A checkpoint holds the DeepSpeed state (model, optimizer, LR schedule), the
trainer state (step, policy version), every rank's RNG states, and the hub's
ledger at that step, so `rl train --resume` continues with the same data order
and no prompt consumed twice or lost.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from rl.hub.protocol import Ledger

log = logging.getLogger(__name__)

LEDGER = "ledger.json"
STATE = "trainer_state.json"


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = [
        p
        for p in checkpoints_dir(run_dir).glob("step_*")
        if p.is_dir() and p.name[5:].isdigit() and (p / STATE).is_file()
    ]
    return max(found, key=lambda p: int(p.name[5:])) if found else None


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_checkpoint(strategy, run_dir: Path, step: int, state: dict, ledger: Ledger | None, keep: int) -> Path:
    """All ranks call; rank 0 writes the trainer state and ledger and renames into place."""
    root = checkpoints_dir(run_dir)
    final = root / f"step_{step}"
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
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in sorted(root.glob("step_*"), key=lambda p: int(p.name[5:]))[:-keep]:
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


def read_ledger(path: Path) -> Ledger | None:
    f = Path(path) / LEDGER
    return Ledger.model_validate_json(f.read_text()) if f.is_file() else None
