"""The hub's HTTP edge: the FastAPI app over a `Hub` (rl/hub/service.py).

Each route parses its request, calls one method of the hub (or of its state or policy
files) and serialises the answer; no route reads or sets the state's fields. Every
rejection is a `HubError`, answered as a 4xx with `{"reason", "detail"}`, and leaves the
state as it was. The app is wrapped in `Guard` (rl/hub/guard.py): bearer auth and
bounded body reads before FastAPI sees a request. docs/protocol.md lists every route.
"""

from __future__ import annotations

import contextlib
import logging
import os

import pydantic_core
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from rl.hub.guard import CALLER, Guard, error_body
from rl.hub.hot_routes import HotRoutes, invalid_detail
from rl.hub.ledger import EXIT_DISK_FULL, disk_full
from rl.hub.service import Hub
from rl.wire.protocol import (
    IDENTITY_CHALLENGE_HEADER,
    IDENTITY_SIGNATURE_HEADER,
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
    IdentityChallenge,
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
    Stall,
    SubmitRequest,
    SubmitResponse,
)
from rl.wire.receipts import Contributions, StepReceipt

log = logging.getLogger(__name__)


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


def create_app(hub: Hub) -> Guard:
    """The hub's ASGI app: the routes below behind `Guard` (FastAPI's attributes stay reachable)."""
    state, files = hub.state, hub.files

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        async with hub.background():
            yield

    app = FastAPI(title="scatter-rl hub", version="1", lifespan=lifespan)
    app.router.route_class = FastJSONRoute

    @app.exception_handler(HubError)
    async def hub_error(request: Request, exc: HubError):
        return JSONResponse({"reason": exc.reason, "detail": exc.detail}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        state.count_rejection("invalid_request")
        return JSONResponse({"reason": "invalid_request", "detail": invalid_detail(exc.errors())}, status_code=422)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        status, body = unexpected_error(request.method, request.url.path, exc)
        return Response(body, status_code=status, media_type="application/json")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse({"reason": "http_error", "detail": str(exc.detail)}, status_code=exc.status_code)

    # async: FastAPI runs sync dependencies in a thread pool (a thread hop per request under load).
    async def caller(request: Request) -> str | None:
        """The caller's token id (None: the admin token): as `Guard` authenticated it."""
        if CALLER in request.scope:
            return request.scope[CALLER]
        return hub.tokens.caller(request.headers.get("authorization"))

    async def admin(who: str | None = Depends(caller)) -> None:
        if who is not None:
            raise HubError(403, "admin_only", "this route needs the admin token")

    async def secret(request: Request) -> str | None:
        """The worker's registration secret (checked by the hub with the worker id it acts for)."""
        return request.headers.get(WORKER_SECRET_HEADER)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"ok": True}

    # Unset fields stay out of the answer: a worker that offered no `wire` (an older one) gets the fields it knows.
    @app.post("/v1/workers", response_model=RegisterResponse, response_model_exclude_none=True)
    async def register(req: RegisterRequest, who: str | None = Depends(caller)):
        return hub.register(req, who)

    @app.post("/v1/challenges", response_model=IdentityChallenge)
    async def challenge(who: str | None = Depends(caller)):
        """A one-time string for a contributor key to sign (registration, fetching receipts)."""
        return hub.challenge()

    @app.get("/v1/contributions/{contributor}", response_model=Contributions)
    async def contributions(
        contributor: str,
        request: Request,
        who: str | None = Depends(caller),
        from_step: int = Query(0, ge=0, le=2**31 - 1, description="Receipts of this step and later only."),
    ):
        """A contributor's receipts and inclusion proofs: its token, its signature of a challenge, or admin."""
        headers = request.headers
        return hub.contributions_of(contributor, who, headers.get(IDENTITY_CHALLENGE_HEADER),
                                    headers.get(IDENTITY_SIGNATURE_HEADER), from_step)  # fmt: skip

    @app.post("/v1/workers/{worker_id}/heartbeat", response_model=HeartbeatResponse)
    async def heartbeat(
        worker_id: str, req: HeartbeatRequest, who: str | None = Depends(caller), key: str | None = Depends(secret)
    ):
        return hub.heartbeat(worker_id, req, who, key)

    @app.delete("/v1/workers/{worker_id}", response_model=Ack)
    async def leave(worker_id: str, who: str | None = Depends(caller), key: str | None = Depends(secret)):
        return hub.leave(worker_id, who, key)

    @app.post("/v1/leases", response_model=Lease)
    async def lease(req: LeaseRequest, who: str | None = Depends(caller), key: str | None = Depends(secret)):
        return await hub.lease(req, who, key)

    @app.post("/v1/rollouts", response_model=SubmitResponse)
    async def submit(req: SubmitRequest, who: str | None = Depends(caller), key: str | None = Depends(secret)):
        return hub.submit(req, who, key)

    @app.get("/v1/policy", response_model=PolicyManifest)
    async def policy(who: str | None = Depends(caller)):
        return hub.policy()

    @app.get("/v1/policy/{version}", response_model=PolicyManifest)
    async def policy_version(version: int, who: str | None = Depends(caller)):
        """One version's manifest: a worker rebuilding a delta chain reads the versions it lacks."""
        return hub.policy(version)

    @app.get("/v1/policy/base/weights", response_model=BaseWeights)
    async def base_weights(who: str | None = Depends(caller)):
        return files.base_weights()

    @app.get("/v1/policy/{version}/files/{name}")
    async def policy_file(version: str, name: str, who: str | None = Depends(caller)):
        return hub.policy_file(version, name)

    # HEAD too: an HTTP cache's auth check (nginx auth_request) asks for the headers only.
    @app.api_route("/v1/blobs/{sha256}", methods=["GET", "HEAD"])
    async def blob(sha256: str, request: Request, who: str | None = Depends(caller)):
        return files.blob(sha256, request.headers.get("if-none-match"))

    @app.get("/v1/status", response_model=HubStatus)
    async def status(
        who: str | None = Depends(caller),
        offset: int = Query(0, ge=0, le=2**31 - 1, description="First worker listed (registration order)."),
        limit: int = Query(100, ge=0, le=100_000, description="Workers listed; `worker_summary` covers all."),
    ):
        return hub.status(who, offset, limit)

    @app.post("/v1/batches", response_model=Batch, dependencies=[Depends(admin)])
    async def batches(req: BatchRequest):
        return Response(await hub.take_batch(req), media_type="application/json")

    @app.post("/v1/receipts", response_model=Ack, dependencies=[Depends(admin)])
    async def receipts(req: StepReceipt):
        return await hub.record_receipt(req)

    @app.post("/v1/policy", response_model=Ack, dependencies=[Depends(admin)])
    async def publish(req: PublishRequest):
        return await hub.publish(req.version)

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
        return hub.request_shutdown()

    @app.post("/v1/provenance", response_model=Ack, dependencies=[Depends(admin)])
    async def provenance(req: ProvenanceReport):
        return hub.record_provenance(req)

    @app.post("/v1/stalls", response_model=Ack, dependencies=[Depends(admin)])
    async def stall(req: Stall):
        return hub.record_stall(req)

    @app.post("/v1/admin/workers/{worker_id}/quarantine", response_model=Ack, dependencies=[Depends(admin)])
    async def quarantine(worker_id: str, req: QuarantineRequest):
        return hub.quarantine(worker_id, req.reason)

    @app.delete("/v1/admin/workers/{worker_id}/quarantine", response_model=Ack, dependencies=[Depends(admin)])
    async def release(worker_id: str):
        return hub.release(worker_id)

    @app.post("/v1/admin/tokens/revoke", response_model=Ack, dependencies=[Depends(admin)])
    async def revoke(req: RevokeTokenRequest):
        return hub.revoke_token(req.token)

    limit = int(hub.cfg.hub.max_body_mb * 1024 * 1024)
    hot = HotRoutes(app, hub, unexpected_error)
    return Guard(hot, hub.tokens, limit, hub.cfg.hub.body_timeout_s, on_reject=state.count_rejection)


def unexpected_error(method: str, path: str, exc: Exception) -> tuple[int, bytes]:
    """A 500 `internal_error`, or the hub's end on a full disk (as a failed batch record ends it): answering
    500s forever would leave every client retrying, while an exit lets `rl train` see the full disk and stop
    with a clear message."""
    if disk_full(exc):
        log.critical("no space left on the hub's disk (%s %s: %s); exiting", method, path, exc)
        logging.shutdown()
        os._exit(EXIT_DISK_FULL)
    return 500, error_body("internal_error", type(exc).__name__)
