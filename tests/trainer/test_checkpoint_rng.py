"""RNG states in checkpoints (rl/trainer/checkpoint.py): python, numpy, torch CPU and CUDA round-trip per rank."""

from __future__ import annotations

import logging
import random

import numpy as np
import torch

from rl.trainer.checkpoint import rng_state, set_rng_state


def draws() -> tuple:
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_rng_state_round_trips_through_a_file(tmp_path):
    torch.manual_seed(3)
    state = rng_state()
    torch.save(state, tmp_path / "rng.pt")
    first = draws()
    assert draws() != first
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=False))
    assert draws() == first
    assert ("cuda" in state) == torch.cuda.is_available()


def test_cuda_states_without_cuda_are_reported_not_fatal(caplog):
    if torch.cuda.is_available():
        return  # the CUDA round trip is tests/trainer/test_gpu.py::test_cuda_rng_state_round_trips
    state = rng_state()
    first = draws()
    state["cuda"] = [torch.zeros(16, dtype=torch.uint8)]  # as written by a GPU rank
    with caplog.at_level(logging.WARNING, logger="rl.trainer.checkpoint"):
        set_rng_state(state)
    assert draws() == first  # the CPU-side states are still restored
    assert "CUDA is not available" in caplog.text
