"""Helpers for the worker tests: a stub hub (FastAPI on loopback, real HTTP) with fault injection.

Not the real hub (rl/hub/server.py): just the worker routes of rl/protocol.py,
backed by a real policy store (rl/weights.py), with knobs to corrupt or cut a
file download, reject submissions, forget workers (a hub restart) and answer
5xx. The other test_worker*.py files import it; it holds no tests itself.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse

from rl.protocol import (
    Ack,
    ErrorBody,
    HeartbeatRequest,
    HeartbeatResponse,
    Lease,
    LeasedTask,
    LeaseRequest,
    RegisterRequest,
    RegisterResponse,
    SamplingParamsWire,
    SubmitRequest,
    SubmitResponse,
)
from rl.weights import BASE, published_versions, read_manifest, version_dir

TOKEN = "worker-token"


def error(status: int, reason: str, detail: str = "") -> JSONResponse:
    return JSONResponse(ErrorBody(reason=reason, detail=detail or reason).model_dump(), status_code=status)


class StubHub:
    """State + FastAPI app. Tweak the public attributes from a test while it is served."""

    def __init__(self, policy_dir: Path, prompts: list[list[int]] | None = None) -> None:
        self.policy_dir = Path(policy_dir)
        self.queue: list[list[int]] = list(prompts or [])
        self.sampling = SamplingParamsWire(n=4, temperature=1.0, top_p=1.0, top_k=-1, max_tokens=16)
        self.max_model_len = 256
        self.heartbeat_interval_s = 0.2
        self.min_policy_version = 0
        self.workers: dict[str, RegisterRequest] = {}
        self.registrations: list[RegisterRequest] = []
        self.heartbeats: list[tuple[str, HeartbeatRequest]] = []
        self.leases: dict[str, tuple[str, list[LeasedTask]]] = {}
        self.submissions: list[SubmitRequest] = []
        self.left: list[str] = []
        self.requests: list[tuple[str, str, str | None]] = []
        """(method, path, Range header) of every request."""
        self.reject_submits = 0
        """Answer the next this-many submissions with 409 lease_expired."""
        self.fail_5xx = 0
        """Answer the next this-many requests with 503."""
        self.corrupt_once: set[str] = set()
        """File names served with a flipped byte the first time."""
        self.corrupt_always: set[str] = set()
        self.cut_once: set[str] = set()
        """File names whose first full download is cut off halfway."""
        self._task_id = 0
        self._lock = threading.Lock()
        self.app = self._build()

    # ------------------------------------------------------------------ helpers for tests

    def latest(self) -> int:
        return published_versions(self.policy_dir)[-1]

    def forget_workers(self) -> None:
        """What a hub restart looks like to a worker: its id is unknown."""
        with self._lock:
            self.workers.clear()
            self.leases.clear()

    def wait_for(self, predicate, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError("condition not reached")
            time.sleep(0.05)

    # ------------------------------------------------------------------ app

    def _build(self) -> FastAPI:
        app = FastAPI()
        hub = self

        @app.middleware("http")
        async def gate(request: Request, call_next):
            hub.requests.append((request.method, request.url.path, request.headers.get("range")))
            if hub.fail_5xx > 0:
                hub.fail_5xx -= 1
                return error(503, "unavailable")
            if request.headers.get("authorization") != f"Bearer {TOKEN}":
                return error(401, "bad_token", "unknown bearer token")
            return await call_next(request)

        @app.post("/v1/workers")
        def register(req: RegisterRequest) -> RegisterResponse:
            with hub._lock:
                worker_id = f"w{len(hub.registrations)}"
                hub.workers[worker_id] = req
                hub.registrations.append(req)
            return RegisterResponse(
                worker_id=worker_id,
                worker_secret=f"secret-{worker_id}",
                heartbeat_interval_s=hub.heartbeat_interval_s,
                policy_version=hub.latest(),
                max_model_len=hub.max_model_len,
                dtype="float32",
                sampling=hub.sampling,
            )

        @app.post("/v1/workers/{worker_id}/heartbeat", response_model=None)
        def heartbeat(worker_id: str, req: HeartbeatRequest) -> HeartbeatResponse | JSONResponse:
            if worker_id not in hub.workers:
                return error(404, "unknown_worker")
            hub.heartbeats.append((worker_id, req))
            return HeartbeatResponse(policy_version=hub.latest(), lease_ttl_s=60.0)

        @app.delete("/v1/workers/{worker_id}", response_model=None)
        def leave(worker_id: str) -> Ack | JSONResponse:
            if hub.workers.pop(worker_id, None) is None:
                return error(404, "unknown_worker")
            hub.left.append(worker_id)
            return Ack()

        @app.post("/v1/leases", response_model=None)
        def lease(req: LeaseRequest) -> Lease | JSONResponse:
            with hub._lock:
                if req.worker_id not in hub.workers:
                    return error(404, "unknown_worker")
                if req.policy_version < hub.min_policy_version:
                    return Lease(lease_id=None, min_policy_version=hub.min_policy_version, reason="update")
                if not hub.queue:
                    return Lease(lease_id=None, retry_after_s=0.1, reason="no work")
                tasks = []
                while hub.queue and len(tasks) < req.max_tasks:
                    tasks.append(LeasedTask(task_id=hub._task_id, prompt_token_ids=hub.queue.pop(0)))
                    hub._task_id += 1
                lease_id = f"l{len(hub.leases)}-{req.worker_id}"
                hub.leases[lease_id] = (req.worker_id, tasks)
            return Lease(lease_id=lease_id, expires_in_s=60.0, sampling=hub.sampling, tasks=tasks)

        @app.post("/v1/rollouts", response_model=None)
        def submit(req: SubmitRequest) -> SubmitResponse | JSONResponse:
            if req.worker_id not in hub.workers:
                return error(404, "unknown_worker")
            if hub.reject_submits > 0:
                hub.reject_submits -= 1
                return error(409, "lease_expired", "the lease expired")
            hub.submissions.append(req)
            return SubmitResponse(accepted=[r.task_id for r in req.results])

        @app.get("/v1/policy")
        def policy():
            return read_manifest(hub.policy_dir, hub.latest())

        @app.get("/v1/policy/{version}/files/{name}", response_model=None)
        def policy_file(version: str, name: str, request: Request):
            folder = hub.policy_dir / BASE if version == BASE else version_dir(hub.policy_dir, int(version))
            path = folder / name
            if not path.is_file():
                return error(404, "no_such_file")
            return hub._serve(path, request)

        return app

    def _serve(self, path: Path, request: Request) -> Response:
        name = path.name
        if name in self.corrupt_always or name in self.corrupt_once:
            self.corrupt_once.discard(name)
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 0xFF
            return Response(bytes(data), media_type="application/octet-stream")
        if name in self.cut_once and request.headers.get("range") is None:
            self.cut_once.discard(name)
            data = path.read_bytes()

            async def half():
                yield data[: len(data) // 2]
                raise ConnectionAbortedError("cut by the test")

            return StreamingResponse(half(), headers={"content-length": str(len(data))})
        return FileResponse(path)  # Starlette handles Range (206)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(app: FastAPI, port: int | None = None) -> Iterator[str]:
    """Run `app` with uvicorn on 127.0.0.1 in a thread; yields its base URL."""
    port = port or free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("stub server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def make_policy_store(model_dir: Path, policy_dir: Path, versions: int = 1, scale: float = 0.05) -> None:
    """Publish v0 = the model's weights and v1..v(versions-1) = perturbed copies."""
    from safetensors.torch import load_file

    from rl.weights import write_base, write_version

    write_base(policy_dir, model_dir)
    state = load_file(str(model_dir / "model.safetensors"))
    write_version(policy_dir, 0, state, "float32")
    for v in range(1, versions):
        write_version(policy_dir, v, perturbed(state, seed=v, scale=scale), "float32")


def perturbed(state: dict, seed: int, scale: float = 0.05) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    return {k: t + scale * torch.randn(t.shape, generator=g, dtype=t.dtype) for k, t in state.items()}


def hf_logprobs(model_dir: Path, state: dict | None, prompt: list[int], tokens: list[int]) -> list[float]:
    """Reference: log_softmax of an fp32 HF forward, at the sampled tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if state is not None:
        model.load_state_dict(state, strict=False)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0].float()
    lp = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
    return lp.gather(-1, torch.tensor(tokens)[:, None])[:, 0].tolist()
