"""Helpers to run a real hub process on loopback for integration tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
ADMIN = "admin-test-token"
WORKER = "worker-test-token"
OTHER_WORKER = "worker-test-token-2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_data() -> dict:
    """The tests' data section: 64 one-digit reasoning-gym sums, no eval split."""
    return {
        "source": {"type": "reasoning_gym", "dataset": "basic_arithmetic", "size": 64,
                   "params": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}},
        "eval_size": 0,
        "max_prompt_tokens": 128,
    }  # fmt: skip


def write_yaml_config(path: Path, cfg: dict, sections: dict) -> Path:
    """`cfg` with each section in `sections` merged over its defaults, as YAML at `path`."""
    for key, value in sections.items():
        cfg.setdefault(key, {}).update(value)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def write_config(run_dir: Path, model_dir: Path, **sections) -> Path:
    cfg = {
        "run_name": "test",
        "run_dir": str(run_dir),
        "model": {"name": str(model_dir), "max_model_len": 256},
        "data": tiny_data(),
        "sampling": {"n": 2, "max_tokens": 8},
        "trainer": {"prompts_per_step": 2, "micro_batch_size": 4},
        "rewards": {"terms": [{"name": "reasoning_gym"}], "workers": 1},
        "hub": {"lease_ttl_s": 60, "heartbeat_interval_s": 2.0, "max_body_mb": 0.5},
        "logging": {"wandb": {"mode": "disabled"}},
    }  # fmt: skip
    return write_yaml_config(run_dir / "config.yaml", cfg, sections)


def publish_initial_policy(run_dir: Path, model_dir: Path, version: int = 0, state: dict | None = None) -> None:
    from safetensors.torch import load_file

    from rl.weights import write_base, write_version

    policy = run_dir / "policy"
    write_base(policy, model_dir)
    write_version(
        policy, version, state if state is not None else load_file(model_dir / "model.safetensors"), "float32"
    )


@dataclass
class HubProcess:
    proc: subprocess.Popen
    url: str
    log: Path
    config: Path

    def client(self, token: str | None = ADMIN, secret: str | None = None) -> httpx.Client:
        """A plain HTTP client with `token` and (for a worker's own routes) its registration `secret`."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if secret:
            headers["X-Worker-Secret"] = secret
        return httpx.Client(base_url=self.url, headers=headers, timeout=30.0)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_hub(config: Path, log: Path, port: int | None = None, extra: list[str] = ()) -> HubProcess:
    """`rl hub CONFIG` on 127.0.0.1 (a free port unless given); returns once /healthz answers."""
    port = port or free_port()
    env = {**os.environ, "RL_HUB_ADMIN_TOKEN": ADMIN, "RL_HUB_WORKER_TOKENS": f"{WORKER},{OTHER_WORKER}",
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    cmd = [sys.executable, "-m", "rl.cli", "hub", str(config), "--host", "127.0.0.1", "--port", str(port), *extra]
    proc = subprocess.Popen(cmd, env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT, cwd=ROOT)  # noqa: SIM115
    hub = HubProcess(proc, f"http://127.0.0.1:{port}", log, config)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"hub exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{hub.url}/healthz", timeout=1.0).status_code == 200:
                return hub
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    hub.stop()
    raise RuntimeError(f"hub did not start:\n{log.read_text()[-3000:]}")


def start_worker(
    url: str, log: Path, cache_dir: Path, *, name: str, engine: str = "vllm", token: str = WORKER, extra: list[str] = ()
) -> subprocess.Popen:
    """`rl rollout --hub URL --token T` as its own process (output to `log`); returns at once."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
           "PYTHONPATH": str(ROOT)}  # fmt: skip
    cmd = [sys.executable, "-m", "rl.cli", "rollout", "--hub", url, "--token", token, "--engine", engine,
           "--name", name, "--cache-dir", str(cache_dir), *extra]  # fmt: skip
    return subprocess.Popen(cmd, env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT, cwd=ROOT)  # noqa: SIM115


def stop_process(proc: subprocess.Popen, timeout: float = 30.0) -> int:
    """SIGTERM, then SIGKILL after `timeout`; returns the exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode
