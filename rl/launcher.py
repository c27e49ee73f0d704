"""`rl train`: one command for a whole run — hub process, local rollout workers, DeepSpeed trainer.

The hub and each local worker are child processes (logs in `run_dir/logs/`);
the trainer runs in this process (or in each rank under `torchrun`/`deepspeed`,
where global rank 0 starts the children and the other ranks only train).

Lifecycle:
- Children run in their own sessions, so a terminal's Ctrl-C reaches only
  `rl train` (which still needs the hub for its last checkpoint), and the kernel
  sends them SIGTERM when `rl train` dies, even by SIGKILL (PR_SET_PDEATHSIG):
  a killed run leaves no orphans. They do not inherit RANK/WORLD_SIZE/MASTER_*.
- First SIGINT/SIGTERM: finish the current step, checkpoint, exit 130. A second
  one exits at once (the last checkpoint stays valid).
- A watchdog thread watches the children. A dead hub fails the run at once;
  when every local worker died and no remote worker is connected, the trainer
  checkpoints and the run exits 1. Either way the message names the child's log.
- On exit, success or not, workers get SIGTERM (they return their leases), then
  the hub is asked to shut down.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from rl.checkpoint import CheckpointError, checkpoint_step, discard_after, latest_checkpoint, prepare_fresh
from rl.client import HubHTTP
from rl.config import RunConfig, dump_config
from rl.data import DataError
from rl.hub.admin import HubAdmin
from rl.hub.tokens import Tokens
from rl.models import ModelError, resolve_model
from rl.rundir import RunDir
from rl.trainer import EXIT_INTERRUPTED, StopRequest

log = logging.getLogger(__name__)


class LaunchError(RuntimeError):
    """A child process failed, or the run cannot start as asked; shown without a traceback."""


USER_ERRORS = (LaunchError, CheckpointError, ModelError, DataError, FileNotFoundError)
"""Errors a user fixes (config, paths, a child's log): a message, no traceback."""

_DISTRIBUTED_ENV = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                    "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT", "CROSS_RANK",
                    "CROSS_SIZE", "LOCAL_SIZE"}  # fmt: skip
"""Set by torchrun/deepspeed for the trainer ranks; a child must not join their process group."""

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


