"""Mirrors of the hub's policy files: any HTTP server with its `/v1/blobs/<sha256>` paths.

An HTTP cache in front of the hub (configs/nginx/weights-cache.conf), a CDN, or files
copied to a bucket under those names. `WeightSync` (weight_sync.py) tries the mirror
first for every file and checks what it got against the hub's manifest; the mirror is a
place bytes may come from, never an authority (docs/security.md, "Weight mirrors").
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

import httpx

MIRROR_COOLDOWN_S = 60.0
"""After a mirror failed (not a plain 404), files come straight from the hub for this long."""
MIRROR_READ_TIMEOUT_S = 300.0
"""Generous: a cache that is filling a file for another worker (nginx `proxy_cache_lock`) sends nothing meanwhile."""


class MirrorError(RuntimeError):
    """A mirror answered with an error status."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"{status} {detail}")
        self.status = status


class Mirror:
    """An HTTP cache or mirror of the hub's `/v1/blobs/`: a place bytes may come from, never an authority.

    It gets the worker's bearer token, so an HTTP cache in front of the hub can forward it on a
    miss (docs/security.md, "Weight mirrors"); point workers only at mirrors you would trust with it.
    """

    def __init__(self, url: str, authorization: Callable[[], str | None], *, connect_timeout_s: float = 5.0) -> None:
        self.url = url.rstrip("/")
        self.authorization = authorization
        """The worker's current `Authorization` header for the hub (read per request: it may change)."""
        self.http = httpx.Client(
            base_url=self.url,
            timeout=httpx.Timeout(MIRROR_READ_TIMEOUT_S, connect=connect_timeout_s),
            follow_redirects=True,
        )
        self.skip_until = 0.0
        self.failures = 0

    @staticmethod
    def blob_path(sha256: str) -> str:
        return f"/v1/blobs/{sha256}"

    def available(self) -> bool:
        return time.monotonic() >= self.skip_until

    def failed(self, cool_down: bool = True) -> None:
        self.failures += 1
        if cool_down:
            self.skip_until = time.monotonic() + MIRROR_COOLDOWN_S

    @contextlib.contextmanager
    def stream(self, path: str, headers: dict[str, str] | None = None) -> Iterator[httpx.Response]:
        """GET `path` as a stream; any status >= 400 raises MirrorError (the same shape as HubHTTP.stream)."""
        auth = self.authorization()
        headers = {**(headers or {}), **({"Authorization": auth} if auth else {})}
        with self.http.stream("GET", path, headers=headers) as response:
            if response.status_code >= 400:
                raise MirrorError(response.status_code, response.reason_phrase)
            yield response

    def close(self) -> None:
        self.http.close()
