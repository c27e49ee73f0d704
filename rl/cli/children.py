"""The child processes of `rl train` (the hub, local rollout workers) and the CPUs they run on.

A child runs in its own session, so a terminal's Ctrl-C reaches only `rl train` (which still
needs the hub for its last checkpoint), and the kernel sends it SIGTERM when `rl train` dies,
even by SIGKILL (PR_SET_PDEATHSIG): a killed run leaves no orphans. The SIGTERM starts the
child's usual drain; `exit_with_parent` bounds it: ORPHAN_EXIT_S after `rl train` died the child
exits at once, its port closed (docs/operations.md, "When a run is stuck"). A child does not inherit
the trainer ranks' RANK/WORLD_SIZE/MASTER_* (it must not join their process group), and runs
on the CPUs its `*.cpus` field names, or on those `rl train` started with.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from rl.config import RunConfig

log = logging.getLogger(__name__)


class LaunchError(RuntimeError):
    """A child process failed, or the run cannot start as asked; shown without a traceback."""


_DISTRIBUTED_ENV = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                    "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT", "CROSS_RANK",
                    "CROSS_SIZE", "LOCAL_SIZE"}  # fmt: skip
"""Set by torchrun/deepspeed for the trainer ranks; a child must not join their process group."""

PARENT_ENV = "RL_TRAIN_PID"
"""Set in a child's environment: the pid of the `rl train` that started it (`exit_with_parent`)."""
ORPHAN_EXIT_S = 10.0
"""Seconds a child of `rl train` may drain after `rl train` died before it exits at once."""
_ORPHAN_POLL_S = 0.5
_PR_SET_PDEATHSIG = 1
try:  # resolved in the parent: after fork only the call itself runs
    _prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
except (OSError, AttributeError):
    _prctl = None


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment minus the launcher's distributed variables, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in _DISTRIBUTED_ENV and not k.startswith("TORCHELASTIC_")}
    env.update(extra)
    return env


def _die_with(parent_pid: int, cpus: set[int] | None = None) -> Callable[[], None]:
    """preexec_fn: SIGTERM this child when its parent dies (Linux), even if the parent is SIGKILLed;
    pin it to `cpus` (before exec: every thread and process it starts inherits them)."""

    def preexec() -> None:
        if _prctl is not None:
            _prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)
        if cpus:
            os.sched_setaffinity(0, cpus)

    return preexec


def exit_with_parent() -> None:
    """In a child of `rl train` (PARENT_ENV set): a daemon thread that ends this process ORPHAN_EXIT_S after
    `rl train` died, whatever its drain still waits for (a hub that went with the run, a submission, an engine)."""
    parent = int(os.environ.get(PARENT_ENV, "0"))
    if not parent:
        return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(_ORPHAN_POLL_S)
        log.warning("rl train (pid %d) is gone: this process stops within %.0f s", parent, ORPHAN_EXIT_S)
        time.sleep(ORPHAN_EXIT_S)
        log.error("still running %.0f s after rl train (pid %d) died: exiting now", ORPHAN_EXIT_S, parent)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(1)

    threading.Thread(target=watch, name="rl-exit-with-parent", daemon=True).start()


def check_cpus(cfg: RunConfig) -> None:
    """A clear error for `*.cpus` ids this process may not use (or no pinning on this OS).

    The `cpus` fields split the CPUs `rl train` was started with (all, or a `taskset -c` set)
    among the trainer, the hub and the local workers.
    """
    fields = {"trainer.cpus": cfg.trainer.cpus, "rollout.cpus": cfg.rollout.cpus, "hub.cpus": cfg.hub.cpus}
    if not any(fields.values()):
        return
    if not hasattr(os, "sched_setaffinity"):
        raise LaunchError(f"{', '.join(k for k, v in fields.items() if v)}: pinning to CPUs needs Linux")
    allowed = os.sched_getaffinity(0)
    for name, cpus in fields.items():
        if cpus and (outside := sorted(set(cpus) - allowed)):
            raise LaunchError(f"{name}: CPU ids {outside} are not among the CPUs rl train may use here "
                              f"({sorted(allowed)})")  # fmt: skip


def pin_this_process(cpus: set[int]) -> None:
    """Pin every thread of this process (the trainer) to `cpus`; threads it starts later inherit them."""
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
            os.sched_setaffinity(int(tid), cpus)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class Child:
    """A child process in its own session, logging to `log_path`, that dies with this process."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log_path: Path, cpus: set[int] | None = None,
                 pass_fds: tuple[int, ...] = ()):  # fmt: skip
        self.name, self.log_path = name, log_path
        self.log_file = open(log_path, "ab")  # noqa: SIM115 (lives as long as the child)
        env = {**env, PARENT_ENV: str(os.getpid())}
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log_file, stderr=subprocess.STDOUT,
                                     start_new_session=True, preexec_fn=_die_with(os.getpid(), cpus),
                                     pass_fds=pass_fds)  # fmt: skip

    def exit_message(self) -> str:
        code = self.proc.poll()
        return f"{self.name} exited with code {code}; last lines of {self.log_path}:\n{_tail(self.log_path)}"

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0fs; killing it", self.name, timeout)
                self.proc.kill()
                self.proc.wait()
        self.log_file.close()
