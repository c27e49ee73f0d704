"""The hub process: FastAPI routes over `HubState`, scoring through the verifier pool, policy files.

`rl hub CONFIG` (and `rl train`, which starts it as its own process) calls
`serve(cfg)`. The HTTP layer is thin: a route parses its request, calls one
`HubState` method (rl/hub/state.py owns every rule of the task lifecycle) and
serialises the answer; long polls wait on events the state fires (`on_work`,
`on_scored`). The event loop only does bookkeeping and I/O: scoring runs in
the verifier pool's processes, so a slow or hostile completion never stalls
leases or submissions. Every rejection is a 4xx with `{"reason", "detail"}`
and leaves the state as it was (the state checks before it changes).
The ledger is kept in run_dir/hub.sqlite (rl/hub/ledger.py): a batch is recorded
there before it is answered, the rest every half second, so a hub that dies is
restarted from it (by `rl train`) with nothing lost or trained twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import sys
import time
from pathlib import Path

import pydantic_core
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from rl.config import RunConfig
from rl.hub.blobs import BlobIndex
from rl.hub.guard import Guard
from rl.hub.ledger import FLUSH_INTERVAL_S, LedgerStore
from rl.hub.state import HubState, ScoringJob
from rl.hub.trust import Trust
from rl.weights.store import BASE, MANIFEST, garbage_collect, published_versions, read_manifest, version_dir
from rl.wire.protocol import (
    WORKER_SECRET_HEADER,
    Ack,
    BaseWeights,
    Batch,
    BatchRequest,
    EvalJob,
    EvalRequest,
    HeartbeatRequest,
    HeartbeatResponse,
    HubError,
    HubStatus,
    Lease,
    LeaseRequest,
    Ledger,
    PolicyManifest,
    ProvenanceReport,
    PublishRequest,
    QuarantineRequest,
    RegisterRequest,
    RegisterResponse,
    RevokeTokenRequest,
    SubmitRequest,
    SubmitResponse,
)
from rl.wire.tokens import Tokens

log = logging.getLogger(__name__)

KEEP_ALIVE_S = 75
"""Seconds an idle worker connection stays open (as nginx's default)."""


class FastJSONRoute(APIRoute):
    """Routes whose JSON bodies are parsed by pydantic-core (Rust) instead of the stdlib `json`.

    FastAPI reads a body through `Request.json()` (stdlib json: the hub's largest cost under load,
    for submissions of thousands of token ids and logprobs); filling the request's cache first keeps
    FastAPI's validation, errors and OpenAPI schema exactly as they are.
    """

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def route(request: Request):
            if request.headers.get("content-type", "").startswith("application/json"):
                body = await request.body()
                if body:
                    with contextlib.suppress(ValueError):  # malformed: FastAPI's own path reports it
                        request._json = pydantic_core.from_json(body)
            return await handler(request)

        return route


def decode_texts(tokenizer, sequences: list[list[int]], skip_special_tokens: bool = True) -> list[str]:
    """`tokenizer.decode(ids, skip_special_tokens=...)` for each sequence, in one call to the Rust
    tokenizer when there is one (transformers' own decode first copies every id through Python)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return backend.decode_batch(sequences, skip_special_tokens=skip_special_tokens)
    return [tokenizer.decode(ids, skip_special_tokens=skip_special_tokens) for ids in sequences]


VERSION_PATTERN = re.compile(r"[0-9]{1,12}")
"""A policy version in a file URL: ASCII digits only (str.isdigit also accepts '²', int() does not)."""


class Hub:
    """The running hub: state, verifier pool, tokenizer for decoding, policy directory, ledger database."""

    def __init__(self, cfg: RunConfig, state: HubState, pool, tokenizer, policy_dir: Path, tokens: Tokens,
                 store: LedgerStore | None = None):  # fmt: skip
        self.cfg, self.state, self.pool, self.tokenizer = cfg, state, pool, tokenizer
        self.policy_dir, self.tokens, self.store = Path(policy_dir), tokens, store
        self.blobs = BlobIndex(self.policy_dir)
        """Policy files by sha256 (`GET /v1/blobs/{sha256}`) and the count of bytes served."""
        self.changed = asyncio.Event()
        """Set when a scored group arrives (wakes batch pulls)."""
        self.work = asyncio.Event()
        """Replaced by `poke()` whenever leasable work may have appeared (wakes long-polling leases)."""
        self.shutdown_requested = asyncio.Event()
        self.trust = Trust(cfg.trust, state)
        self._scoring_tasks: set[asyncio.Task] = set()
        state.on_work, state.on_scored = self.poke, self.changed.set
        self._ledger_lock = asyncio.Lock()
        """Held while the ledger is written (off the event loop): one snapshot at a time, in order."""
        self.stop_ids = {getattr(tokenizer, "eos_token_id", None)} - {None}
        self._adopt_published_policy()
        self.flush_ledger()

    def _adopt_published_policy(self) -> None:
        versions = published_versions(self.policy_dir) if self.policy_dir.exists() else []
        if versions:  # a restarted hub serves what the trainer already published
            self.state.publish(versions[-1])
        recorded = self.store.policy_version if self.store is not None else -1
        if recorded >= 0 and recorded != self.state.policy_version:
            # The files are what workers load: they win. Newer on disk is a publish the trainer
            # wrote but the dead hub had not recorded (the trainer re-announces it); older means
            # versions were deleted by hand.
            log.warning("the ledger says policy version %d was published, the newest on disk is %d: using %d",
                        recorded, self.state.policy_version, self.state.policy_version)  # fmt: skip

    def flush_ledger(self, batch: tuple[str, bytes] | None = None) -> None:
        """Commit the ledger's changes (and a batch answer about to be sent) to the database, if any.

        Blocking: for start-up and shutdown. While serving, `write_ledger`.
        """
        if self.store is not None:
            self.store.save(self.state.ledger(), self.state.policy_version, batch)

    async def write_ledger(self, batch: tuple[str, bytes] | None = None) -> None:
        """`flush_ledger` in a thread, so a large batch's write never stalls leases and submissions.

        The snapshot is taken under the lock: a write never replaces a newer snapshot with an older one.
        """
        if self.store is None:
            return
        async with self._ledger_lock:
            ledger, version = self.state.ledger(), self.state.policy_version
            await asyncio.to_thread(self.store.save, ledger, version, batch)

    async def record_batch(self, pull_id: str | None, body: bytes) -> None:
        """Commit a batch about to be answered, or exit: a hub that cannot record a batch must not hand it out.

        Its groups already left the in-memory buffer; exiting is a crash like any other, and the
        restarted hub re-queues them from the database (`rl train` restarts it).
        """
        try:
            await self.write_ledger((pull_id or "", body))
        except Exception:
            log.critical("cannot record the batch in %s; exiting (restarted from the database by rl train)",
                         self.store.path if self.store else None, exc_info=True)  # fmt: skip
            logging.shutdown()
            os._exit(75)

    async def flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_S)
            try:
                await self.write_ledger()
            except Exception:  # a full disk: the next flush (or the next batch pull) tries again
                log.exception("writing the ledger to %s failed", self.store.path if self.store else None)

    async def score(self, job: ScoringJob) -> None:
        """Score one task in the verifier pool; on an error, retry after the state's backoff or give up."""
        start = time.perf_counter()
        texts = self.scored_texts([c.token_ids for c in job.completions])
        while True:
            try:
                rewards = await self.pool.score_many([(text, job.example) for text in texts])
            except Exception as e:  # noqa: BLE001 - any scoring failure is retried, then reported
                retry_in = self.state.fail_scoring(job, f"{type(e).__name__}: {e}")
                if retry_in is None:
                    log.error("scoring task %d failed %d times; dropped: %s", job.task_id, job.attempt, e)
                    return
                log.warning("scoring task %d failed (attempt %d): %s; retry in %.1f s", job.task_id, job.attempt, e,
                            retry_in)  # fmt: skip
                await asyncio.sleep(retry_in)
                job = job.retry()
                continue
            self.state.finish_scoring(job, rewards, time.perf_counter() - start)
            group = self.state.buffer.get(job.task_id)
            if group is not None and self.trust.observe_group(group):  # quarantined: its tasks went back
                self.poke()
            return

    def scored_texts(self, sequences: list[list[int]]) -> list[str]:
        """The texts a verifier scores: every token the trainer will train on, special tokens included
        (stripping them would let a worker hide trained-on tokens from the scorer); only a final
        end-of-sequence token, where generation stopped, is left out."""
        cut = [ids[:-1] if ids and ids[-1] in self.stop_ids else ids for ids in sequences]
        return decode_texts(self.tokenizer, cut, skip_special_tokens=False)

    def poke(self) -> None:
        """Wake the leases waiting for work (see `lease` in create_app)."""
        self.work.set()
        self.work = asyncio.Event()

    def spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._scoring_tasks.add(task)
        task.add_done_callback(self._scoring_tasks.discard)

    async def housekeeping(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            expired, dead = self.state.expire(time.monotonic())
            if expired or dead:
                log.info("re-queued %d tasks from expired leases; dropped %d silent workers", expired, dead)


def create_app(hub: Hub) -> FastAPI:
    state = hub.state

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        keeper = asyncio.create_task(hub.housekeeping())
        flusher = asyncio.create_task(hub.flush_periodically())
        yield
        keeper.cancel()
        flusher.cancel()

    app = FastAPI(title="scatter-rl hub", version="1", lifespan=lifespan)
    app.router.route_class = FastJSONRoute

    @app.exception_handler(HubError)
    async def hub_error(request: Request, exc: HubError):
        return JSONResponse({"reason": exc.reason, "detail": exc.detail}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errors = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:10])
        state.count_rejection("invalid_request")
        return JSONResponse({"reason": "invalid_request", "detail": errors}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse({"reason": "http_error", "detail": str(exc.detail)}, status_code=exc.status_code)

    # async: FastAPI runs sync dependencies in a thread pool (a thread hop per request under load).
    async def caller(request: Request) -> str | None:
        return hub.tokens.caller(request.headers.get("authorization"))

    async def admin(request: Request) -> None:
        if await caller(request) is not None:
            raise HubError(403, "admin_only", "this route needs the admin token")

    def act_as(request: Request, worker_id: str) -> str | None:
        """The caller's token id after checking it may act for `worker_id` (its registration secret)."""
        who = hub.tokens.caller(request.headers.get("authorization"))
        state.authorize(worker_id, who, request.headers.get(WORKER_SECRET_HEADER))
        return who

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"ok": True}

    @app.post("/v1/workers", response_model=RegisterResponse)
    async def register(req: RegisterRequest, who: str | None = Depends(caller)):
        resp = state.register(req, who, time.monotonic())
        log.info("worker %s (%s, %s) registered", resp.worker_id, req.name, req.engine)
        return resp

    @app.post("/v1/workers/{worker_id}/heartbeat", response_model=HeartbeatResponse)
    async def heartbeat(worker_id: str, req: HeartbeatRequest, request: Request):
        who = act_as(request, worker_id)
        return state.heartbeat(worker_id, who, req.policy_version, req.tokens_per_s, time.monotonic(),
                               req.fetch_s, req.load_s)  # fmt: skip

    @app.delete("/v1/workers/{worker_id}", response_model=Ack)
    async def leave(worker_id: str, request: Request):
        who = act_as(request, worker_id)
        returned = state.leave(worker_id, who)
        log.info("worker %s left; %d tasks re-queued", worker_id, returned)
        return Ack(detail=f"{returned} tasks re-queued")

    @app.post("/v1/leases", response_model=Lease)
    async def lease(req: LeaseRequest, request: Request):
        who = act_as(request, req.worker_id)
        hub.trust.check(req.worker_id)
        # Long poll: without work, hold the request up to `wait_s`, re-trying whenever poked.
        deadline = time.monotonic() + req.wait_s
        while True:
            woken = hub.work
            answer = state.lease(req, who, time.monotonic())
            remaining = deadline - time.monotonic()
            if answer.lease_id is not None or answer.min_policy_version > req.policy_version:
                return answer
            if remaining <= 0:
                return answer.model_copy(update={"retry_after_s": 0.0}) if req.wait_s > 0 else answer
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(woken.wait(), timeout=min(remaining, 1.0))

    @app.post("/v1/rollouts", response_model=SubmitResponse)
    async def submit(req: SubmitRequest, request: Request):
        who = act_as(request, req.worker_id)
        hub.trust.check(req.worker_id)
        answer, jobs = state.submit(req, who, time.monotonic())
        for job in jobs:
            hub.spawn(hub.score(job))
        return answer

    @app.get("/v1/policy", response_model=PolicyManifest)
    async def policy(who: str | None = Depends(caller)):
        return read_manifest(hub.policy_dir, state.current_policy())

    @app.get("/v1/policy/{version}", response_model=PolicyManifest)
    async def policy_version(version: int, who: str | None = Depends(caller)):
        """One version's manifest: a worker rebuilding a delta chain reads the versions it lacks."""
        if not 0 <= version <= state.policy_version or not (version_dir(hub.policy_dir, version) / MANIFEST).is_file():
            raise HubError(404, "unknown_version", f"policy version {version} is not available")
        return read_manifest(hub.policy_dir, version)

    @app.get("/v1/policy/base/weights", response_model=BaseWeights)
    async def base_weights(who: str | None = Depends(caller)):
        return hub.blobs.base_weights()

    @app.get("/v1/policy/{version}/files/{name}")
    async def policy_file(version: str, name: str, who: str | None = Depends(caller)):
        if version == BASE and state.policy_version >= 0:
            directory = hub.policy_dir / BASE
            allowed = {f.name for f in read_manifest(hub.policy_dir, state.current_policy()).base_files}
        elif VERSION_PATTERN.fullmatch(version) and version_dir(hub.policy_dir, int(version)).is_dir():
            directory = version_dir(hub.policy_dir, int(version))
            manifest = read_manifest(hub.policy_dir, int(version))
            allowed = {f.name for f in manifest.files + manifest.deltas}
        else:
            raise HubError(404, "unknown_version", f"policy version {version} is not available")
        if name not in allowed:  # also rules out any path traversal
            raise HubError(404, "unknown_file", f"{name} is not a file of policy version {version}")
        return hub.blobs.file_response(directory / name)

    # HEAD too: an HTTP cache's auth check (nginx auth_request) asks for the headers only.
    @app.api_route("/v1/blobs/{sha256}", methods=["GET", "HEAD"])
    async def blob(sha256: str, request: Request, who: str | None = Depends(caller)):
        return hub.blobs.response(sha256, request.headers.get("if-none-match"))

    @app.get("/v1/status", response_model=HubStatus)
    async def status(
        who: str | None = Depends(caller),
        offset: int = Query(0, ge=0, le=2**31 - 1, description="First worker listed (registration order)."),
        limit: int = Query(100, ge=0, le=100_000, description="Workers listed; `worker_summary` covers all."),
    ):
        status = state.status(time.monotonic(), hub.pool.metrics(), offset, limit)
        return hub.trust.annotate(status, who).model_copy(update={"weights_served": hub.blobs.stats()})

    @app.post("/v1/batches", response_model=Batch, dependencies=[Depends(admin)])
    async def batches(req: BatchRequest):
        if hub.store is not None and (again := hub.store.replay(req.pull_id)) is not None:
            return Response(again, media_type="application/json")  # a retry: its answer was lost
        deadline = time.monotonic() + req.timeout_s
        stale_total = skipped_total = 0
        while True:
            hub.changed.clear()
            groups, stale, skipped = state.take_batch(req.num_groups, req.step, req.skip_zero_variance)
            stale_total, skipped_total = stale_total + stale, skipped_total + skipped
            remaining = deadline - time.monotonic()
            if groups or remaining <= 0:
                batch = Batch.model_construct(
                    groups=groups,
                    complete=bool(groups),
                    stale_dropped=stale_total,
                    zero_variance_skipped=skipped_total,
                )
                body = batch.model_dump_json().encode()
                if groups:  # consumed on disk before the trainer can have it (rl/hub/ledger.py)
                    await hub.record_batch(req.pull_id, body)
                return Response(body, media_type="application/json")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(hub.changed.wait(), timeout=min(remaining, 1.0))

    @app.post("/v1/policy", response_model=Ack, dependencies=[Depends(admin)])
    async def publish(req: PublishRequest):
        try:
            read_manifest(hub.policy_dir, req.version)
        except (OSError, ValueError) as e:
            raise HubError(422, "bad_policy", f"version {req.version} has no readable manifest: {e}") from None
        keep = state.publish(req.version)
        if req.version == 0:  # the base weights: described before the version can be collected
            try:
                hub.blobs.record_base_weights()
            except (HubError, OSError) as e:
                log.warning("could not describe the base weights of version 0: %s", e)
        await hub.write_ledger()
        garbage_collect(hub.policy_dir, keep, hub.cfg.weights.keep_versions)
        log.info("policy version %d published", req.version)
        return Ack()

    @app.post("/v1/evals", response_model=EvalJob, dependencies=[Depends(admin)])
    async def start_eval(req: EvalRequest):
        return state.start_eval(req)

    @app.get("/v1/evals/{job_id}", response_model=EvalJob, dependencies=[Depends(admin)])
    async def eval_status(job_id: str):
        return state.eval_status(job_id)

    @app.get("/v1/ledger", response_model=Ledger, dependencies=[Depends(admin)])
    async def ledger():
        return state.ledger()

    @app.get("/v1/audit", dependencies=[Depends(admin)])
    async def audit() -> dict:
        """Task ids by place (queued, leased, scoring, buffered) and the data position: for load tests."""
        return state.audit()

    @app.post("/v1/shutdown", response_model=Ack, dependencies=[Depends(admin)])
    async def shutdown():
        hub.shutdown_requested.set()
        return Ack(detail="shutting down")

    add_trust_routes(app, hub, admin)
    limit = int(hub.cfg.hub.max_body_mb * 1024 * 1024)
    return Guard(app, hub.tokens, limit, hub.cfg.hub.body_timeout_s, on_reject=lambda r: state.rejections.update([r]))


def add_trust_routes(app: FastAPI, hub: Hub, admin) -> None:
    """Admin routes of rl/hub/trust.py: provenance reports, quarantine, revocation."""
    state = hub.state

    @app.post("/v1/provenance", response_model=Ack, dependencies=[Depends(admin)])
    async def provenance(req: ProvenanceReport):
        if hub.trust.record(req):
            hub.poke()
        return Ack()

    @app.post("/v1/admin/workers/{worker_id}/quarantine", response_model=Ack, dependencies=[Depends(admin)])
    async def quarantine(worker_id: str, req: QuarantineRequest):
        state.worker(worker_id, None)
        requeued = hub.trust.quarantine(worker_id, req.reason)
        hub.poke()
        return Ack(detail=f"{requeued} tasks re-queued")

    @app.delete("/v1/admin/workers/{worker_id}/quarantine", response_model=Ack, dependencies=[Depends(admin)])
    async def release(worker_id: str):
        hub.trust.release(worker_id)
        return Ack(detail="quarantine lifted")

    @app.post("/v1/admin/tokens/revoke", response_model=Ack, dependencies=[Depends(admin)])
    async def revoke(req: RevokeTokenRequest):
        tid = hub.tokens.revoke(req.token)
        gone = [w for w in list(state.workers.values()) if w.token == tid]
        returned = sum(state.leave(w.worker_id, None) for w in gone)
        hub.poke()
        log.warning("worker token %s revoked: %d workers removed, %d tasks re-queued", tid, len(gone), returned)
        return Ack(detail=f"{len(gone)} workers removed, {returned} tasks re-queued")


def build_hub(
    cfg: RunConfig, ledger: Ledger | None = None, tokens: Tokens | None = None, store: LedgerStore | None = None
) -> Hub:
    """Load tokenizer and prompts, start the verifier pool; everything a hub needs but a socket.

    `ledger` restores the data position; `store` is where the ledger is kept from then on.
    """
    from transformers import AutoConfig, AutoTokenizer

    from rl.hub.data import PromptSet, load_rows
    from rl.models import resolve_model
    from verifiers.pool import VerifierPool

    model_dir = resolve_model(cfg.model.name)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=cfg.model.trust_remote_code)
    vocab_size = AutoConfig.from_pretrained(model_dir, trust_remote_code=cfg.model.trust_remote_code).vocab_size
    train_rows, eval_rows = load_rows(cfg.data)
    prompts = PromptSet.build(train_rows, cfg.data, tokenizer)
    eval_prompts = PromptSet.build(eval_rows, cfg.data, tokenizer) if eval_rows else None
    log.info("hub: %d training prompts (%d too long, skipped)", len(prompts), prompts.skipped_too_long)
    state = HubState(cfg, prompts, vocab_size, ledger, eval_prompts)
    pool = VerifierPool.from_config(cfg.rewards)
    if tokens is None:
        tokens, _ = Tokens.from_config(cfg)
    return Hub(cfg, state, pool, tokenizer, cfg.paths.policy, tokens, store)