def _die_with(parent_pid: int) -> Callable[[], None]:
    """preexec_fn: SIGTERM this child when its parent dies (Linux), even if the parent is SIGKILLed."""

    def preexec() -> None:
        if _prctl is not None:
            _prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class Child:
    """A child process in its own session, logging to `log_path`, that dies with this process."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log_path: Path):
        self.name, self.log_path = name, log_path
        self.log_file = open(log_path, "ab")  # noqa: SIM115 (lives as long as the child)
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log_file, stderr=subprocess.STDOUT,
                                     start_new_session=True, preexec_fn=_die_with(os.getpid()))  # fmt: skip

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


class Watchdog:
    """A thread that polls the children every second and tells the trainer when one dies.

    When the hub died it sets `hub_failure` and signals the main thread (SIGUSR1),
    whose handler raises at once: without the hub there is no ledger to checkpoint.
    A run whose local workers all died (and no remote worker is connected) is asked
    to stop through the trainer's `StopRequest` (checkpoint first).
    """

    def __init__(self, launch: Launch, stop: StopRequest, admin: HubAdmin):
        self.launch, self.stop, self.admin = launch, stop, admin
        self.hub_failure: str | None = None
        self._done = threading.Event()
        self._main = threading.main_thread().ident
        self._thread = threading.Thread(target=self._run, name="rl-watchdog", daemon=True)
        self._thread.start()

    @property
    def watching(self) -> bool:
        return not self._done.is_set()

    def close(self) -> None:
        self._done.set()
        self._thread.join(timeout=5.0)

    def _run(self) -> None:
        dead: set[str] = set()
        while not self._done.wait(1.0):
            if self.launch.hub.proc.poll() is not None:
                self.hub_failure = self.launch.hub.exit_message()
                self._alert(f"the hub exited (see {self.launch.hub.log_path})")
                return
            for w in self.launch.workers:
                if w.proc.poll() is not None and w.name not in dead:
                    dead.add(w.name)
                    log.error("%s", w.exit_message())
            workers = self.launch.workers
            if workers and len(dead) == len(workers) and not self._remote_workers():
                logs = ", ".join(str(w.log_path) for w in workers)
                self._alert(f"every local rollout worker exited and no remote worker is connected (see {logs})")
                return

    def _remote_workers(self) -> bool:
        try:
            return any(not w.name.startswith("local-") for w in self.admin.status().workers)
        except Exception:  # the hub is going away: the next poll sees it
            return False

    def _alert(self, reason: str) -> None:
        self.stop.set(reason, 1)
        if self.hub_failure and self._main is not None:
            signal.pthread_kill(self._main, signal.SIGUSR1)


class Launch:
    """The children of one `rl train` on rank 0."""

    def __init__(self, cfg: RunConfig, resume: bool):
        self.cfg, self.resume = cfg, resume
        self.run_dir = cfg.resolved_run_dir.resolve()
        self.paths = RunDir(self.run_dir)
        self.logs = self.paths.logs
        self.hub: Child | None = None
        self.workers: list[Child] = []
        self.watchdog: Watchdog | None = None
        self.tokens, _ = Tokens.from_config(cfg)
        # Local workers get a token of their own, never the one printed for remote workers: a remote
        # worker then cannot even see local workers in /v1/status (docs/security.md).
        self.local_token = f"loc-{secrets.token_urlsafe(24)}"
        self.url = ""

    def prepare_run_dir(self) -> Path | None:
        """Resume: drop what happened after the latest checkpoint (returned). Fresh: refuse to overwrite one."""
        if self.resume:
            ckpt = latest_checkpoint(self.run_dir)
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
        cfg.run_dir = self.run_dir
        config_path = self.paths.config
        config_path.write_text(dump_config(cfg))
        port = cfg.hub.port or _free_port(cfg.hub.host)
        host = f"[{cfg.hub.host}]" if ":" in cfg.hub.host else cfg.hub.host  # an IPv6 address
        self.url = f"http://{host}:{port}"
        env = child_env(RL_HUB_ADMIN_TOKEN=self.tokens.admin, RL_HUB_WORKER_TOKENS=",".join(self.tokens.workers),
                        RL_HUB_LOCAL_TOKEN=self.local_token, OMP_NUM_THREADS="1")  # fmt: skip
        cmd = [sys.executable, "-m", "rl.cli", "hub", str(config_path), "--host", cfg.hub.host, "--port", str(port)]
        if ckpt is not None and (ckpt / "ledger.json").is_file():
            cmd += ["--ledger", str(ckpt / "ledger.json")]
            log.info("resuming from %s: the hub restores its data ledger", ckpt)
        self.hub = Child("hub", cmd, env, self.logs / "hub.log")
        self.watchdog = Watchdog(self, stop, HubAdmin(self.url, self.tokens.admin, patience_s=5.0))
        return HubAdmin(self.url, self.tokens.admin)

    def start_workers(self) -> None:
        """Once the hub answers: spawn the local workers and print how to add remote ones."""
        cfg = self.cfg
        self._wait_healthy()
        for i in range(cfg.rollout.local_workers):
            wenv = child_env(OMP_NUM_THREADS=str(cfg.rollout.threads), RL_HUB_TOKEN=self.local_token,
                             VLLM_CPU_KVCACHE_SPACE=str(max(1, math.ceil(cfg.rollout.kv_cache_gib))))  # fmt: skip
            wcmd = [sys.executable, "-m", "rl.cli", "rollout", "--hub", self.url, "--engine", cfg.rollout.engine,
                    "--tp", str(cfg.rollout.tensor_parallel), "--name", f"local-{i}",
                    "--prompts-per-lease", str(cfg.rollout.prompts_per_lease),
                    "--seed", str(cfg.trainer.seed * 1000 + i),
                    "--cache-dir", str(self.paths.worker_cache)]  # fmt: skip
            self.workers.append(Child(f"worker local-{i}", wcmd, wenv, self.logs / f"worker-{i}.log"))
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
                    return
                time.sleep(0.5)
        raise LaunchError(f"hub did not become healthy in {timeout:.0f}s; see {self.hub.log_path}")

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
    from rl.trainer import Trainer

    # DeepSpeed calls collectives torch 2.13 deprecates, once per call: noise for a user.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    rank = int(os.environ.get("RANK", "0"))
    stop = StopRequest()
    launch = Launch(cfg, resume) if rank == 0 else None
    restore_signals = _install_signal_handlers(stop, launch)
    admin = None
    run_dir = cfg.resolved_run_dir.resolve()
    try:
        resolve_model(cfg.model.name)  # prepare an alias once, before any child needs it
        admin = launch.start_hub(stop) if launch is not None else None
        trainer = Trainer(cfg, admin, resume=resume, stop=stop)  # loads while the hub starts
        if launch is not None:
            launch.start_workers()
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
        log.exception("training failed: %s: %s (logs of the hub and workers: %s)", type(e).__name__, e,
                      RunDir(run_dir).logs)  # fmt: skip
        return 1
    finally:
        if launch is not None:
            launch.stop(admin)
        restore_signals()
