"""Bearer tokens of a hub: one admin token, any number of worker tokens.

Its own module (no FastAPI) so the launcher and trainer processes can make and read tokens
without importing the web stack.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets

from rl.config import RunConfig
from rl.protocol import HubError


def token_id(token: str) -> str:
    """A short, stable, non-secret name for a token (what the hub stores and shows)."""
    return hashlib.sha256(token.encode()).hexdigest()[:16]


class Tokens:
    """Bearer tokens: one admin token, any number of worker tokens."""

    def __init__(self, admin: str, workers: list[str]):
        if not admin or not workers:
            raise ValueError("need an admin token and at least one worker token")
        self.admin, self.workers = admin, list(workers)

    @classmethod
    def from_config(cls, cfg: RunConfig) -> tuple[Tokens, bool]:
        """Config, else env RL_HUB_ADMIN_TOKEN / RL_HUB_WORKER_TOKENS, else generated (second value True)."""
        admin = cfg.hub.admin_token or os.environ.get("RL_HUB_ADMIN_TOKEN")
        workers = cfg.hub.worker_tokens or [
            t.strip() for t in os.environ.get("RL_HUB_WORKER_TOKENS", "").split(",") if t.strip()
        ]
        generated = not admin or not workers
        admin = admin or f"adm-{secrets.token_urlsafe(24)}"
        workers = workers or [f"wrk-{secrets.token_urlsafe(24)}"]
        return cls(admin, workers), generated

    def caller(self, header: str | None) -> str | None:
        """Token id of a worker caller, None for admin; raises 401 for a missing/unknown token."""
        if not header or not header.startswith("Bearer "):
            raise HubError(401, "missing_token", "send Authorization: Bearer <token>")
        token = header[len("Bearer ") :].strip()
        if hmac.compare_digest(token, self.admin):
            return None
        if any(hmac.compare_digest(token, w) for w in self.workers):
            return token_id(token)
        raise HubError(401, "bad_token", "unknown token")
