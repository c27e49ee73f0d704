"""`rl train`: one command for a whole run — hub process, local rollout workers, DeepSpeed trainer.

The hub and each local worker are child processes (rl/cli/children.py; logs in
`run_dir/logs/`); the trainer runs in this process (or in each rank under
`torchrun`/`deepspeed`, where global rank 0 starts the children and the other ranks only
train). The first SIGINT/SIGTERM finishes the step, checkpoints and exits 130; a second one
exits at once. A watchdog thread restarts a hub that dies mid-run from its ledger database
(up to `hub.max_restarts` times) and stops the run when every local worker died and no
remote worker is connected. On exit workers get SIGTERM (they return their leases), then
the hub is asked to shut down. docs/operations.md: stopping, resuming, when the hub dies.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from rl.cli.children import Child, LaunchError, check_cpus, child_env, pin_this_process
from rl.config import RolloutConfig, RunConfig, dump_config
from rl.hub.data import DataError
from rl.hub.ledger import EXIT_DISK_FULL
from rl.hub.listen import listening_socket
from rl.models import ModelError, resolve_model
from rl.rundir import RunDir
from rl.trainer.checkpoint import (
    CheckpointError,
    checkpoint_step,
    discard_after,
    latest_checkpoint,
    prepare_fresh,
    usable_checkpoint,
)
from rl.trainer.loop import EXIT_INTERRUPTED, StopRequest
from rl.trainer.watchdog import EXIT_STALLED, RankBeats, StepWatchdog, Watched, collective_failure
from rl.wire.admin import HubAdmin
from rl.wire.client import HubHTTP
from rl.wire.identity import load_or_create, public_id
from rl.wire.tokens import Tokens
from rollout_workers.engines import EngineSpec

log = logging.getLogger(__name__)


USER_ERRORS = (LaunchError, CheckpointError, ModelError, DataError, FileNotFoundError)
"""Errors a user fixes (config, paths, a child's log): a message, no traceback."""


def engine_spec(rollout: RolloutConfig, seed: int) -> EngineSpec:
    """The engine of a local worker (`seed`: its own sampling seed)."""
    return EngineSpec(kind=rollout.engine, tensor_parallel=rollout.tensor_parallel, seed=seed,
                      kv_cache_gib=rollout.kv_cache_gib, gpu_memory_utilization=rollout.gpu_memory_utilization,
                      enforce_eager=rollout.enforce_eager)  # fmt: skip


LOW_DISK_BYTES = 16 << 20
"""Free space under which the run directory's disk counts as full (no hub restart, a clear failure)."""


def disk_full(run_dir: Path, certain: bool = False) -> str | None:
    """What to say when the run directory's file system is (nearly) full, else None. `certain`: a write already
    failed for want of space (what is free now may have been freed since, e.g. by an old checkpoint's removal)."""
    try:
        free = shutil.disk_usage(run_dir).free
    except OSError:
        free = None
    if not certain and (free is None or free >= LOW_DISK_BYTES):
        return None
    now = "" if free is None else f" ({free / 2**20:.1f} MiB free now)"
    return (f"no space left on the device of {run_dir}{now}: free space, then continue "
            f"with: rl train {RunDir(run_dir).config} --resume (the latest checkpoint stays valid)")  # fmt: skip


def _no_space(e: BaseException | None) -> OSError | None:
    """The ENOSPC error `e` is or was raised from (a background writer's failure is re-raised wrapped), else None."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


class Watchdog:
    """A thread that polls the children every second and tells the trainer when one dies.

    A hub that died after it first answered is restarted from its database (`Launch.restart_hub`),
    up to `hub.max_restarts` times. Past that (or a hub that never came up) it sets `hub_failure`
    and signals the main thread (SIGUSR1), whose handler raises at once: without the hub there is
    no ledger to checkpoint. A run whose local workers all died (and no remote worker is
    connected) is asked to stop through the trainer's `StopRequest` (checkpoint first).

    A hub it restarted is its child: the kernel's parent-death signal (rl/cli/children.py) follows the
    thread that spawned a process, not the process. So the thread outlives its watching, until
    `release()` once the children were stopped, or the restarted hub would die with it.
    """

    def __init__(self, launch: Launch, stop: StopRequest, admin: HubAdmin):
        self.launch, self.stop, self.admin = launch, stop, admin
        self.hub_failure: str | None = None
        self.hub_restarts = 0
        self._done = threading.Event()
        self._released = threading.Event()
        self._lock = threading.Lock()  # a restart and `close` never interleave
        self._main = threading.main_thread().ident
        self._thread = threading.Thread(target=self._run, name="rl-watchdog", daemon=True)
        self._thread.start()

    @property
    def watching(self) -> bool:
        return not self._done.is_set()

    def close(self) -> None:
        """Stop watching (no restart after this); the thread waits for `release()`."""
        with self._lock:
            self._done.set()

    def release(self) -> None:
        """Let the thread end, once the children it may have spawned are stopped."""
        self._done.set()
        self._released.set()
        self._thread.join(timeout=5.0)

    def _run(self) -> None:
        try:
            self._watch()
        finally:
            self._released.wait()

    def _watch(self) -> None:
        dead: set[str] = set()
        while not self._done.wait(1.0):
            with self._lock:
                if self.launch.hub.proc.poll() is not None and not self._restart_hub():
                    return
            for w in self.launch.workers:
                if w.proc.poll() is not None and w.name not in dead:
                    dead.add(w.name)
                    log.error("%s", w.exit_message())
            workers = self.launch.workers
            if workers and len(dead) == len(workers) and not self._remote_workers():
                logs = ", ".join(str(w.log_path) for w in workers)
                why = f"every local rollout worker exited and no remote worker is connected (see {logs})"
                full = disk_full(self.launch.run_dir)  # their weight caches live in the run directory
                self._alert(f"{why}: {full}" if full else why)
                return

    def _restart_hub(self) -> bool:
        """The hub exited: restart it if allowed (True), else fail the run (False)."""
        hub, limit = self.launch.hub, self.launch.cfg.hub.max_restarts
        if self._done.is_set():  # the run is shutting down: the hub is meant to go
            return False
        full = disk_full(self.launch.run_dir, certain=hub.proc.returncode == EXIT_DISK_FULL)
        if full is not None:  # a restart could not write its ledger either
            self.hub_failure = f"{hub.exit_message()}\n({full})"
            self._alert(f"the hub exited: {full}")
            return False
        if not self.launch.hub_ready or self.hub_restarts >= limit:
            why = "before it answered" if not self.launch.hub_ready else f"after {self.hub_restarts} restarts"
            self.hub_failure = f"{hub.exit_message()}\n(the hub exited {why}; hub.max_restarts={limit})"
            self._alert(f"the hub exited (see {hub.log_path})")
            return False
        self.hub_restarts += 1
        log.error("the hub exited with code %s; restarting it from its ledger %s (restart %d of %d, log %s)",
                  hub.proc.returncode, self.launch.paths.hub_db, self.hub_restarts, limit, hub.log_path)  # fmt: skip
        try:
            self.launch.restart_hub()
        except LaunchError as e:
            self.hub_failure = f"{hub.exit_message()}\n(restarting it failed: {e})"
            self._alert(f"the hub exited and could not be restarted: {e}")
            return False
        return True

    def _remote_workers(self) -> bool:
        try:
            return any(not w.name.startswith("local-") for w in self.admin.status(limit=100_000).workers)
        except Exception:  # the hub is going away: the next poll sees it
            return False

    def _alert(self, reason: str) -> None:
        self.stop.set(reason, 1)
        if self.hub_failure and self.launch.trainer_hub is not None:
            # Every wait on the hub ends now (a background publish included), not after its patience.
            self.launch.trainer_hub.stop_event.set()
        if self.hub_failure and self._main is not None:
            signal.pthread_kill(self._main, signal.SIGUSR1)


BRIEF_SPIN = "3000"
"""GOMP_SPINCOUNT of a local worker that owns its cores: the spins an idle OpenMP thread waits before it sleeps,
enough to bridge the gaps between vLLM-CPU's parallel regions within a decode step (docs/benchmarks.md)."""


def worker_spin(cfg: RunConfig) -> dict[str, str]:
    """The local workers' OpenMP spin (environment), when nothing else computes on their cores meanwhile: one
    local worker, and either the trainer waits while it generates (`async.max_staleness` 0) or the two are pinned
    to different CPUs. Otherwise none: `OMP_WAIT_POLICY=PASSIVE` (rl/cli/main.py) alone, because a spinning
    thread takes the core from the process beside it. A GOMP_SPINCOUNT set by the user is kept."""
    if "GOMP_SPINCOUNT" in os.environ or cfg.rollout.local_workers != 1:
        return {}
    apart = cfg.rollout.cpus and cfg.trainer.cpus and not set(cfg.rollout.cpus) & set(cfg.trainer.cpus)
    return {"GOMP_SPINCOUNT": BRIEF_SPIN} if cfg.async_.max_staleness == 0 or apart else {}


class Launch:
    """The children of one `rl train` on rank 0."""

    def __init__(self, cfg: RunConfig, resume: bool):
        self.cfg, self.resume = cfg, resume
        self.run_dir = cfg.resolved_run_dir.resolve()
        self.paths = RunDir(self.run_dir)
        self.logs = self.paths.logs
        self.hub: Child | None = None
        self.trainer_hub: HubAdmin | None = None
        self.hub_ready = False
        """Set once the hub answered: a hub that dies later is restarted, one that never came up is not."""
        self._hub_cmd: list[str] = []
        self._hub_env: dict[str, str] = {}
        self.workers: list[Child] = []
        self.watchdog: Watchdog | None = None
        self.tokens, _ = Tokens.from_config(cfg)
        # Local workers get a token of their own, never the one printed for remote workers: a remote
        # worker then cannot even see local workers in /v1/status (docs/security.md).
        self.local_token = f"loc-{secrets.token_urlsafe(24)}"
        self.url = ""
        # A child without `cpus` of its own keeps the CPUs rl train started with, even once the trainer pinned itself.
        started_with = os.sched_getaffinity(0) if cfg.trainer.cpus and hasattr(os, "sched_getaffinity") else None
        self.hub_cpus = set(cfg.hub.cpus) if cfg.hub.cpus else started_with
        self.worker_cpus = set(cfg.rollout.cpus) if cfg.rollout.cpus else started_with

    def prepare_run_dir(self) -> Path | None:
        """Resume: drop what happened after the latest checkpoint (returned). Fresh: refuse to overwrite one."""
        if self.resume:
            ckpt = usable_checkpoint(self.run_dir)
            if ckpt is None:
                raise CheckpointError(f"--resume: no checkpoint under {self.paths.checkpoints}")
            discard_after(self.run_dir, checkpoint_step(ckpt))
            return ckpt
        prepare_fresh(self.run_dir)
        for old in self.logs.glob("*.log"):
            old.unlink()
        return None

    def start_hub(self, stop: StopRequest) -> HubAdmin:
        """Prepare the run dir, spawn the hub and the watchdog; the hub gets ready while the trainer loads."""
        cfg = self.cfg
        ckpt = self.prepare_run_dir()
        self.logs.mkdir(parents=True, exist_ok=True)
        run_key = public_id(load_or_create(self.paths.run_key))
        log.info("run key (signs the receipts of trained work; %s): %s", self.paths.run_key_pub, run_key)
        cfg.run_dir = self.run_dir
        config_path = self.paths.config
        config_path.write_text(dump_config(cfg))
        self._hub_port = port = self._bind_hub_port(cfg.hub.port)
        host = f"[{cfg.hub.host}]" if ":" in cfg.hub.host else cfg.hub.host  # an IPv6 address
        self.url = f"http://{host}:{port}"
        env = child_env(RL_HUB_ADMIN_TOKEN=self.tokens.admin, RL_HUB_WORKER_TOKENS=",".join(self.tokens.workers),
                        RL_HUB_LOCAL_TOKEN=self.local_token, OMP_NUM_THREADS="1",
                        RL_HUB_TRUSTED_EVALS="1" if cfg.rollout.local_workers > 0 else "0")  # fmt: skip
        cmd = [sys.executable, "-m", "rl.cli", "hub", str(config_path), "--host", cfg.hub.host, "--port", str(port)]
        self._hub_cmd, self._hub_env = cmd, env
        if ckpt is not None and (ckpt / "ledger.json").is_file():
            # The trainer rolls back to the checkpoint: its ledger wins over the database's.
            cmd = [*cmd, "--ledger", str(ckpt / "ledger.json")]
            log.info("resuming from %s: the hub restores its data ledger", ckpt)
        elif ckpt is not None:
            self.paths.remove_hub_db()  # a checkpoint without a ledger: start the data over
        self._spawn_hub(cmd)
        self.watchdog = Watchdog(self, stop, HubAdmin(self.url, self.tokens.admin, patience_s=5.0))
        self.trainer_hub = HubAdmin(self.url, self.tokens.admin)
        return self.trainer_hub

    def _bind_hub_port(self, port: int) -> int:
        """Bind the hub's port here (0: a free one) for the hub to inherit; the port bound. Nothing can take it
        between choosing it and the hub's start (rl/hub/listen.py)."""
        host = self.cfg.hub.host
        try:
            self._hub_sock = listening_socket(host, port)
        except OSError as e:
            raise LaunchError(f"cannot listen on {host}:{port} for the hub: {e.strerror}") from None
        return self._hub_sock.getsockname()[1]

    def _spawn_hub(self, cmd: list[str]) -> None:
        """Start the hub on the bound socket; this process's copy is closed (the hub holds the port now)."""
        fd = self._hub_sock.fileno()
        try:
            self.hub = Child("hub", [*cmd, "--fd", str(fd)], self._hub_env, self.paths.hub_log, self.hub_cpus,
                             pass_fds=(fd,))  # fmt: skip
        finally:
            self._hub_sock.close()

    def restart_hub(self) -> None:
        """Start the hub again after it died: same port and tokens, ledger from its database (`LaunchError`:
        another process took the port meanwhile)."""
        self.hub.log_file.close()
        self._bind_hub_port(self._hub_port)
        self._spawn_hub(self._hub_cmd)

    def start_workers(self) -> None:
        """Once the hub answers: spawn the local workers and print how to add remote ones."""
        cfg = self.cfg
        self._wait_healthy()
        for i in range(cfg.rollout.local_workers):
            wenv = child_env(OMP_NUM_THREADS=str(cfg.rollout.threads), RL_HUB_TOKEN=self.local_token,
                             SCATTER_RL_HUB_POLICY_DIR=str(self.paths.policy), **worker_spin(cfg))  # fmt: skip
            spec = engine_spec(cfg.rollout, seed=cfg.trainer.seed * 1000 + i)
            inflight = cfg.rollout.max_inflight_prompts
            inflight_args = [] if inflight is None else ["--max-inflight-prompts", str(inflight)]
            wcmd = [sys.executable, "-m", "rl.cli", "rollout", "--hub", self.url, *spec.cli_args(), *inflight_args,
                    "--name", f"local-{i}", "--prompts-per-lease", str(cfg.rollout.prompts_per_lease),
                    "--cache-dir", str(self.paths.worker_cache)]  # fmt: skip
            self.workers.append(Child(f"worker local-{i}", wcmd, wenv, self.paths.worker_log(i), self.worker_cpus))
        public = cfg.hub.public_url or self.url
        log.info("hub at %s (logs: %s)", self.url, self.logs)
        log.info("add rollout nodes from any machine that reaches the hub:")
        log.info("  rl rollout --hub %s --token %s", public, self.tokens.workers[0])

    def _wait_healthy(self, timeout: float = 600.0) -> None:
        deadline = time.monotonic() + timeout
        with HubHTTP(self.url, self.tokens.admin) as probe:
            while time.monotonic() < deadline:
                if self.hub.proc.poll() is not None:
                    raise LaunchError(self.hub.exit_message())
                if probe.healthy():
                    self.hub_ready = True
                    return
                time.sleep(0.5)
        raise LaunchError(f"hub did not become healthy in {timeout:.0f}s; see {self.hub.log_path}")

    def watched(self) -> list[Watched]:
        """The children whose stacks a stalled step's report includes."""
        children = [self.hub, *self.workers] if self.hub is not None else self.workers
        return [Watched(c.name, c.proc.pid, c.log_path) for c in children if c.proc.poll() is None]

    def step_watchdog(self, stop: StopRequest, step: int, beats: RankBeats | None) -> StepWatchdog:
        """The trainer's step watchdog over this run (rl/trainer/watchdog.py), with a hub client of its own; its
        reports include the other trainer ranks on this machine (`beats`)."""
        hub = HubAdmin(self.url, self.tokens.admin, patience_s=5.0, read_timeout_s=10.0)
        watched = (lambda: self.watched() + beats.local_ranks()) if beats is not None else self.watched
        return StepWatchdog(self.cfg.watchdog, self.paths, stop, hub, watched, step=step,
                            heartbeat_s=self.cfg.hub.heartbeat_interval_s,
                            resume_hint=f"rl train {self.paths.config} --resume")  # fmt: skip

    def stop(self, admin: HubAdmin | None) -> None:
        if self.watchdog is not None:
            self.watchdog.close()
        for w in self.workers:
            if w.proc.poll() is None:
                w.proc.send_signal(signal.SIGTERM)
        for w in self.workers:
            w.stop()
        if admin is not None:
            admin.shutdown()
        if self.hub is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.hub.proc.wait(10)
            self.hub.stop()
        if self.watchdog is not None:
            self.watchdog.release()


def _install_signal_handlers(stop: StopRequest, launch: Launch | None) -> Callable[[], None]:
    """SIGINT/SIGTERM: stop after this step (a second one: at once). SIGUSR1: the watchdog's alarm."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    received: list[str] = []

    def on_stop(signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        received.append(name)
        if len(received) > 1:
            raise KeyboardInterrupt
        log.warning("%s: stopping after the current step, with a checkpoint (again to stop at once)", name)
        stop.set(f"{name} received", EXIT_INTERRUPTED)

    def on_alarm(_signum: int, _frame: object) -> None:
        watchdog = launch.watchdog if launch is not None else None
        if watchdog is not None and watchdog.watching and watchdog.hub_failure:
            raise LaunchError(watchdog.hub_failure)  # no checkpoint without the hub's ledger: fail now

    previous = {sig: signal.signal(sig, on_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    previous[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, on_alarm)

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore


def _report(trainer) -> None:
    """Eval before vs after, printed for the user at the end of a run."""
    before, after = trainer.initial_eval, trainer.final_eval
    for key in sorted(set(before) & set(after)):
        if key != "eval/seconds":
            log.info("%-28s before %.3f  ->  after %.3f", key, before[key], after[key])


def run_training(cfg: RunConfig, resume: bool = False) -> int:
    """`rl train`: 0 when max_steps were trained, 130 when stopped by a signal, 1 on failure."""
    from rl.trainer.loop import Trainer

    # DeepSpeed calls collectives torch 2.13 deprecates, once per call: noise for a user.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    rank = int(os.environ.get("RANK", "0"))
    stop = StopRequest()
    launch = Launch(cfg, resume) if rank == 0 else None
    restore_signals = _install_signal_handlers(stop, launch)
    admin = step_watchdog = beats = None
    run_dir = cfg.resolved_run_dir.resolve()
    try:
        resolve_model(cfg.model.name)  # prepare an alias once, before any child needs it
        check_cpus(cfg)
        if cfg.trainer.cpus:  # every rank of this node; rank 0's Launch kept the starting set for its children
            pin_this_process(set(cfg.trainer.cpus))
        admin = launch.start_hub(stop) if launch is not None else None
        trainer = Trainer(cfg, admin, resume=resume, stop=stop)  # loads while the hub starts
        beats = RankBeats() if trainer.strategy.world_size > 1 else None
        if launch is not None:
            launch.start_workers()
            step_watchdog = launch.step_watchdog(stop, trainer.step, beats)
            trainer.on_step = step_watchdog.step_done
        code = trainer.run()
        if code != 0:
            if trainer.is_main and latest_checkpoint(run_dir) is not None:
                log.warning("continue with: rl train %s --resume", RunDir(run_dir).config)
            return code
        final = trainer.export_final()
        if trainer.is_main:
            _report(trainer)
            log.info("done: final model in %s, metrics in %s", final, RunDir(run_dir).metrics)
        return 0
    except USER_ERRORS as e:
        log.error("%s", e)
        return 1
    except KeyboardInterrupt:
        log.warning("stopped at once; the latest checkpoint under %s stays valid", RunDir(run_dir).checkpoints)
        return EXIT_INTERRUPTED
    except Exception as e:
        if (full := _no_space(e)) is not None:
            log.error("%s (writing %s)", disk_full(run_dir, certain=True),
                      full.filename or "a file of the run")  # fmt: skip
            return 1
        if stuck := collective_failure(e, beats, cfg.trainer.collective_timeout_s):
            ckpt = latest_checkpoint(run_dir)
            log.error("%s; %s", stuck, f"continue with: rl train {RunDir(run_dir).config} --resume (from "
                      f"{ckpt.name})" if ckpt else "no checkpoint yet: start the run again")  # fmt: skip
            return EXIT_STALLED
        log.exception("training failed: %s: %s (logs of the hub and workers: %s)", type(e).__name__, e,
                      RunDir(run_dir).logs)  # fmt: skip
        return 1
    finally:
        if step_watchdog is not None:
            step_watchdog.close()
        if launch is not None:
            launch.stop(admin)
        restore_signals()
