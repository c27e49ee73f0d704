"""The trainer's side of the hub API (admin token): pull batches, publish versions, read the ledger.

Built on the shared client base (rl/wire/client.py): connection errors and 5xx are
retried with backoff for up to `patience_s`, so a hub hiccup (or a hub restart)
slows training down instead of killing it; a 4xx is a bug or a misconfiguration
and raises the hub's `HubError` at once.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid

import httpx

from rl.wire.client import HubHTTP
from rl.wire.protocol import (
    Ack,
    Batch,
    BatchRequest,
    EvalJob,
    EvalRequest,
    HubError,
    HubStatus,
    Ledger,
    ProvenanceReport,
    PublishRequest,
    QuarantineRequest,
    RevokeTokenRequest,
    Stall,
)

log = logging.getLogger(__name__)


class HubAdmin(HubHTTP):
    def __init__(self, url: str, token: str, *, patience_s: float = 300.0, read_timeout_s: float = 660.0):
        # Batch pulls long-poll for up to BatchRequest.timeout_s (<= 600 s): the read timeout outlasts it.
        super().__init__(url, token, timeout_s=60.0, read_timeout_s=read_timeout_s, max_retry_s=patience_s)

    @property
    def url(self) -> str:
        return self.base_url

    def pull(self, num_groups: int, step: int, *, timeout_s: float = 30.0, skip_zero_variance: bool = False) -> Batch:
        # One id per pull, the same for its retries: a batch whose answer was lost is handed out again, not lost.
        req = BatchRequest(num_groups=num_groups, step=step, timeout_s=timeout_s, skip_zero_variance=skip_zero_variance,
                           pull_id=uuid.uuid4().hex)  # fmt: skip
        return self.call("POST", "/v1/batches", Batch, json=req, long_poll_s=timeout_s)

    def publish(self, version: int) -> None:
        self.call("POST", "/v1/policy", Ack, json=PublishRequest(version=version))

    def evaluate(self, req: EvalRequest, *, poll_s: float = 1.0, timeout_s: float = 3600.0) -> EvalJob:
        """Start an eval job for the current version and wait for its results."""
        job = self.call("POST", "/v1/evals", EvalJob, json=req)
        deadline = time.monotonic() + timeout_s
        while job.done < job.total:
            if time.monotonic() > deadline:
                raise TimeoutError(f"eval job {job.job_id}: {job.done}/{job.total} after {timeout_s:.0f}s")
            time.sleep(poll_s)
            try:
                job = self.call("GET", f"/v1/evals/{job.job_id}", EvalJob)
            except HubError as e:
                if e.reason != "unknown_eval":
                    raise
                # Eval jobs live only in the hub's memory: a restarted hub forgot it. Run it again.
                log.warning("the hub forgot eval job %s (restarted?); starting it again", job.job_id)
                job = self.call("POST", "/v1/evals", EvalJob, json=req)
        return job

    def ledger(self) -> Ledger:
        return self.call("GET", "/v1/ledger", Ledger)

    def status(self, limit: int = 100) -> HubStatus:
        """The hub's status, listing at most `limit` workers (`worker_summary` counts all of them)."""
        return self.call("GET", f"/v1/status?limit={limit}", HubStatus)

    def report_stall(self, stall: Stall) -> None:
        """A stall of the trainer (or its end) for `rl status` (the step watchdog's, rl/trainer/watchdog.py)."""
        self.call("POST", "/v1/stalls", Ack, json=stall, max_retry_s=5.0)

    def record_receipt(self, report) -> None:
        """A step's signed receipt and masked work (rl/wire/receipts.py `StepReceipt`), for the contribution ledger."""
        self.call("POST", "/v1/receipts", Ack, json=report)

    def report_provenance(self, report: ProvenanceReport) -> None:
        """The trainer's per-worker provenance verdicts of one step (the hub may quarantine)."""
        self.call("POST", "/v1/provenance", Ack, json=report, max_retry_s=10.0)

    # ------------------------------------------------------------------ operator actions (rl admin)

    def quarantine(self, worker_id: str, reason: str) -> Ack:
        request = QuarantineRequest(reason=reason)
        return self.call("POST", f"/v1/admin/workers/{worker_id}/quarantine", Ack, json=request)

    def release(self, worker_id: str) -> Ack:
        """Lift a worker's quarantine."""
        return self.call("DELETE", f"/v1/admin/workers/{worker_id}/quarantine", Ack)

    def revoke_worker(self, worker_id: str) -> Ack:
        """Remove a worker now (its leases re-queued, its secret dead)."""
        return self.call("DELETE", f"/v1/workers/{worker_id}", Ack)

    def revoke_token(self, token: str) -> Ack:
        """Refuse a worker token from now on and remove its workers."""
        return self.call("POST", "/v1/admin/tokens/revoke", Ack, json=RevokeTokenRequest(token=token))

    def shutdown(self) -> None:
        with contextlib.suppress(httpx.HTTPError):  # already gone is fine
            self.http.post("/v1/shutdown", timeout=5.0)