def open_ledger(cfg: RunConfig, ledger_path: Path | None) -> tuple[LedgerStore, Ledger | None]:
    """The run's ledger database and the ledger to start from.

    With `ledger_path` (a checkpoint's ledger.json: `rl train --resume`) that ledger wins and
    the database is reset to it; otherwise the database's own (a restart after a crash), if any.
    """
    store = LedgerStore(cfg.paths.hub_db)
    if ledger_path is not None:
        ledger = Ledger.model_validate_json(Path(ledger_path).read_text())
        store.reset(ledger)
        log.info("hub ledger reset to %s", ledger_path)
        return store, ledger
    ledger = store.ledger
    if ledger is not None:
        log.warning("hub ledger restored from %s: position %d, %d batches taken, %d pending tasks re-queued "
                    "(delete the file to start the data over)", store.path, ledger.position, ledger.batches,
                    len(ledger.pending))  # fmt: skip
    return store, ledger


def listening_socket(host: str, port: int) -> socket.socket:
    """The hub's bound server socket (uvicorn listens on it), with TCP_NODELAY for every connection."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit this. Without it (the event loop only sets it on sockets it made
    # itself) every response, written as headers then body, waited ~40 ms for the client's delayed
    # ACK (Nagle): 44 ms per request on loopback instead of ~2 ms.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    return sock


def serve(cfg: RunConfig, ledger_path: Path | None = None) -> int:
    """Run the hub until shutdown; prints the URL (and generated tokens once)."""
    import uvicorn

    tokens, generated = Tokens.from_config(cfg)
    store, ledger = open_ledger(cfg, ledger_path)
    hub = build_hub(cfg, ledger, tokens, store)
    sock = listening_socket(cfg.hub.host, cfg.hub.port)
    port = sock.getsockname()[1]
    url = cfg.hub.public_url or f"http://{cfg.hub.host}:{port}"
    print(f"hub listening on {url}", file=sys.stderr, flush=True)
    if generated:
        print(f"admin token:  {tokens.admin}\nworker token: {tokens.workers[0]}", file=sys.stderr, flush=True)
    print(f"add a rollout worker: rl rollout --hub {url} --token <worker token>", file=sys.stderr, flush=True)
    app = create_app(hub)
    # Keep idle connections well past a heartbeat interval: with uvicorn's default (5 s, the default
    # heartbeat too) the hub closes a worker's connection just as the worker reuses it, and the
    # request fails with a ReadError (retried, but logged as "hub unavailable").
    keep_alive = max(KEEP_ALIVE_S, int(3 * cfg.hub.heartbeat_interval_s) + 1)
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", timeout_keep_alive=keep_alive)
    )

    async def main() -> None:
        async def stop_on_request() -> None:
            await hub.shutdown_requested.wait()
            await asyncio.sleep(0.2)  # let the shutdown response go out
            server.should_exit = True

        watcher = asyncio.create_task(stop_on_request())
        try:
            await server.serve(sockets=[sock])
        finally:
            watcher.cancel()
            hub.pool.close()

    try:
        try:
            import uvloop  # uvicorn[standard] brings it: a faster event loop than asyncio's default
        except ImportError:
            asyncio.run(main())
        else:
            uvloop.run(main())
    finally:  # after the loop, whose exit waited for any ledger write still running in a thread
        hub.flush_ledger()
        store.close()
    return 0
