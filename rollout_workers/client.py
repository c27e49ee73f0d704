"""HTTP client of the hub's worker routes (rl/wire/protocol.py is the contract).

A worker only ever makes outbound requests, through one `HubClient` built on the shared client
base `HubHTTP` (rl/wire/client.py): connection errors, timeouts, 5xx and 429 are retried with
capped exponential backoff until `max_retry_s` runs out (None: for ever), so a worker rides out
a hub restart; setting `stop_event` ends the waiting. Other 4xx raise the hub's `HubError`,
401/403 `AuthError` (never retried). A 404 for the worker's own id means the hub forgot it
(restart, or missed heartbeats): the client registers again with the same `RegisterRequest` and
repeats the call, or, for a submission whose lease died with the old id, raises `HubError`.
Thread-safe: the worker's main loop and its heartbeat thread share one client.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TypeVar

from pydantic import BaseModel

from rl.wire.client import AuthError, HubHTTP, HubUnavailable, UnknownWorker
from rl.wire.identity import challenge_message, public_id, sign
from rl.wire.protocol import (
    Ack,
    HeartbeatRequest,
    HeartbeatResponse,
    HubError,
    IdentityChallenge,
    IdentityProof,
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

__all__ = ["AuthError", "HubClient", "HubError", "HubUnavailable", "UnknownWorker"]


class HubClient(HubHTTP):
    """Worker-side client of one hub. `register` first; the other calls use the id it got."""

    def __init__(self, base_url: str, token: str, *, identity=None, **kw) -> None:
        super().__init__(base_url, token, **kw)
        self.identity = identity
        """A contributor key (rl/wire/identity.py): each registration proves it by signing a fresh challenge."""
        self._lock = threading.Lock()
        self._register_lock = threading.Lock()
        """Held while registering again, so concurrent 404s (main loop + heartbeat) register once."""
        self._register_request: RegisterRequest | None = None
        self.registration: RegisterResponse | None = None
        self.registrations = 0
        """How many times this client registered (>1 after the hub forgot us)."""

    # ------------------------------------------------------------------ worker routes

    @property
    def worker_id(self) -> str:
        if self.registration is None:
            raise RuntimeError("HubClient.register() must be called first")
        return self.registration.worker_id

    def register(self, request: RegisterRequest, attempts: int = 3) -> RegisterResponse:
        """POST /v1/workers. Remembered, so the client can register again on its own."""
        try:
            response = self.call("POST", "/v1/workers", RegisterResponse, json=self._prove(request))
        except HubError as e:
            if e.reason == "unknown_challenge" and attempts > 1:  # the hub restarted between challenge and now
                return self.register(request, attempts - 1)
            if e.status == 404 and not isinstance(e, AuthError):
                raise HubError(404, "not_a_hub", f"{self.base_url} has no /v1/workers route: is it a hub?") from e
            raise
        with self._lock:
            self.use_worker_secret(response.worker_secret)
            self._register_request = request
            self.registration = response
            self.registrations += 1
        log.info("registered with hub %s as worker %s", self.base_url, response.worker_id)
        return response

    def _prove(self, request: RegisterRequest) -> RegisterRequest:
        """`request` with the identity's signature of a fresh hub challenge (unchanged without an identity)."""
        if self.identity is None:
            return request
        challenge = self.call("POST", "/v1/challenges", IdentityChallenge).challenge
        proof = IdentityProof(public_key=public_id(self.identity), challenge=challenge,
                              signature=sign(self.identity, challenge_message(challenge, "register")))  # fmt: skip
        return request.model_copy(update={"identity": proof})

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
            lambda wid: self.call("POST", f"/v1/workers/{wid}/heartbeat", HeartbeatResponse, json=request)
        )

    def lease(self, policy_version: int, max_tasks: int, wait_s: float = 0.0) -> Lease:
        """POST /v1/leases; `wait_s` > 0 long-polls (the hub answers as soon as there is work)."""

        def call(wid: str) -> Lease:
            request = LeaseRequest(worker_id=wid, policy_version=policy_version, max_tasks=max_tasks, wait_s=wait_s)
            return self.call("POST", "/v1/leases", Lease, json=request, long_poll_s=wait_s)

        return self._as_worker(call)

    def submit(self, request: SubmitRequest, **retry_kw) -> SubmitResponse:
        """POST /v1/rollouts, packed when the hub chose that at registration (rl/wire/packed.py). An unknown
        worker id re-registers, then the HubError propagates.

        `retry_kw` (`max_retry_s`, `stoppable`) override the retry policy, e.g. for the last submissions
        of a worker that is leaving."""
        with self._lock:
            seen = self.registrations
            packed = self.registration is not None and self.registration.wire == "packed"
        try:
            body = request.packed() if packed else request
            return self.call("POST", "/v1/rollouts", SubmitResponse, json=body, **retry_kw)
        except UnknownWorker:
            self._reregister(request.worker_id, seen)
            raise

    def leave(self, timeout_s: float = 5.0) -> bool:
        """DELETE /v1/workers/{id} (the hub re-queues our leases). Best effort, bounded in time."""
        if self.registration is None:
            return False
        try:
            self.call("DELETE", f"/v1/workers/{self.worker_id}", Ack, max_retry_s=timeout_s, stoppable=False)
        except (HubError, HubUnavailable) as e:
            log.warning("could not leave the hub cleanly: %s", e)
            return False
        log.info("left the hub (worker %s)", self.worker_id)
        return True

    def policy(self, version: int | None = None) -> PolicyManifest:
        """The latest version's manifest (waiting, until `stop_event`, while the hub has none yet: 409
        `no_policy`), or that of `version` (404 when the hub no longer has it)."""
        path = "/v1/policy" if version is None else f"/v1/policy/{version}"
        while True:
            try:
                return self.call("GET", path, PolicyManifest)
            except HubError as e:
                if e.reason != "no_policy":
                    raise
                if self.stop_event.wait(1.0):
                    raise HubUnavailable(f"stopped while waiting for a first policy on {self.base_url}") from e
