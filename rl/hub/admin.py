"""The trainer's side of the hub API (admin token): pull batches, publish versions, read the ledger.

Retries with backoff on connection errors and 5xx, so a hub hiccup slows
training down instead of killing it; a 4xx is a bug or a misconfiguration and
raises at once with the hub's reason.
"""

from __future__ import annotations

import contextlib
import logging
import time

import httpx
from tenacity import before_sleep_log, retry, retry_if_exception, stop_after_delay, wait_exponential

from rl.hub.protocol import Batch, BatchRequest, EvalJob, EvalRequest, HubStatus, Ledger, PublishRequest

log = logging.getLogger(__name__)


class HubRequestError(RuntimeError):
    def __init__(self, status: int, reason: str, detail: str):
        super().__init__(f"hub answered {status} {reason}: {detail}")
        self.status, self.reason = status, reason


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, httpx.TransportError):
        return True
    return isinstance(exc, HubRequestError) and exc.status >= 500


class HubAdmin:
    def __init__(self, url: str, token: str, *, patience_s: float = 300.0):
        self.url = url.rstrip("/")
        self.client = httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=httpx.Timeout(60.0, read=660.0)
        )
        self._retry = retry(
            retry=retry_if_exception(_transient),
            wait=wait_exponential(multiplier=0.5, max=10),
            stop=stop_after_delay(patience_s),
            before_sleep=before_sleep_log(log, logging.WARNING),
            reraise=True,
        )

    def _call(self, method: str, path: str, **kwargs) -> dict:
        def once() -> dict:
            resp = self.client.request(method, path, **kwargs)
            if resp.status_code >= 400:
                try:
                    body = resp.json()
                except ValueError:
                    body = {"reason": "http_error", "detail": resp.text[:500]}
                raise HubRequestError(resp.status_code, body.get("reason", "?"), body.get("detail", ""))
            return resp.json()

        return self._retry(once)()

    def pull(self, num_groups: int, step: int, *, timeout_s: float = 30.0, skip_zero_variance: bool = False) -> Batch:
        req = BatchRequest(num_groups=num_groups, step=step, timeout_s=timeout_s, skip_zero_variance=skip_zero_variance)
        return Batch.model_validate(self._call("POST", "/v1/batches", json=req.model_dump()))

    def publish(self, version: int) -> None:
        self._call("POST", "/v1/policy", json=PublishRequest(version=version).model_dump())

    def evaluate(self, req: EvalRequest, *, poll_s: float = 1.0, timeout_s: float = 3600.0) -> EvalJob:
        """Start an eval job for the current version and wait for its results."""
        job = EvalJob.model_validate(self._call("POST", "/v1/evals", json=req.model_dump()))
        deadline = time.monotonic() + timeout_s
        while job.done < job.total:
            if time.monotonic() > deadline:
                raise TimeoutError(f"eval job {job.job_id}: {job.done}/{job.total} after {timeout_s:.0f}s")
            time.sleep(poll_s)
            job = EvalJob.model_validate(self._call("GET", f"/v1/evals/{job.job_id}"))
        return job

    def ledger(self) -> Ledger:
        return Ledger.model_validate(self._call("GET", "/v1/ledger"))

    def status(self) -> HubStatus:
        return HubStatus.model_validate(self._call("GET", "/v1/status"))

    def shutdown(self) -> None:
        with contextlib.suppress(httpx.HTTPError):  # already gone is fine
            self.client.post("/v1/shutdown", timeout=5.0)

    def close(self) -> None:
        self.client.close()
