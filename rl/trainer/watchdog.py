"""The trainer's step watchdog: a step that overruns gets every process's stacks and a named cause; one that
never comes ends the run.

No step within `watchdog.stall_factor` x the median step (at least `watchdog.min_stall_s`): the Python stacks
of the trainer, the hub and the local workers go to `logs/stall-<time>/` and the log says what the trainer
waits for, with the hub's own view (groups buffered, tasks leased, scoring failures, silent workers).
`watchdog.abort_after_s` later the run is asked to stop (after a checkpoint when it can); if it has not
stopped `watchdog.exit_grace_s` after that, it exits at once. Exit 3 either way, and the latest checkpoint
stays valid for `--resume`. docs/operations.md, "When a run is stuck".
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from rl.config import WatchdogConfig
from rl.rundir import RunDir
from rl.trainer.checkpoint import latest_checkpoint
from rl.wire.admin import HubAdmin
from rl.wire.protocol import HubStatus, Stall
from rl.wire.waits import count_stall, process_state

log = logging.getLogger(__name__)

EXIT_STALLED = 3
"""Exit code of a run the watchdog ended."""
STACK_SIGNAL = signal.SIGUSR2
"""`rl hub` and `rl rollout` write every thread's stack to their log on this signal (faulthandler, rl/cli/main.py)."""

_WAITS = {
    "pull": "the hub's scored groups",
    "_await_rank0": "rank 0",
    "_on_rank0": "the hub (an evaluation)",
    "evaluate": "an evaluation on the rollout workers",
    "publish": "publishing a policy version",
    "_publish_adapters": "publishing LoRA adapters",
    "_published": "the background publication of a policy version",
    "checkpoint": "a checkpoint",
    "verify": "the provenance checks (forward passes)",
    "train_step": "the training step (forward, backward, optimizer)",
    "_all_reduce": "the other ranks (a collective)",
    "_stop_agreed": "the other ranks (a collective)",
}
"""What the trainer waits for, by the innermost method of rl/trainer/loop.py on its main thread."""


@dataclass(frozen=True)
class Watched:
    """A child process of `rl train` whose stacks a stall report includes (its log receives them)."""

    name: str
    pid: int
    log_path: Path


def hub_view(st: HubStatus) -> str:
    """The hub's own account of the groups the trainer waits for, in one line."""
    parts = [f"{st.buffered} buffered", f"{st.queued} queued", f"{st.leased} leased", f"{st.scoring} scoring",
             f"{st.worker_summary.total} workers"]  # fmt: skip
    if st.scoring_failures:
        parts.append(f"scoring failed {st.scoring_failures} times, {st.scoring_dropped} tasks dropped, "
                     f"last: {st.last_scoring_error}")  # fmt: skip
    return ", ".join(parts)


def stall_cause(st: HubStatus | None, url: str, heartbeat_s: float) -> str:
    """The likeliest reason the hub's groups do not come, and what to do about it."""
    if st is None:
        return f"the hub at {url} does not answer (stopped, overloaded or unreachable): see logs/hub.log"
    if st.scoring_failures and st.buffered == 0:
        return (f"scoring fails on the hub ({st.scoring_failures} failures, {st.scoring_dropped} tasks dropped; the "
                "last error is above): fix the reward terms (rewards.*), see logs/hub.log")  # fmt: skip
    if st.worker_summary.total == 0:
        return "no rollout worker is connected: check the workers' logs, the hub URL and the token"
    silent = [w for w in st.workers if w.leased_tasks and w.last_seen_s > 2 * heartbeat_s]
    if silent:
        held = ", ".join(f"{w.name} ({w.worker_id}) silent {w.last_seen_s:.0f} s holding {w.leased_tasks} tasks"
                         for w in silent[:5])  # fmt: skip
        return f"workers stopped answering while holding leases: {held} (re-leased when their leases expire)"
    return "the workers are generating or the verifiers scoring, slowly: see `rl status` and the workers' logs"


def own_stacks() -> str:
    """Every thread of this process, named, innermost call last."""
    names = {t.ident: t.name for t in threading.enumerate()}
    out = []
    for ident, frame in sys._current_frames().items():
        out.append(f"Thread {names.get(ident, '?')} ({ident}):\n{''.join(traceback.format_stack(frame))}")
    return "\n".join(out)


