"""The hub process: FastAPI routes over `HubState`, scoring through the verifier pool, policy files.

`rl hub CONFIG` (and `rl train`, which starts it as its own process) calls
`serve(cfg)`. The event loop only does bookkeeping and I/O: scoring runs in
the verifier pool's processes, so a slow or hostile completion never stalls
leases or submissions. Every rejection is a 4xx with `{"reason", "detail"}`
and leaves the state as it was (rl/hub/state.py checks before it changes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import sys
import time
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from rl.config import RunConfig
from rl.hub.guard import Guard
from rl.hub.state import HubState
from rl.hub.tokens import Tokens
from rl.hub.trust import Trust
from rl.protocol import (
    WORKER_SECRET_HEADER,
    Ack,
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
    ScoredCompletion,
    ScoredGroup,
    SubmitRequest,
    SubmitResponse,
)
from rl.weights import BASE, garbage_collect, read_manifest, version_dir

log = logging.getLogger(__name__)

KEEP_ALIVE_S = 75
"""Seconds an idle worker connection stays open (as nginx's default)."""
VERSION_PATTERN = re.compile(r"[0-9]{1,12}")
"""A policy version in a file URL: ASCII digits only (str.isdigit also accepts '²', int() does not)."""


class Hub:
    """The running hub: state, verifier pool, tokenizer for decoding, policy directory."""

    def __init__(self, cfg: RunConfig, state: HubState, pool, tokenizer, policy_dir: Path, tokens: Tokens):
        self.cfg, self.state, self.pool, self.tokenizer = cfg, state, pool, tokenizer
        self.policy_dir, self.tokens = Path(policy_dir), tokens
        self.changed = asyncio.Event()
        """Set when a scored group arrives (wakes batch pulls)."""
        self.work = asyncio.Event()
        """Replaced by `poke()` whenever leasable work may have appeared (wakes long-polling leases)."""
        self.shutdown_requested = asyncio.Event()
        self.trust = Trust(cfg.trust, state)
        self._scoring_tasks: set[asyncio.Task] = set()
        self.stop_ids = {tokenizer.eos_token_id} - {None}
        self._adopt_published_policy()

    def _adopt_published_policy(self) -> None:
        from rl.weights import published_versions

        versions = published_versions(self.policy_dir) if self.policy_dir.exists() else []
        if versions:
            self.state.policy_version = versions[-1]

    async def score_group(self, worker_id: str, worker_name: str, version: int, task_id: int, result) -> None:
        eval_row = self.state.eval_row(task_id)
        row_index = self.state.task_rows.get(task_id) if eval_row is None else eval_row
        if row_index is None:
            return
        prompts = self.state.prompts if eval_row is None else self.state.eval_prompts
        row = prompts.rows[row_index]
        texts = [self.scored_text(c.token_ids) for c in result.completions]
        try:
            rewards = await self.pool.score_many([(text, row) for text in texts])
        except Exception:
            log.exception("scoring task %d failed; re-queued", task_id)
            self.state.scoring_failed(task_id)
            self.poke()
            return
        if eval_row is not None:
            if task_id in self.state.scoring:
                self.state.eval_scored(task_id, result.completions, rewards)
            return
        group = ScoredGroup(
            task_id=task_id,
            row_index=row_index,
            prompt_token_ids=self.state.prompts.prompt_ids[row_index],
            policy_version=version,
            worker_id=worker_id,
            worker_name=worker_name,
            completions=[
                ScoredCompletion(
                    token_ids=c.token_ids,
                    logprobs=c.logprobs,
                    finish_reason=c.finish_reason,
                    reward=r.value,
                    components=r.components,
                )
                for c, r in zip(result.completions, rewards, strict=True)
            ],
        )
        if task_id in self.state.scoring:  # not re-queued meanwhile
            self.state.scored(group)
            self.changed.set()
            if self.trust.observe_group(group):  # quarantined: its tasks went back to the queue
                self.poke()

    def scored_text(self, token_ids: list[int]) -> str:
        """The text a verifier scores: every token the trainer will train on, special tokens included
        (stripping them would let a worker hide trained-on tokens from the scorer); only a final
        end-of-sequence token, where generation stopped, is left out."""
        if token_ids and token_ids[-1] in self.stop_ids:
            token_ids = token_ids[:-1]
        return self.tokenizer.decode(token_ids, skip_special_tokens=False)

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
                self.poke()
                log.info("re-queued %d tasks from expired leases; dropped %d silent workers", expired, dead)


def create_app(hub: Hub) -> FastAPI:
    state = hub.state

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        keeper = asyncio.create_task(hub.housekeeping())
        yield
        keeper.cancel()

    app = FastAPI(title="scatter-rl hub", version="1", lifespan=lifespan)

    @app.exception_handler(HubError)
    async def hub_error(request: Request, exc: HubError):
        return JSONResponse({"reason": exc.reason, "detail": exc.detail}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errors = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:10])
        state.rejections["invalid_request"] += 1
        return JSONResponse({"reason": "invalid_request", "detail": errors}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse({"reason": "http_error", "detail": str(exc.detail)}, status_code=exc.status_code)

    def caller(request: Request) -> str | None:
        return hub.tokens.caller(request.headers.get("authorization"))

    def admin(request: Request) -> None:
        if caller(request) is not None:
            raise HubError(403, "admin_only", "this route needs the admin token")

    def act_as(request: Request, worker_id: str) -> str | None:
        """The caller's token id after checking it may act for `worker_id` (its registration secret)."""
        who = caller(request)
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
        state.heartbeat(worker_id, who, req.policy_version, req.tokens_per_s, time.monotonic())
        return HeartbeatResponse(policy_version=state.policy_version, lease_ttl_s=hub.cfg.hub.lease_ttl_s)

    @app.delete("/v1/workers/{worker_id}", response_model=Ack)
    async def leave(worker_id: str, request: Request):
        who = act_as(request, worker_id)
        returned = state.leave(worker_id, who)
        hub.poke()
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
        new, dups = state.validate_submission(req, who)
        if new and (stale := state.stale_submission(req)) is not None:
            hub.poke()  # its tasks were re-queued
            raise stale
        if new:
            rec = state.workers[req.worker_id]
            state.accept(req, new, time.monotonic())
            by_id = {r.task_id: r for r in req.results}
            for tid in new:
                hub.spawn(hub.score_group(rec.worker_id, rec.name, req.policy_version, tid, by_id[tid]))
        return SubmitResponse(accepted=new, duplicates=dups)

    @app.get("/v1/policy", response_model=PolicyManifest)
    async def policy(who: str | None = Depends(caller)):
        if state.policy_version < 0:
            raise HubError(409, "no_policy", "no policy version published yet; retry shortly")
        return read_manifest(hub.policy_dir, state.policy_version)

    @app.get("/v1/policy/{version}/files/{name}")
    async def policy_file(version: str, name: str, who: str | None = Depends(caller)):
        if version == BASE and state.policy_version >= 0:
            directory = hub.policy_dir / BASE
            allowed = {f.name for f in read_manifest(hub.policy_dir, state.policy_version).base_files}
        elif VERSION_PATTERN.fullmatch(version) and version_dir(hub.policy_dir, int(version)).is_dir():
            directory = version_dir(hub.policy_dir, int(version))
            allowed = {f.name for f in read_manifest(hub.policy_dir, int(version)).files}
        else:
            raise HubError(404, "unknown_version", f"policy version {version} is not available")
        if name not in allowed:  # also rules out any path traversal
            raise HubError(404, "unknown_file", f"{name} is not a file of policy version {version}")
        return FileResponse(directory / name, media_type="application/octet-stream")

    @app.get("/v1/status", response_model=HubStatus)
    async def status(who: str | None = Depends(caller)):
        return hub.trust.annotate(state.status(time.monotonic(), hub.pool.metrics()), who)

    @app.post("/v1/batches", response_model=Batch, dependencies=[Depends(admin)])
    async def batches(req: BatchRequest):
        deadline = time.monotonic() + req.timeout_s
        stale_total = skipped_total = 0
        while True:
            hub.changed.clear()
            groups, stale, skipped = state.take_batch(req.num_groups, req.step, req.skip_zero_variance)
            if groups or stale or skipped:
                hub.poke()  # the staleness window moved on, or dropped tasks were re-queued
            stale_total, skipped_total = stale_total + stale, skipped_total + skipped
            remaining = deadline - time.monotonic()
            if groups or remaining <= 0:
                return Batch(
                    groups=groups,
                    complete=bool(groups),
                    stale_dropped=stale_total,
                    zero_variance_skipped=skipped_total,
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(hub.changed.wait(), timeout=min(remaining, 1.0))

    @app.post("/v1/policy", response_model=Ack, dependencies=[Depends(admin)])
    async def publish(req: PublishRequest):
        try:
            read_manifest(hub.policy_dir, req.version)
        except (OSError, ValueError) as e:
            raise HubError(422, "bad_policy", f"version {req.version} has no readable manifest: {e}") from None
        state.policy_version = req.version
        hub.poke()
        garbage_collect(hub.policy_dir, state.versions_in_use() | {req.version}, hub.cfg.weights.keep_versions)
        log.info("policy version %d published", req.version)
        return Ack()

    @app.post("/v1/evals", response_model=EvalJob, dependencies=[Depends(admin)])
    async def start_eval(req: EvalRequest):
        job = state.start_eval(req)
        hub.poke()
        return job

    @app.get("/v1/evals/{job_id}", response_model=EvalJob, dependencies=[Depends(admin)])
    async def eval_status(job_id: str):
        return state.eval_status(job_id)

    @app.get("/v1/ledger", response_model=Ledger, dependencies=[Depends(admin)])
    async def ledger():
        return state.ledger()

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


def build_hub(cfg: RunConfig, ledger: Ledger | None = None, tokens: Tokens | None = None) -> Hub:
    """Load tokenizer and prompts, start the verifier pool; everything a hub needs but a socket."""
    from transformers import AutoConfig, AutoTokenizer

    from rl.data import PromptSet, load_rows
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
    return Hub(cfg, state, pool, tokenizer, cfg.paths.policy, tokens)


def serve(cfg: RunConfig, ledger_path: Path | None = None) -> int:
    """Run the hub until shutdown; prints the URL (and generated tokens once)."""
    import uvicorn

    tokens, generated = Tokens.from_config(cfg)
    ledger = Ledger.model_validate_json(Path(ledger_path).read_text()) if ledger_path else None
    hub = build_hub(cfg, ledger, tokens)
    sock = socket.socket(socket.AF_INET6 if ":" in cfg.hub.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit this. Without it (the event loop only sets it on sockets it made
    # itself) every response, written as headers then body, waited ~40 ms for the client's delayed
    # ACK (Nagle): 44 ms per request on loopback instead of ~2 ms.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((cfg.hub.host, cfg.hub.port))
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

    asyncio.run(main())
    return 0
