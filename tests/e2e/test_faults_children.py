"""`rl train` SIGKILLed mid-run (an OOM kill, a lost node's scheduler): its hub, its local vLLM worker and every
process they started stop within a bounded time (rl/cli/children.py ORPHAN_EXIT_S), and the hub's port is free
again. docs/operations.md has the measured time."""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import time

import helpers.train as h
import psutil
import pytest

from rl.cli.children import ORPHAN_EXIT_S

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::FutureWarning")]


def _running(procs: list[psutil.Process]) -> list[str]:
    alive = []
    for p in procs:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                alive.append(f"{p.pid} {' '.join(p.cmdline())[:160]}")
        except psutil.NoSuchProcess:
            continue
    return alive


def _name(p: psutil.Process) -> str:
    try:
        return f"{p.pid} {' '.join(p.cmdline()[1:4])[:50]}"
    except psutil.Error:  # a zombie already
        return str(p.pid)


def _port_free(port: int) -> bool:
    """Whether a new server could listen on the hub's port (as `rl hub` does, SO_REUSEADDR)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        s.listen()
        return True


def test_killed_run_leaves_no_process_and_no_port(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    config = h.train_config(run_dir, tiny_model_dir, trainer={"max_steps": 10_000})
    log = tmp_path / "train.log"
    proc = h.start_train(config, log)
    h.wait_for(lambda: len(h.read_jsonl_live(run_dir / "batches.jsonl")) >= 1, "step 1", proc, log)
    port = int(re.search(r"hub at http://127\.0\.0\.1:(\d+)", log.read_text()).group(1))
    children = h.descendants(proc.pid)
    assert len(children) >= 2 and not _port_free(port), [c.cmdline() for c in children]
    names = {p.pid: _name(p) for p in children}
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    t0 = time.monotonic()
    bound = ORPHAN_EXIT_S + 30  # the documented bound, plus slack for a loaded machine
    ended: dict[str, float] = {}
    while (alive := _running(children)) and time.monotonic() - t0 < bound:
        for p in children:
            if not _running([p]):
                ended.setdefault(names[p.pid], time.monotonic() - t0)
        time.sleep(0.2)
    gone = time.monotonic() - t0
    for p in children:
        if not _running([p]):
            ended.setdefault(names[p.pid], gone)
    timing = (f"rl train SIGKILLed: its {len(children)} descendants gone {gone:.1f} s later (bound {ORPHAN_EXIT_S:g} s;"
              f" ended after: {', '.join(f'{k} {v:.1f} s' for k, v in ended.items())})")  # fmt: skip
    try:
        assert not alive, f"{timing}; still running: {alive}"
        assert _port_free(port), f"{timing}; port {port} still held"
    finally:
        for p in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
    print(timing)
