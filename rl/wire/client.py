"""The one HTTP client base of the hub's wire (rl/wire/protocol.py is the contract).

Every caller of a hub goes through `HubHTTP`: the rollout worker's `HubClient`
(rollout_workers/client.py), the trainer's `HubAdmin` (rl/wire/admin.py), `rl status`
(rl/cli/status_view.py) and the launcher's health wait. It owns bearer auth (and a
registration's `X-Worker-Secret`); one retry policy (connection errors, timeouts, 5xx and
429 retried with capped, jittered exponential backoff until `max_retry_s` runs out,
`stop_event` ends the wait); error parsing (any other 4xx becomes the hub's own
`HubError`, `AuthError` for 401/403, `UnknownWorker` for a 404 about a worker id); and
pydantic in and out (requests are `Wire` models, answers are validated into one).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import httpx
from pydantic import BaseModel, ValidationError
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_delay,
    stop_never,
    wait_exponential_jitter,
)

from rl.wire.protocol import WORKER_SECRET_HEADER, HubError
from rl.wire.waits import pending

log = logging.getLogger(__name__)

T = TypeVar("T", bound=BaseModel)
R = TypeVar("R")
LOG_EVERY_S = 30.0
UNKNOWN_WORKER_REASONS = {"unknown_worker"}


class AuthError(HubError):
    """401/403: the token is wrong or not allowed on this route. Retrying will not help."""


class UnknownWorker(HubError):
    """404 for this worker's id: the hub does not know it (any more)."""


class HubUnavailable(RuntimeError):
    """The hub could not be reached within `max_retry_s` (or the wait was stopped)."""


class _Retryable(Exception):
    """5xx/429 answer, retried like a connection error."""

    def __init__(self, response: httpx.Response) -> None:
        super().__init__(f"{response.status_code} {response.reason_phrase}: {response.text[:200]}")
        self.response = response


def _is_retryable(exc: BaseException) -> bool:
    return isinstance(exc, httpx.TransportError | _Retryable)


def error_from(response: httpx.Response) -> HubError:
    """The `HubError` for a 4xx response (the hub's `ErrorBody`, else the status line and text)."""
    err = HubError.from_response(response.status_code, response.content, response.reason_phrase)
    cls = HubError
    if response.status_code in (401, 403):
        cls = AuthError
    elif response.status_code == 404 and err.reason in UNKNOWN_WORKER_REASONS:
        cls = UnknownWorker
    return cls(err.status, err.reason, err.detail)


class HubHTTP:
    """One hub, one token: requests with the shared retry policy and error type."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout_s: float = 60.0,
        read_timeout_s: float | None = None,
        max_retry_s: float | None = None,
        max_backoff_s: float = 10.0,
        stop_event: threading.Event | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.max_retry_s = max_retry_s
        self.max_backoff_s = max_backoff_s
        self.stop_event = stop_event or threading.Event()
        self.http = httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(timeout_s, connect=10.0, read=read_timeout_s or timeout_s),
            transport=transport,
            follow_redirects=True,
        )

    def use_worker_secret(self, secret: str) -> None:
        """Send this registration's secret on every later request (the hub checks it on worker routes)."""
        self.http.headers[WORKER_SECRET_HEADER] = secret

    # ------------------------------------------------------------------ retries

    def retrying(self, max_retry_s: float | None = None, *, stoppable: bool = True) -> Retrying:
        """The retry policy for transient failures (also used by weight downloads)."""
        limit = self.max_retry_s if max_retry_s is None else max_retry_s
        stop = stop_never if limit is None else stop_after_delay(limit)
        if stoppable:
            event = self.stop_event
            stop = stop | (lambda _state: event.is_set())
            sleep = lambda seconds: event.wait(seconds) and None
        else:
            sleep = time.sleep
        last_log = [0.0]

        def before_sleep(state: RetryCallState) -> None:
            now = time.monotonic()
            if state.attempt_number == 1 or now - last_log[0] >= LOG_EVERY_S:
                last_log[0] = now
                exc = state.outcome.exception() if state.outcome else None
                log.warning(
                    "hub %s unavailable (%s: %s); retrying (%.0f s so far)",
                    self.base_url,
                    type(exc).__name__,
                    exc,
                    state.seconds_since_start or 0.0,
                )

        return Retrying(
            retry=retry_if_exception(_is_retryable),
            stop=stop,
            wait=wait_exponential_jitter(initial=0.2, max=self.max_backoff_s),
            sleep=sleep,
            before_sleep=before_sleep,
            reraise=True,
        )

    def with_retries(self, fn: Callable[[], R], **retry_kw) -> R:
        """Call `fn` under the retry policy; HubUnavailable when it gives up."""
        try:
            return self.retrying(**retry_kw)(fn)
        except (httpx.TransportError, _Retryable) as e:
            raise HubUnavailable(f"hub {self.base_url} unavailable: {e}") from e

    # ------------------------------------------------------------------ requests

    def send(self, method: str, path: str, *, json: BaseModel | None = None, long_poll_s: float | None = None,
             **retry_kw) -> httpx.Response:  # fmt: skip
        """One request with retries on transient failures; raises HubError on 4xx.

        `long_poll_s`: the hub may hold the answer this long (a long poll); the read timeout is that plus
        `timeout_s`. An answer slower than expected is logged while it is awaited (rl/wire/waits.py)."""
        content = json.model_dump_json().encode() if json is not None else None
        headers = {"Content-Type": "application/json"} if content is not None else None
        timeout = {}
        if long_poll_s is not None:
            timeout["timeout"] = httpx.Timeout(self.timeout_s, connect=10.0, read=long_poll_s + self.timeout_s)
        what = f"the hub {self.base_url} to answer {method} {path}"
        parts = path.split("?")[0].split("/")  # counted by route, not by worker id or version
        key = f"hub {method} {' '.join(parts[1:3] + parts[3:][-1:])}"

        def once() -> httpx.Response:
            with pending(what, long_poll_s or 0.0, key):
                response = self.http.request(method, path, content=content, headers=headers, **timeout)
            if response.status_code >= 500 or response.status_code == 429:
                raise _Retryable(response)
            return response

        response = self.with_retries(once, **retry_kw)
        if response.status_code >= 400:
            raise error_from(response)
        return response

    def call(self, method: str, path: str, out: type[T], *, json: BaseModel | None = None, **send_kw) -> T:
        """`send`, then validate the answer as `out` (an unusable answer is a HubError `bad_response`)."""
        response = self.send(method, path, json=json, **send_kw)
        try:
            return out.model_validate_json(response.content)
        except ValidationError as e:
            raise HubError(response.status_code, "bad_response", f"{path}: {e}") from e

    @contextlib.contextmanager
    def stream(self, path: str, headers: dict[str, str] | None = None) -> Iterator[httpx.Response]:
        """GET `path` as a stream (no retries here: the caller resumes). 4xx raise HubError."""
        with self.http.stream("GET", path, headers=headers) as response:
            if response.status_code >= 500 or response.status_code == 429:
                response.read()
                raise _Retryable(response)
            if response.status_code >= 400:
                response.read()
                raise error_from(response)
            yield response

    def healthy(self) -> bool:
        """One unauthenticated `GET /healthz`, no retries: is a hub answering at this address?"""
        try:
            return self.http.get("/healthz", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def close(self) -> None:
        self.http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
