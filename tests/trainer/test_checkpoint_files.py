"""Checkpoint file lists (rl/trainer/checkpoint.py): a truncated or corrupted file is named, the checkpoint set
aside, and the one before it used; `tests/e2e/test_faults.py` resumes a real run from one."""

from __future__ import annotations

import json
import logging

from rl.trainer.checkpoint import FILES, STATE, damage, usable_checkpoint, write_file_list


def _checkpoint(run_dir, step: int):
    path = run_dir / "checkpoints" / f"step_{step}"
    (path / "global_step").mkdir(parents=True)
    (path / "global_step" / "model_states.pt").write_bytes(bytes(range(256)) * 40)
    (path / STATE).write_text(json.dumps({"step": step}))
    write_file_list(path)
    return path


def test_intact_checkpoint_passes_and_old_ones_without_a_list_are_taken_as_they_are(tmp_path):
    ckpt = _checkpoint(tmp_path, 2)
    assert damage(ckpt) is None
    (ckpt / FILES).unlink()
    assert damage(ckpt) is None


def test_damaged_latest_is_named_and_set_aside(tmp_path, caplog):
    _checkpoint(tmp_path, 2)
    truncated, corrupted = _checkpoint(tmp_path, 4), _checkpoint(tmp_path, 6)
    weights = truncated / "global_step" / "model_states.pt"
    weights.write_bytes(weights.read_bytes()[:100])
    flipped = bytearray((corrupted / STATE).read_bytes())
    flipped[2] ^= 0x01
    (corrupted / STATE).write_bytes(bytes(flipped))
    assert "has 100 bytes, 10240 were written (truncated?)" in damage(truncated)
    assert "does not match the sha256" in damage(corrupted)
    with caplog.at_level(logging.ERROR, logger="rl.trainer.checkpoint"):
        assert usable_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_2"
    assert f"checkpoint step_6 is damaged: {corrupted / STATE}" in caplog.text
    assert f"checkpoint step_4 is damaged: {weights}" in caplog.text
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "damaged-step_4", "damaged-step_6", "step_2"]  # fmt: skip


def test_missing_file_is_named(tmp_path):
    ckpt = _checkpoint(tmp_path, 2)
    (ckpt / "global_step" / "model_states.pt").unlink()
    assert damage(ckpt).endswith("model_states.pt is missing")
