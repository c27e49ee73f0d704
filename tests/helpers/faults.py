"""`FaultProxy`: an ASGI proxy in front of the real hub that injects the faults a network and a hub restart cause.

It wraps an ASGI app (the real hub app of `rl.hub.routes.create_app`, see `helpers.hub.LiveHub`) or
`forward_to(url)` (a hub process). Arm faults by setting attributes while it serves:

    fail_5xx = N        the next N requests get a 503 HTML page, as a reverse proxy sends while the hub is down
    fail_path[path] = N the next N requests to `path` (e.g. /v1/rollouts) get that 503
    corrupt[name] = N   the next N downloads of policy file `name` arrive with one byte flipped
    cut[name] = N       the next N whole-file (non-Range) downloads of `name` stop halfway: the connection drops
    stall[name] = N     the next N whole-file downloads of `name` stop sending halfway, the connection left open
                        for `stall_s` seconds (a stalled transfer the client must time out), then dropped

Every request is recorded in `exchanges` (method, path, Range header, status, and the JSON bodies both
ways), so a test can see what the worker sent and what the real hub answered.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from dataclasses import dataclass

import httpx
from starlette.requests import Request
from starlette.responses import Response

FILES = "/files/"
UNAVAILABLE = b"<html><body><h1>503 Service Unavailable</h1>the hub is not answering</body></html>"


@dataclass
class Exchange:
    method: str
    path: str
    range: str | None
    status: int | None = None
    request: bytes = b""
    response: bytes = b""
    """Response body, except for policy files (not kept)."""

    def json(self) -> dict:
        return json.loads(self.response)

    def sent(self) -> dict:
        return json.loads(self.request)


class FaultProxy:
    """ASGI app forwarding to `upstream`, with the faults of the module docstring; `upstream` may be swapped."""

    def __init__(self, upstream) -> None:
        self.upstream = upstream
        self.fail_5xx = 0
        self.fail_path: Counter[str] = Counter()
        self.corrupt: Counter[str] = Counter()
        self.cut: Counter[str] = Counter()
        self.stall: Counter[str] = Counter()
        self.stall_s = 20.0
        self.corrupted: list[str] = []
        """Paths of the downloads that were corrupted, in order."""
        self.exchanges: list[Exchange] = []

    def reset(self) -> None:
        """Disarm every fault and forget the exchanges (a hub shared by several tests starts each one clean)."""
        self.fail_5xx = 0
        self.fail_path.clear()
        self.corrupt.clear()
        self.cut.clear()
        self.stall.clear()
        self.corrupted.clear()
        self.exchanges.clear()

    # ------------------------------------------------------------------ views for tests

    def calls(self, method: str, path: str, status: int | None = None) -> list[Exchange]:
        return [e for e in self.exchanges if e.method == method and e.path == path and status in (None, e.status)]

    def file_gets(self, path: str) -> list[str | None]:
        """Range headers of the GETs of one policy file path, e.g. /v1/policy/2/files/model.safetensors."""
        return [e.range for e in self.exchanges if e.method == "GET" and e.path == path]

    # ------------------------------------------------------------------ ASGI

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.upstream(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers") or []}
        ex = Exchange(scope["method"], scope["path"], headers.get("range"))
        self.exchanges.append(ex)
        failing = self.fail_5xx > 0 or self._take(self.fail_path, scope["path"])
        if self.fail_5xx > 0:
            self.fail_5xx -= 1
        if failing:
            ex.status = 503
            await Response(UNAVAILABLE, 503, media_type="text/html")(scope, receive, send)
            return
        name = scope["path"].rsplit(FILES, 1)[1] if FILES in scope["path"] else None
        total, sent, corrupt, cut, stall = 0, 0, False, False, False

        async def recording_receive():
            message = await receive()
            if message["type"] == "http.request":
                ex.request += message.get("body", b"")
            return message

        async def faulty_send(message) -> None:
            nonlocal total, sent, corrupt, cut, stall
            if message["type"] == "http.response.start":
                ex.status = message["status"]
                length = dict(message.get("headers") or []).get(b"content-length")
                total = int(length) if length else 0
                if name is not None and ex.status in (200, 206) and total > 1:
                    corrupt = self._take(self.corrupt, name)
                    cut = ex.range is None and self._take(self.cut, name)
                    stall = ex.range is None and self._take(self.stall, name)
                    if corrupt:
                        self.corrupted.append(ex.path)
            elif message["type"] == "http.response.body":
                body = message.get("body", b"")
                if name is None:
                    ex.response += body
                half = total // 2
                if corrupt and sent <= half < sent + len(body):
                    flipped = bytearray(body)
                    flipped[half - sent] ^= 0xFF
                    message = {**message, "body": bytes(flipped)}
                if (cut or stall) and sent + len(body) > half:
                    await send({"type": "http.response.body", "body": body[: half - sent], "more_body": True})
                    if stall:
                        await asyncio.sleep(self.stall_s)
                    raise ConnectionAbortedError(f"FaultProxy cut {ex.path} at byte {half}")
                sent += len(body)
            await send(message)

        await self.upstream(scope, recording_receive, faulty_send)

    @staticmethod
    def _take(armed: Counter[str], name: str) -> bool:
        if armed[name] > 0:
            armed[name] -= 1
            return True
        return False


def forward_to(url: str):
    """An ASGI app passing each request on to the HTTP server at `url` (e.g. a hub process)."""

    async def app(scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        request = Request(scope, receive)
        forwarded = ("authorization", "x-worker-secret", "content-type", "range")
        headers = {k: v for k, v in request.headers.items() if k in forwarded}
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            answer = await client.request(request.method, target, content=await request.body(),
                                          headers=headers)  # fmt: skip
        keep = ("content-type", "content-range", "accept-ranges")
        response = Response(answer.content, answer.status_code, {k: v for k, v in answer.headers.items() if k in keep})
        await response(scope, receive, send)

    return app