def child_stacks(child: Watched, out: Path, wait_s: float = 3.0) -> str:
    """Write `child`'s stacks to `out` (py-spy where installed, else its faulthandler through its log);
    returns a note on the child for the report."""
    state = process_state(child.pid)
    if state in ("T", "t"):
        out.write_text(f"{child.name} (pid {child.pid}) is stopped (SIGSTOP, or a debugger): no stacks\n")
        return f"{child.name} (pid {child.pid}) is STOPPED"
    if state in ("Z", "?"):
        out.write_text(f"{child.name} (pid {child.pid}) has exited\n")
        return f"{child.name} (pid {child.pid}) exited"
    if py_spy := shutil.which("py-spy"):
        try:
            done = subprocess.run([py_spy, "dump", "--pid", str(child.pid)], capture_output=True, text=True,
                                  timeout=30)  # fmt: skip
            out.write_text(done.stdout + done.stderr)
            return f"{child.name} (pid {child.pid}, state {state})"
        except (OSError, subprocess.TimeoutExpired) as e:
            log.warning("py-spy dump of %s failed (%s); asking it for a faulthandler dump", child.name, e)
    try:
        start = child.log_path.stat().st_size
        os.kill(child.pid, STACK_SIGNAL)
    except OSError as e:
        out.write_text(f"could not signal {child.name} (pid {child.pid}): {e}\n")
        return f"{child.name} (pid {child.pid}, state {state})"
    size, deadline = start, time.monotonic() + wait_s
    while time.monotonic() < deadline:  # until the dump has landed: the log grew, then stopped growing
        time.sleep(0.2)
        now = child.log_path.stat().st_size
        if now > start and now == size:
            break
        size = now
    with open(child.log_path, "rb") as f:
        f.seek(start)
        out.write_bytes(f.read())
    return f"{child.name} (pid {child.pid}, state {state})"


