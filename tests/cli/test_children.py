"""A child of `rl train` that ignores SIGTERM (a drain that never ends) still exits once `rl train` is SIGKILLed:
`exit_with_parent` (rl/cli/children.py) ends it ORPHAN_EXIT_S later. Real processes: a parent that starts the child
as `Child` does, then is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent("""
    import logging, signal, sys, time
    import rl.cli.children as children
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, force=True)
    children.ORPHAN_EXIT_S = 1.0
    signal.signal(signal.SIGTERM, lambda *_: print("SIGTERM: draining forever", flush=True))
    children.exit_with_parent()
    print("child ready", flush=True)
    while True:
        time.sleep(0.1)
""")

PARENT = textwrap.dedent("""
    import os, subprocess, sys, time
    from rl.cli.children import PARENT_ENV, _die_with
    child = subprocess.Popen([sys.executable, "-c", sys.argv[1]], env={**os.environ, PARENT_ENV: str(os.getpid())},
                             stdout=open(sys.argv[2], "ab"), stderr=subprocess.STDOUT, start_new_session=True,
                             preexec_fn=_die_with(os.getpid()))
    print(child.pid, flush=True)
    time.sleep(600)
""")


def test_orphaned_child_that_ignores_sigterm_exits_after_the_bound(tmp_path):
    log = tmp_path / "child.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD, str(log)], env=env, stdout=subprocess.PIPE,
                              text=True)  # fmt: skip
    child = psutil.Process(int(parent.stdout.readline()))
    try:
        deadline = time.monotonic() + 60
        while "child ready" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        t0 = time.monotonic()
        _, alive = psutil.wait_procs([child], timeout=30)
        took = time.monotonic() - t0
        text = log.read_text()
        timing = f"orphaned child (ORPHAN_EXIT_S 1 s) gone {took:.1f} s after its parent was SIGKILLed"
        assert not alive, f"{timing}: still running\n{text}"
        assert "SIGTERM: draining forever" in text and "is gone: this process stops within 1 s" in text, text
        assert "exiting now" in text, f"{timing}\n{text}"
        print(timing)
    finally:
        if child.is_running():
            child.kill()
