"""Fast checks of what `rl train` does to a run directory before it starts, and of its child environment.

The slow system tests (test_train_e2e.py) exercise the same code through real runs; these pin
the rules: a resume drops what came after the checkpoint, a fresh run never overwrites one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rl.cli.launcher import LaunchError, check_cpus, child_env
from rl.config import load_config
from rl.trainer.checkpoint import CheckpointError, discard_after, latest_checkpoint, prepare_fresh
from rl.trainer.tracking import Progress


def make_run(run_dir: Path, steps: int, checkpoints: list[int]) -> None:
    for name in ("metrics.jsonl", "batches.jsonl"):
        lines = [json.dumps({"step": s, "x": s}) for s in range(steps + 1)]
        (run_dir / name).write_text("\n".join(lines) + '\n{"step": 9')  # a line cut short by a kill
    for v in range(steps + 1):
        (run_dir / "policy" / f"v{v}").mkdir(parents=True)
        (run_dir / "worker_cache" / f"v{v}").mkdir(parents=True)
    (run_dir / "policy" / "base").mkdir()
    for s in checkpoints:
        (run_dir / "checkpoints" / f"step_{s}").mkdir(parents=True)
        (run_dir / "checkpoints" / f"step_{s}" / "trainer_state.json").write_text(json.dumps({"step": s}))
    (run_dir / "checkpoints" / f".tmp-step_{steps}").mkdir(parents=True)
    (run_dir / "final").mkdir()


def test_discard_after_keeps_only_work_up_to_the_checkpoint(tmp_path):
    make_run(tmp_path, steps=5, checkpoints=[2, 3])
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt.name == "step_3"
    discard_after(tmp_path, 3)
    for name in ("metrics.jsonl", "batches.jsonl"):
        assert [json.loads(line)["step"] for line in (tmp_path / name).read_text().splitlines()] == [0, 1, 2, 3]
    assert sorted(p.name for p in (tmp_path / "policy").iterdir()) == ["base", "v0", "v1", "v2", "v3"]
    assert sorted(p.name for p in (tmp_path / "worker_cache").iterdir()) == ["v0", "v1", "v2", "v3"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_2", "step_3"]
    assert not (tmp_path / "final").exists()


def test_fresh_run_refuses_checkpoints_and_clears_leftovers(tmp_path):
    make_run(tmp_path, steps=2, checkpoints=[2])
    with pytest.raises(CheckpointError, match="--resume"):
        prepare_fresh(tmp_path)
    leftovers = tmp_path / "other"
    leftovers.mkdir()
    make_run(leftovers, steps=2, checkpoints=[])
    prepare_fresh(leftovers)
    assert [p.name for p in leftovers.iterdir()] == []


def test_children_do_not_inherit_the_trainer_process_group(monkeypatch):
    for var, value in {"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "x"}.items():
        monkeypatch.setenv(var, value)
    env = child_env(OMP_NUM_THREADS="1")
    assert not {"RANK", "WORLD_SIZE", "MASTER_PORT", "TORCHELASTIC_RUN_ID"} & set(env)
    assert env["OMP_NUM_THREADS"] == "1" and "PATH" in env


def test_child_is_pinned_to_its_cpus(tmp_path):
    """`hub.cpus`/`rollout.cpus` reach a child before it runs: it and what it starts keep them; we do not.

    The launcher runs in a small interpreter of its own: forking this pytest process (gigabytes of models
    by now, and `preexec_fn` rules out vfork) can fail with ENOMEM on a busy 24 GiB machine."""
    ours = os.sched_getaffinity(0)
    cpus = {max(ours)}
    probe = (
        "import os, subprocess, sys; print(sorted(os.sched_getaffinity(0))); sys.stdout.flush(); "
        "subprocess.run([sys.executable, '-c', 'import os; print(sorted(os.sched_getaffinity(0)))'])"
    )
    log = tmp_path / "probe.log"
    launcher = textwrap.dedent(f"""
        import os, sys
        from pathlib import Path
        from rl.cli.launcher import Child, child_env
        ours = os.sched_getaffinity(0)
        child = Child("probe", [sys.executable, "-c", {probe!r}], child_env(), Path({str(log)!r}), {cpus!r})
        assert child.proc.wait(30) == 0
        child.stop()
        print(os.sched_getaffinity(0) == ours)
    """)
    out = subprocess.run([sys.executable, "-c", launcher], capture_output=True, text=True, timeout=90,
                         env=os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[2])})  # fmt: skip
    assert out.stdout.split() == ["True"], out.stderr
    assert log.read_text().split("\n")[:2] == [str(sorted(cpus))] * 2


def test_trainer_pin_holds_every_thread():
    """`trainer.cpus` pins threads that already run (torch's, DeepSpeed's) and those started later.

    In a fresh interpreter: pinning the test process would leak into the other tests."""
    code = textwrap.dedent("""
        import os, threading
        from rl.cli.launcher import pin_this_process
        cpus = {max(os.sched_getaffinity(0))}
        go = threading.Event()
        early = threading.Thread(target=go.wait)
        early.start()
        pin_this_process(cpus)
        late = threading.Thread(target=go.wait)
        late.start()
        print(all(os.sched_getaffinity(t.native_id) == cpus for t in (early, late)), os.sched_getaffinity(0) == cpus)
        go.set()
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env=os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[2])})  # fmt: skip
    assert out.stdout.split() == ["True", "True"], out.stderr


def test_cpus_outside_this_machine_are_refused_by_name():
    allowed = sorted(os.sched_getaffinity(0))
    first, last = allowed[0], allowed[-1]
    check_cpus(load_config(None, [f"trainer.cpus=[{first}]", f"rollout.cpus=[{last}]", f"hub.cpus=[{last}]"]))
    check_cpus(load_config(None))
    missing = max(allowed) + 1
    with pytest.raises(LaunchError, match=rf"rollout\.cpus: CPU ids \[{missing}\] are not among"):
        check_cpus(load_config(None, [f"rollout.cpus=[{allowed[0]}, {missing}]"]))
    with pytest.raises(LaunchError, match=r"hub\.cpus: CPU ids \[-1\]"):
        check_cpus(load_config(None, ["hub.cpus=[-1]"]))


def test_progress_line():
    progress = Progress(first_step=0, max_steps=10)
    m = {"reward/mean": 0.5, "accuracy": 0.25, "loss/policy": None, "response_length/mean": 12.0, "workers": 2.0,
         "staleness/mean": 0.5, "staleness/max": 1.0, "perf/step_s": 1.5, "perf/wait_s": 0.5}  # fmt: skip
    first = progress.line(1, m)
    assert first.startswith("step 1/10 | reward 0.500 acc 0.250 | loss nan") and "ETA" not in first
    assert "stale 0.5 (max 1)" in first and "2 workers" in first
    assert "ETA 0:00:00" in progress.line(2, m)