def _process_table(children: list[Watched]) -> str:
    """Every child and its descendants (the hub's verifier processes), with their states."""
    try:
        import psutil
    except ImportError:
        return "\n".join(f"{c.pid} {process_state(c.pid)} {c.name}" for c in children)
    rows = [f"{os.getpid()} {process_state(os.getpid())} trainer"]
    for c in children:
        try:
            tree = [psutil.Process(c.pid), *psutil.Process(c.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            rows.append(f"{c.pid} gone {c.name}")
            continue
        for p in tree:
            try:
                rows.append(f"{p.pid} {process_state(p.pid)} {' '.join(p.cmdline())[:160]}")
            except psutil.NoSuchProcess:
                continue
    return "\n".join(rows) + "\n"


class StepWatchdog:
    """A thread that watches the time since the last step (`step_done`) on rank 0; see the module docstring.

    `stop` is the trainer's `StopRequest` (set with `EXIT_STALLED` to end the run between steps);
    `children` lists the processes whose stacks a report includes; `hub` answers the hub's view.
    """

    def __init__(self, cfg: WatchdogConfig, paths: RunDir, stop, hub: HubAdmin | None,
                 children: Callable[[], list[Watched]], *, step: int, heartbeat_s: float,
                 resume_hint: str):  # fmt: skip
        self.cfg, self.paths, self.stop, self.hub, self.children = cfg, paths, stop, hub, children
        self.heartbeat_s, self.resume_hint = heartbeat_s, resume_hint
        self.step = step
        self.stalls = 0
        """Stalls reported so far."""
        self.last_report: Path | None = None
        self._gone_cause: str | None = None
        self._last = time.monotonic()
        self._durations: deque[float] = deque(maxlen=101)
        self._first = True
        self._stalled = False
        self._cleared = False
        self._main = threading.main_thread().ident
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rl-step-watchdog", daemon=True)
        self._thread.start()

    def step_done(self, step: int) -> None:
        """The trainer finished step `step` (called on the main thread)."""
        now = time.monotonic()
        if not self._first:  # the first interval holds start-up: not a step time
            self._durations.append(now - self._last)
        if self._stalled:
            log.warning("step watchdog: step %d completed %.0f s after step %d; the run goes on", step,
                        now - self._last, self.step)  # fmt: skip
            self._cleared = True  # the watchdog's thread tells the hub (no hub call on the training thread)
        self._first, self._stalled, self._last, self.step = False, False, now, step

    def limit(self) -> float:
        """Seconds without a step before a stall is reported."""
        median = statistics.median(self._durations) if self._durations else 0.0
        return max(self.cfg.min_stall_s, self.cfg.stall_factor * median)

    def close(self) -> None:
        self._done.set()
        self._thread.join(timeout=5.0)

    # ------------------------------------------------------------------ thread

    def _run(self) -> None:
        tick = min(1.0, self.cfg.min_stall_s / 10)
        while not self._done.wait(tick):
            if self._cleared:
                self._cleared = False
                self._tell_hub(Stall(component="trainer", active=False))
            elapsed, limit = time.monotonic() - self._last, self.limit()
            if elapsed > limit and not self._stalled:
                self._stalled = True
                self._report(elapsed, limit)
            if self._stalled and self.cfg.abort_after_s and elapsed > limit + self.cfg.abort_after_s:
                self._end_run(elapsed)
                return

    def _diagnose(self) -> tuple[str, str]:
        """(what the trainer waits for, in which code), and the likeliest cause."""
        frame = sys._current_frames().get(self._main)
        stack = traceback.extract_stack(frame) if frame is not None else []
        mine = [f for f in stack if f.filename.endswith(os.path.join("rl", "trainer", "loop.py"))]
        what = _WAITS.get(mine[-1].name, f"Trainer.{mine[-1].name}") if mine else "start-up"
        where = f"{stack[-1].filename}:{stack[-1].lineno} in {stack[-1].name}" if stack else "?"
        if stack and f"torch{os.sep}distributed" in stack[-1].filename:
            what = "the other ranks (a collective): one may be stopped, dead or much slower"
        if not mine or mine[-1].name not in ("pull", "_on_rank0", "evaluate", "_published", "checkpoint"):
            return f"{what} (at {where})", "the trainer itself: see trainer.txt in the stall directory"
        status = None
        if self.hub is not None:
            try:
                status = self.hub.status(limit=1000)
            except Exception as e:  # unreachable, stopped, a bad answer: that is the finding
                log.debug("step watchdog: the hub's status: %s", e)
        if status is not None:
            what = f"{what} (hub: {hub_view(status)})"
        return what, stall_cause(status, self.hub.url if self.hub else "?", self.heartbeat_s)

    def _report(self, elapsed: float, limit: float) -> None:
        self.stalls += 1
        count_stall("trainer step")  # the trainer's metrics `stalls/trainer_step`
        out = self.paths.stall(datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ"))
        notes: list[str] = []
        try:
            out.mkdir(parents=True, exist_ok=True)
            (out / "trainer.txt").write_text(own_stacks())
            for child in self.children():
                notes.append(child_stacks(child, out / f"{child.name.replace(' ', '-')}.txt"))
            (out / "processes.txt").write_text(_process_table(self.children()))
        except OSError as e:  # a full disk must not hide the stall itself
            notes.append(f"stacks not written: {e}")
        what, cause = self._diagnose()
        gone = [n for n in notes if n.startswith("rank ") and n.endswith(("STOPPED", "exited"))]
        if gone and "collective" in what:  # the rank the collective waits on, found by its state
            cause = f"{', '.join(gone)}: the collective fails at trainer.collective_timeout_s and the run ends"
            self._gone_cause = cause
        self.last_report = out
        median = f"median step {statistics.median(self._durations):.1f} s" if self._durations else "no step yet"
        ends = (f"the run ends in {self.cfg.abort_after_s:.0f} s without a step (watchdog.abort_after_s)"
                if self.cfg.abort_after_s else "the run keeps waiting (watchdog.abort_after_s: 0)")  # fmt: skip
        text = (f"step watchdog: no step completed for {elapsed:.0f} s after step {self.step} (limit {limit:.0f} s: "
                f"{self.cfg.stall_factor:g} x {median}, at least {self.cfg.min_stall_s:g} s); "
                f"waiting for {what}; likely cause: {cause}; processes: {', '.join(notes) or 'none'}; "
                f"stacks in {out}; {ends}")  # fmt: skip
        if out.is_dir():
            (out / "report.txt").write_text(text + "\n")
        log.error("%s", text)
        self._tell_hub(Stall(component="trainer", what=f"waiting for {what}; likely cause: {cause}"[:4000],
                             since_s=elapsed, report=str(out)[:1000]))  # fmt: skip

    def _tell_hub(self, stall: Stall) -> None:
        """For `rl status` (best effort: a hub that does not answer is likely the stall itself)."""
        if self.hub is None:
            return
        try:
            self.hub.report_stall(stall)
        except Exception as e:
            log.debug("step watchdog: could not tell the hub about the stall: %s", e)

    def _resume(self) -> str:
        ckpt = latest_checkpoint(self.paths.root)
        if ckpt is None:
            return "No checkpoint yet: once the cause is fixed, start the run again"
        return f"The latest checkpoint ({ckpt.name}) stays valid: {self.resume_hint}"

    def _end_run(self, elapsed: float) -> None:
        what, cause = self._diagnose()
        if self._gone_cause and "collective" in what:  # gloo's all_reduce may outlive its timeout on a stopped peer
            cause = self._gone_cause
        reason = f"no step for {elapsed:.0f} s, waiting for {what}; likely cause: {cause}"
        log.error("step watchdog: ending the run (exit %d): %s. %s", EXIT_STALLED, reason, self._resume())
        self.stop.set(f"stalled: {reason}", EXIT_STALLED)
        if self._done.wait(self.cfg.exit_grace_s):
            return
        log.critical("step watchdog: the trainer did not stop within %g s (watchdog.exit_grace_s), still waiting "
                     "for %s; exiting now (exit %d). %s", self.cfg.exit_grace_s, what, EXIT_STALLED,
                     self._resume())  # fmt: skip
        for child in self.children():  # a stopped child would hold the port: wake it to receive the SIGTERM
            for sig in (signal.SIGTERM, signal.SIGCONT):
                with contextlib.suppress(OSError):
                    os.kill(child.pid, sig)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(EXIT_STALLED)


# ---------------------------------------------------------------------- ranks

_COLLECTIVE_ERRORS = ("timed out", "timeout", "connection closed", "connection reset", "broken pipe", "gloo", "nccl")


class RankBeats:
    """Every trainer rank counts up a key in the process group's store each second (a daemon thread), so a rank
    whose collective failed can name the ranks that stopped answering (`stuck_ranks`)."""

    PERIOD_S = 1.0

    def __init__(self) -> None:
        import socket

        import torch.distributed as dist

        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.store = dist.distributed_c10d._get_default_store()
        self.store.set(f"rl-where/{self.rank}", f"{socket.gethostname()}:{os.getpid()}")
        self._host = socket.gethostname()
        threading.Thread(target=self._beat, name="rl-rank-beat", daemon=True).start()

    def _beat(self) -> None:
        while True:
            with contextlib.suppress(Exception):  # the store went with the run: nothing left to tell
                self.store.add(f"rl-beat/{self.rank}", 1)
            time.sleep(self.PERIOD_S)

    def _where(self, rank: int) -> tuple[str, int] | None:
        """(host, pid) of `rank`, once it has started counting (a missing key would block until the timeout)."""
        key = f"rl-where/{rank}"
        if not self.store.check([key]):
            return None
        host, _, pid = self.store.get(key).decode().rpartition(":")
        return host, int(pid)

    def local_ranks(self) -> list[Watched]:
        """The other ranks on this machine, for a stall report: their faulthandler dump (SIGUSR2, `rl` registers it)
        goes to their stderr, read back when that is a file (torchrun's output redirected to a log)."""
        out = []
        for r in range(self.world_size):
            where = self._where(r) if r != self.rank else None
            if where is None or where[0] != self._host:
                continue
            with contextlib.suppress(OSError):
                if (err := Path(os.readlink(f"/proc/{where[1]}/fd/2"))).is_file():
                    out.append(Watched(f"rank {r}", where[1], err))
        return out

    def _read(self) -> list[int]:
        return [self.store.add(f"rl-beat/{r}", 0) for r in range(self.world_size)]

    def stuck_ranks(self, watch_s: float = 4.0) -> str:
        """The ranks whose beat did not move in `watch_s`, with their state where they run on this machine."""
        result: list[str] = []

        def look() -> None:
            before = self._read()
            time.sleep(watch_s)
            for r, (a, b) in enumerate(zip(before, self._read(), strict=True)):
                if r != self.rank and a == b:
                    host, pid = self._where(r) or ("?", 0)
                    state = {"T": "STOPPED (SIGSTOP or a debugger)", "t": "STOPPED (a debugger)", "Z": "exited",
                             "?": "exited"}.get(process_state(pid), "alive but not answering")  # fmt: skip
                    where = f"pid {pid}, {state}" if host == self._host else f"pid {pid} on {host}"
                    result.append(f"rank {r} ({where})")

        reader = threading.Thread(target=look, daemon=True)
        reader.start()
        reader.join(watch_s + 10.0)
        if reader.is_alive():
            return "the process group's store does not answer (its host, rank 0 or the launcher, may be stuck)"
        return ", ".join(result) or f"none found stuck in {watch_s:.0f} s (a rank may be much slower, or the network)"


def collective_failure(error: BaseException, beats: RankBeats | None, timeout_s: float) -> str | None:
    """The message for a collective that failed on another rank (timed out, peer gone), or None for other errors."""
    text = str(error).lower()
    if beats is None or not isinstance(error, RuntimeError) or not any(k in text for k in _COLLECTIVE_ERRORS):
        return None
    return (f"rank {beats.rank}: a collective failed ({type(error).__name__}: {str(error)[:300]}); ranks that stopped "
            f"answering: {beats.stuck_ranks()}. trainer.collective_timeout_s is {timeout_s:g} s. Exit "
            f"{EXIT_STALLED}")  # fmt: skip
