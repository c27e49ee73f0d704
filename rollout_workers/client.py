"""HTTP client of the hub's worker routes (rl/hub/protocol.py is the contract).

A worker only ever makes outbound requests, through one `HubClient`:

- Connection errors, timeouts, 5xx and 429 are retried with capped
  exponential backoff (tenacity) until `max_retry_s` runs out (None: for
  ever), so a worker rides out a hub restart; it logs a line every
  `LOG_EVERY_S` while it waits. Setting `stop_event` ends the waiting.
- Other 4xx answers raise `HubError` carrying the hub's `ErrorBody.reason`;
  401/403 raise `AuthError` (a bad token is never retried).
- A 404 for the worker's own id means the hub forgot it (restart, or it was
  dropped after missing heartbeats): the client registers again with the
  same `RegisterRequest` and repeats the call (heartbeat, lease) or, for a
  submission whose lease died with the old id, raises `HubError`.

Thread-safe: the worker's main loop and its heartbeat thread share one client.
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

from rl.hub.protocol import (
    Ack,
    ErrorBody,
    HeartbeatRequest,
    HeartbeatResponse,
    Lease,
    LeaseRequest,
    PolicyManifest,
    RegisterRequest,
    RegisterResponse,
    SubmitRequest,
    SubmitResponse,
)

log = logging.getLogger(__name__)

T = TypeVar("T", bound=BaseModel)
R = TypeVar("R")
LOG_EVERY_S = 30.0
UNKNOWN_WORKER_REASONS = {"unknown_worker", "worker_not_found", "unknown_worker_id"}


class HubError(RuntimeError):
    """A 4xx answer (or an unusable response) from the hub."""

    def __init__(self, status: int, reason: str, detail: str = "") -> None:
        super().__init__(f"hub answered {status} {reason}: {detail}" if detail else f"hub answered {status} {reason}")
        self.status = status
        self.reason = reason
        self.detail = detail


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
    """The `HubError` for a 4xx response, with the hub's `ErrorBody.reason` when it sent one."""
    try:
        body = ErrorBody.model_validate_json(response.content)
        reason, detail = body.reason, body.detail
    except ValidationError:
        # FastAPI's own errors ({"detail": ...}) or a proxy's HTML page.
        reason, detail = response.reason_phrase or "error", response.text[:500]
    cls = AuthError if response.status_code in (401, 403) else HubError
    if response.status_code == 404 and reason in UNKNOWN_WORKER_REASONS:
        cls = UnknownWorker
    return cls(response.status_code, reason, detail)


