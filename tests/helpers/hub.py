"""The real hub for tests: as a process (`start_hub`), or in this process behind a fault proxy (`LiveHub`).

Both run the hub's app (rl/hub/routes.py over rl/hub/service.py) with its real routes, validation,
verifier pool and policy files; worker tests talk to it over loopback HTTP, never to a second
implementation of its routes.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

from helpers.faults import FaultProxy
from helpers.net import free_port, serve

ROOT = Path(__file__).resolve().parents[2]
ADMIN = "admin-test-token"
WORKER = "worker-test-token"
OTHER_WORKER = "worker-test-token-2"
OPERATORS = [f"operator-test-token-{i}" for i in range(8)]
"""More worker tokens: one per operator when a test needs several (trust is kept per token)."""
WORKER_TOKENS = [WORKER, OTHER_WORKER, *OPERATORS]


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

    from rl.weights.store import write_base, write_version

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


def start_hub(
    config: Path, log: Path, port: int | None = None, extra: list[str] = (), prefix: list[str] = ()
) -> HubProcess:
    """`rl hub CONFIG` on 127.0.0.1 (a free port unless given); returns once /healthz answers.
    `prefix`: a command to run it under (e.g. `taskset -c 0,1`)."""
    port = port or free_port()
    env = {**os.environ, "RL_HUB_ADMIN_TOKEN": ADMIN, "RL_HUB_WORKER_TOKENS": ",".join(WORKER_TOKENS),
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    cmd = [*prefix, sys.executable, "-m", "rl.cli", "hub", str(config), "--host", "127.0.0.1", "--port", str(port),
           *extra]  # fmt: skip
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


class LiveHub:
    """The real hub app (`rl.hub.main.build_hub` + `rl.hub.routes.create_app`) served in this process behind a
    `FaultProxy`, with the tests' tokens. Use as a context manager; `url` is the proxy's address.

    `restart()` is what a worker sees when the hub process restarts: a new `HubState` restored from the
    old one's data ledger, so every worker id, lease and in-flight submission is forgotten.
    """

    def __init__(self, cfg, port: int | None = None) -> None:
        from rl.hub.main import build_hub
        from rl.hub.routes import create_app
        from rl.wire.tokens import Tokens

        self.cfg = cfg
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.tokens = Tokens(ADMIN, WORKER_TOKENS)
        self.hub = build_hub(cfg, tokens=self.tokens)
        self.proxy = FaultProxy(create_app(self.hub))
        self.restarts = 0
        self._served: contextlib.ExitStack | None = None

    def __enter__(self) -> LiveHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.hub.pool.close()

    def start(self) -> LiveHub:
        """Serve on `self.port` (again, after `stop`)."""
        self._served = contextlib.ExitStack()
        self._served.enter_context(serve(self.proxy, self.port))
        return self

    def stop(self) -> None:
        """Stop listening (connections are refused until `start`)."""
        if self._served is not None:
            self._served.close()
            self._served = None

    @property
    def state(self):
        return self.hub.state

    def restart(self, keep_ledger: bool = True) -> None:
        """A restarted hub process: workers and leases forgotten; the data ledger kept unless told otherwise."""
        from rl.hub.routes import create_app
        from rl.hub.service import Hub
        from rl.hub.state import HubState

        old = self.hub
        ledger = old.state.ledger() if keep_ledger else None
        state = HubState(self.cfg, old.state.prompts, old.state.vocab_size, ledger, old.state.evals.prompts)
        self.hub = Hub(self.cfg, state, old.pool, old.tokenizer, old.policy_dir, self.tokens)
        self.proxy.upstream = create_app(self.hub)
        self.restarts += 1

    def admin(self):
        """A `HubAdmin` (the trainer's client) with the admin token, straight to the hub app via the proxy."""
        from rl.wire.admin import HubAdmin

        return HubAdmin(self.url, ADMIN)

    def status(self):
        with self.admin() as admin:
            return admin.status()

    def publish(self, version: int) -> None:
        """Announce an already written policy version, as the trainer does."""
        with self.admin() as admin:
            admin.publish(version)

    def wait_for(self, predicate, timeout: float = 60.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(0.05)


def live_config(run_dir: Path, model_dir: Path, **sections):
    """A loaded `RunConfig` for a `LiveHub` (the tests' defaults of `write_config`, `sections` merged over)."""
    from rl.config import load_config

    return load_config(write_config(run_dir, model_dir, **sections), [])


class AnswerLosingProxy:
    """Forwards every request to the hub, but answers the first successful `path` request with a 502
    instead of the hub's answer (kept in `lost`): a response lost on the way, after the hub acted."""

    def __init__(self, upstream: str, path: str) -> None:
        from starlette.applications import Starlette
        from starlette.routing import Route

        self.upstream, self.path = upstream, path
        self.lost: list[bytes] = []
        self.app = Starlette(routes=[Route("/{path:path}", self.forward, methods=["GET", "POST", "DELETE"])])

    async def forward(self, request):
        from starlette.responses import Response

        forwarded = ("authorization", "x-worker-secret", "content-type")
        headers = {k: v for k, v in request.headers.items() if k in forwarded}
        async with httpx.AsyncClient(base_url=self.upstream, timeout=120) as client:
            answer = await client.request(request.method, request.url.path, content=await request.body(),
                                          headers=headers)  # fmt: skip
        if request.url.path == self.path and answer.status_code == 200 and not self.lost:
            self.lost.append(answer.content)
            return Response(b"bad gateway", 502)
        return Response(answer.content, answer.status_code, {"content-type": answer.headers["content-type"]})
