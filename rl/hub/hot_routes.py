"""The three routes every worker calls all the time, answered without FastAPI's per-request machinery.

Leases, submissions and heartbeats are most of a busy hub's requests. Through FastAPI each one
paid for routing over every route, dependency solving, validating the returned model against its
`response_model` and rendering it with the stdlib `json` (scripts/bench_hub_cpu.py --profile: about
60% of the hub's CPU per submission). Here a request for one of them is parsed by pydantic-core
straight from the body (`model_validate_json`), handed to the same `Hub` method FastAPI's route calls,
and answered with the model's own `model_dump_json`. Everything else goes on to FastAPI, whose routes
for these three paths stay declared (OpenAPI, docs/protocol.md) and answer a request the same way.

Same contract as the FastAPI routes: caller from `Guard` (which authenticated it and read the body),
`HubError` -> its status with `{"reason", "detail"}`, an invalid body -> 422 `invalid_request`
(counted), an unexpected error -> `unexpected_error` (routes.py: a full disk ends the hub).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import pydantic

from rl.hub.guard import CALLER, error_body, send_json
from rl.hub.service import Hub
from rl.wire.protocol import HeartbeatRequest, HubError, LeaseRequest, SubmitRequest, Wire

log = logging.getLogger(__name__)

SECRET = b"x-worker-secret"
HEARTBEAT_PREFIX, HEARTBEAT_SUFFIX = "/v1/workers/", "/heartbeat"

Answer = tuple[int, bytes]
Handler = Callable[[bytes, str | None, str | None, str], Awaitable[Wire]]


def invalid_detail(errors: list[dict], where: tuple[str, ...] = ()) -> str:
    """A validation error's detail, for these routes and FastAPI's alike (`body.<field>: <message>`)."""
    return "; ".join(f"{'.'.join(map(str, (*where, *e['loc'])))}: {e['msg']}" for e in errors[:10])


class HotRoutes:
    """ASGI app: POST /v1/leases, /v1/rollouts and /v1/workers/{id}/heartbeat here, the rest to `app`."""

    def __init__(self, app, hub: Hub, on_error: Callable[[str, str, Exception], Answer]) -> None:
        self.app, self.hub, self.on_error = app, hub, on_error

        async def lease(body: bytes, who: str | None, key: str | None, _: str) -> Wire:
            return await hub.lease(LeaseRequest.model_validate_json(body), who, key)

        async def submit(body: bytes, who: str | None, key: str | None, _: str) -> Wire:
            return hub.submit(SubmitRequest.model_validate_json(body), who, key)

        async def heartbeat(body: bytes, who: str | None, key: str | None, worker_id: str) -> Wire:
            return hub.heartbeat(worker_id, HeartbeatRequest.model_validate_json(body), who, key)

        self.hot: dict[str, Handler] = {"/v1/leases": lease, "/v1/rollouts": submit}
        self.heartbeat = heartbeat

    def __getattr__(self, name):  # FastAPI's attributes (openapi, routes) stay reachable
        return getattr(self.app, name)

    def handler(self, scope) -> tuple[Handler, str] | None:
        if scope["type"] != "http" or scope["method"] != "POST" or CALLER not in scope:
            return None
        path: str = scope["path"]
        if (route := self.hot.get(path)) is not None:
            return route, ""
        if path.startswith(HEARTBEAT_PREFIX) and path.endswith(HEARTBEAT_SUFFIX):
            worker_id = path[len(HEARTBEAT_PREFIX) : -len(HEARTBEAT_SUFFIX)]
            if worker_id and "/" not in worker_id:
                return self.heartbeat, worker_id
        return None

    async def __call__(self, scope, receive, send):
        found = self.handler(scope)
        if found is None:
            return await self.app(scope, receive, send)
        route, worker_id = found
        message = await receive()  # Guard hands the whole body over in one message
        headers = dict(scope["headers"])
        content_type = headers.get(b"content-type", b"application/json")
        status, body = await self.answer(route, message.get("body", b""), scope[CALLER],
                                         headers.get(SECRET), content_type, worker_id, scope["path"])  # fmt: skip
        await send_json(send, status, body)

    async def answer(self, route: Handler, body: bytes, who: str | None, secret: bytes | None, content_type: bytes,
                     worker_id: str, path: str) -> Answer:  # fmt: skip
        try:
            if not content_type.startswith(b"application/json"):
                raise HubError(422, "invalid_request", "body: send Content-Type: application/json")
            key = secret.decode("latin-1") if secret is not None else None
            return 200, (await route(body, who, key, worker_id)).model_dump_json().encode()
        except pydantic.ValidationError as e:
            self.hub.state.count_rejection("invalid_request")
            return 422, error_body("invalid_request", invalid_detail(e.errors(include_url=False), ("body",)))
        except HubError as e:
            if e.reason == "invalid_request":
                self.hub.state.count_rejection(e.reason)
            return e.status, error_body(e.reason, e.detail)
        except Exception as e:  # noqa: BLE001 - answered as FastAPI's handler answers it (which uvicorn logs)
            log.exception("POST %s failed", path)
            return self.on_error("POST", path, e)
