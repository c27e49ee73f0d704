"""The hub's outer ASGI layer: authenticate, then read the body within size and time limits.

It runs before FastAPI sees a request, so an unauthenticated caller costs the hub one header
comparison, never a body read or a JSON parse (docs/security.md). `/healthz` passes untouched;
every other path, `/openapi.json` and `/docs` included, needs a known bearer token (401
`missing_token`/`bad_token`). The body is then read here, at most `limit` bytes (413
`body_too_large`, declared or streamed) within `timeout_s` (408 `body_timeout`), and handed to
the app in one piece. Errors are the hub's `{"reason", "detail"}` bodies, like every rejection.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from rl.wire.protocol import HubError
from rl.wire.tokens import Tokens

OPEN_PATHS = frozenset({"/healthz"})
CALLER = "rl.caller"
"""The scope key under which the authenticated caller's token id (None: admin) goes on to the app."""


def error_body(reason: str, detail: str) -> bytes:
    """The hub's rejection body: `{"reason", "detail"}`."""
    return json.dumps({"reason": reason, "detail": detail}).encode()


async def send_json(send, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def send_error(send, status: int, reason: str, detail: str) -> None:
    await send_json(send, status, error_body(reason, detail))


class Guard:
    """ASGI middleware: bearer auth before any body byte is read; bounded, timed body reads."""

    def __init__(self, app, tokens: Tokens, limit: int, timeout_s: float, on_reject: Callable[[str], None] = None):
        self.app, self.tokens, self.limit, self.timeout_s = app, tokens, limit, timeout_s
        self.on_reject = on_reject or (lambda reason: None)

    def __getattr__(self, name):  # FastAPI's attributes (openapi, routes) stay reachable for tests
        return getattr(self.app, name)

    async def _refuse(self, send, status: int, reason: str, detail: str) -> None:
        self.on_reject(reason)
        await send_error(send, status, reason, detail)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") in OPEN_PATHS:
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        try:
            caller = self.tokens.caller((headers.get(b"authorization") or b"").decode("latin-1") or None)
        except HubError as e:
            return await self._refuse(send, e.status, e.reason, e.detail)
        scope = {**scope, CALLER: caller}  # the routes use it rather than comparing tokens again
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await self._refuse(send, 413, "body_too_large", f"body over {self.limit} bytes")
        body, more = bytearray(), True
        try:  # one deadline for the whole body (`asyncio.timeout`: wait_for made a task per message)
            async with asyncio.timeout(self.timeout_s):
                while more and len(body) <= self.limit:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return None
                    body += message.get("body", b"")
                    more = message.get("more_body", False)
        except TimeoutError:
            return await self._refuse(send, 408, "body_timeout", f"body not received within {self.timeout_s:g}s")
        if len(body) > self.limit:
            return await self._refuse(send, 413, "body_too_large", f"body over {self.limit} bytes")
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as the server would

        await self.app(scope, replay, send)