class HubClient:
    """Worker-side client of one hub. `register` first; the other calls use the id it got."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout_s: float = 60.0,
        max_retry_s: float | None = None,
        max_backoff_s: float = 10.0,
        stop_event: threading.Event | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.max_retry_s = max_retry_s
        self.max_backoff_s = max_backoff_s
        self.stop_event = stop_event or threading.Event()
        self.http = httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(timeout_s, connect=10.0),
            transport=transport,
            follow_redirects=True,
        )
        self._lock = threading.Lock()
        self._register_lock = threading.Lock()
        """Held while registering again, so concurrent 404s (main loop + heartbeat) register once."""
        self._register_request: RegisterRequest | None = None
        self.registration: RegisterResponse | None = None
        self.registrations = 0
        """How many times this client registered (>1 after the hub forgot us)."""

    # ------------------------------------------------------------------ transport

    def retrying(self, max_retry_s: float | None = None, *, stoppable: bool = True) -> Retrying:
        """Tenacity policy for transient failures (also used by weight downloads)."""
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

    def _send(self, method: str, path: str, *, json: BaseModel | None = None, **retry_kw) -> httpx.Response:
        """One request with retries on transient failures; raises HubError on 4xx."""
        content = json.model_dump_json().encode() if json is not None else None
        headers = {"Content-Type": "application/json"} if content is not None else None

        def once() -> httpx.Response:
            response = self.http.request(method, path, content=content, headers=headers)
            if response.status_code >= 500 or response.status_code == 429:
                raise _Retryable(response)
            return response

        response = self.with_retries(once, **retry_kw)
        if response.status_code >= 400:
            raise error_from(response)
        return response

    def _call(self, method: str, path: str, out: type[T], *, json: BaseModel | None = None, **kw) -> T:
        response = self._send(method, path, json=json, **kw)
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

    # ------------------------------------------------------------------ worker routes

    @property
    def worker_id(self) -> str:
        if self.registration is None:
            raise RuntimeError("HubClient.register() must be called first")
        return self.registration.worker_id

    def register(self, request: RegisterRequest) -> RegisterResponse:
        """POST /v1/workers. Remembered, so the client can register again on its own."""
        try:
            response = self._call("POST", "/v1/workers", RegisterResponse, json=request)
        except HubError as e:
            if e.status == 404 and not isinstance(e, AuthError):
                raise HubError(404, "not_a_hub", f"{self.base_url} has no /v1/workers route: is it a hub?") from e
            raise
        with self._lock:
            self._register_request = request
            self.registration = response
            self.registrations += 1
        log.info("registered with hub %s as worker %s", self.base_url, response.worker_id)
        return response

    def _reregister(self, stale_id: str, seen: int) -> None:
        """Register again unless another thread already did since registration number `seen`.

        Compared by count, not id: a restarted hub may hand out the same id again.
        """
        with self._register_lock:
            with self._lock:
                request = self._register_request
                if self.registrations != seen or request is None:
                    return  # another thread already registered again
            log.warning("hub no longer knows worker %s (restarted?); registering again", stale_id)
            self.register(request)

    def _as_worker(self, call: Callable[[str], T], *, repeat: bool = True) -> T:
        """Run `call(worker_id)`; on UnknownWorker register again and (if `repeat`) call once more."""
        with self._lock:
            worker_id, seen = self.worker_id, self.registrations
        try:
            return call(worker_id)
        except HubError as e:
            if not (isinstance(e, UnknownWorker) or e.status == 404):
                raise
            self._reregister(worker_id, seen)
            if not repeat:
                raise
            return call(self.worker_id)

    def heartbeat(self, request: HeartbeatRequest) -> HeartbeatResponse:
        return self._as_worker(
            lambda wid: self._call("POST", f"/v1/workers/{wid}/heartbeat", HeartbeatResponse, json=request)
        )

    def lease(self, policy_version: int, max_tasks: int, wait_s: float = 0.0) -> Lease:
        """POST /v1/leases; `wait_s` > 0 long-polls (the hub answers as soon as there is work)."""

        def call(wid: str) -> Lease:
            request = LeaseRequest(worker_id=wid, policy_version=policy_version, max_tasks=max_tasks, wait_s=wait_s)
            return self._call("POST", "/v1/leases", Lease, json=request)

        return self._as_worker(call)

    def submit(self, request: SubmitRequest) -> SubmitResponse:
        """POST /v1/rollouts. An unknown worker id re-registers, then the HubError propagates."""
        with self._lock:
            seen = self.registrations
        try:
            return self._call("POST", "/v1/rollouts", SubmitResponse, json=request)
        except UnknownWorker:
            self._reregister(request.worker_id, seen)
            raise

    def leave(self, timeout_s: float = 5.0) -> bool:
        """DELETE /v1/workers/{id} (the hub re-queues our leases). Best effort, bounded in time."""
        if self.registration is None:
            return False
        try:
            self._call("DELETE", f"/v1/workers/{self.worker_id}", Ack, max_retry_s=timeout_s, stoppable=False)
        except (HubError, HubUnavailable) as e:
            log.warning("could not leave the hub cleanly: %s", e)
            return False
        log.info("left the hub (worker %s)", self.worker_id)
        return True

    def policy(self) -> PolicyManifest:
        return self._call("GET", "/v1/policy", PolicyManifest)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> HubClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
