"""`rl train`: one command for a whole run — hub process, local rollout workers, DeepSpeed trainer.

The hub and each local worker are child processes (logs in `run_dir/logs/`);
the trainer runs in this process (or in each rank under `torchrun`/`deepspeed`,
where rank 0 starts the children and the other ranks only train). On exit,
success or not, the children are stopped: workers get SIGTERM and return
their leases, the hub is asked to shut down. A child that dies while the
trainer waits for samples ends the run with a message naming its log.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from rl.checkpoint import latest_checkpoint
from rl.config import RunConfig, dump_config
from rl.hub.admin import HubAdmin
from rl.hub.server import Tokens
from rl.models import resolve_model

log = logging.getLogger(__name__)


class LaunchError(RuntimeError):
    pass


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class Child:
    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log_path: Path):
        self.name, self.log_path = name, log_path
        self.log_file = open(log_path, "ab")  # noqa: SIM115 (lives as long as the child)
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log_file, stderr=subprocess.STDOUT)

    def check(self) -> None:
        code = self.proc.poll()
        if code is not None:
            raise LaunchError(
                f"{self.name} exited with code {code}; last lines of {self.log_path}:\n{_tail(self.log_path)}"
            )

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


class Launch:
    """The children of one `rl train` on rank 0."""

    def __init__(self, cfg: RunConfig, resume: bool):
        self.cfg, self.resume = cfg, resume
        self.run_dir = cfg.resolved_run_dir.resolve()
        self.logs = self.run_dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.hub: Child | None = None
        self.workers: list[Child] = []
        self.tokens, _ = Tokens.from_config(cfg)
        self.url = ""

    def start(self) -> HubAdmin:
        cfg = self.cfg
        cfg.run_dir = self.run_dir
        config_path = self.run_dir / "config.yaml"
        config_path.write_text(dump_config(cfg))
        port = cfg.hub.port or _free_port(cfg.hub.host)
        self.url = f"http://{cfg.hub.host}:{port}"
        env = {
            **os.environ,
            "RL_HUB_ADMIN_TOKEN": self.tokens.admin,
            "RL_HUB_WORKER_TOKENS": ",".join(self.tokens.workers),
            "OMP_NUM_THREADS": "1",
        }
        cmd = [sys.executable, "-m", "rl.cli", "hub", str(config_path), "--host", cfg.hub.host, "--port", str(port)]
        if self.resume and (ckpt := latest_checkpoint(self.run_dir)) is not None and (ckpt / "ledger.json").is_file():
            cmd += ["--ledger", str(ckpt / "ledger.json")]
            log.info("hub resumes the data ledger of %s", ckpt)
        self.hub = Child("hub", cmd, env, self.logs / "hub.log")
        self._wait_healthy()
        for i in range(cfg.rollout.local_workers):
            wenv = {
                **os.environ,
                "OMP_NUM_THREADS": str(cfg.rollout.threads),
                "VLLM_CPU_KVCACHE_SPACE": str(cfg.rollout.kv_cache_gib),
                "RL_HUB_TOKEN": self.tokens.workers[0],
            }
            wcmd = [sys.executable, "-m", "rl.cli", "rollout", "--hub", self.url, "--engine", cfg.rollout.engine,
                    "--tp", str(cfg.rollout.tensor_parallel), "--name", f"local-{i}",
                    "--prompts-per-lease", str(cfg.rollout.prompts_per_lease),
                    "--seed", str(cfg.trainer.seed * 1000 + i),
                    "--cache-dir", str(self.run_dir / "worker_cache")]  # fmt: skip
            self.workers.append(Child(f"worker local-{i}", wcmd, wenv, self.logs / f"worker-{i}.log"))
        public = cfg.hub.public_url or self.url
        log.info("hub at %s (logs: %s)", self.url, self.logs)
        log.info("add rollout nodes from any machine that reaches the hub:")
        log.info("  rl rollout --hub %s --token %s", public, self.tokens.workers[0])
        return HubAdmin(self.url, self.tokens.admin)

    def _wait_healthy(self, timeout: float = 600.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.hub.check()
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise LaunchError(f"hub did not become healthy in {timeout:.0f}s; see {self.hub.log_path}")

    def check(self) -> None:
        """Raise if the hub died, or every local worker died (remote workers may still be around)."""
        self.hub.check()
        if self.workers and all(w.proc.poll() is not None for w in self.workers):
            self.workers[0].check()

    def stop(self, admin: HubAdmin | None) -> None:
        for w in self.workers:
            w.proc.poll() is None and w.proc.send_signal(signal.SIGTERM)
        for w in self.workers:
            w.stop()
        if admin is not None:
            admin.shutdown()
        if self.hub is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.hub.proc.wait(10)
            self.hub.stop()


def _report(trainer) -> None:
    """Eval before vs after, printed for the user at the end of a run."""
    before, after = trainer.initial_eval, trainer.final_eval
    for key in sorted(set(before) & set(after)):
        if key != "eval/seconds":
            log.info("%-28s before %.3f  ->  after %.3f", key, before[key], after[key])


def run_training(cfg: RunConfig, resume: bool = False) -> int:
    from rl.trainer import Trainer

    resolve_model(cfg.model.name)  # prepare an alias once, before any child needs it
    rank = int(os.environ.get("RANK", "0"))
    launch = Launch(cfg, resume) if rank == 0 else None
    admin = None
    try:
        admin = launch.start() if launch is not None else None
        trainer = Trainer(cfg, admin, resume=resume)
        if launch is not None:
            trainer.health_check = launch.check
        code = trainer.run()
        final = trainer.export_final()
        if trainer.is_main:
            _report(trainer)
            log.info("done: final model in %s, metrics in %s", final, cfg.resolved_run_dir / "metrics.jsonl")
        return code
    except LaunchError as e:
        log.error("%s", e)
        return 1
    except KeyboardInterrupt:
        log.warning("stopped by the user")
        return 130
    except Exception as e:
        log.exception("training failed: %s: %s (logs of the hub and workers: %s)", type(e).__name__, e,
                      cfg.resolved_run_dir / "logs")  # fmt: skip
        return 1
    finally:
        if launch is not None:
            launch.stop(admin)
