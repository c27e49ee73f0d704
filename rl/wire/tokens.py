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
from rl.wire.protocol import HubError


def _same(a: str, b: str) -> bool:
    """Constant-time comparison of any two strings (hmac.compare_digest refuses non-ASCII str)."""
    return hmac.compare_digest(a.encode("utf-8", "surrogatepass"), b.encode("utf-8", "surrogatepass"))


def token_id(token: str) -> str:
    """A short, stable, non-secret name for a token (what the hub stores and shows)."""
    return hashlib.sha256(token.encode()).hexdigest()[:16]


class Tokens:
    """Bearer tokens: one admin token, any number of worker tokens (revocable at run time)."""

    def __init__(self, admin: str, workers: list[str]):
        if not admin or not workers:
            raise ValueError("need an admin token and at least one worker token")
        self.admin, self.workers = admin, list(workers)
        self.local_id: str | None = None
        """Token id of `rl train`'s own local workers (trusted with evals), when the hub was told it."""
        self.revoked: set[str] = set()
        """Token ids refused from now on (`revoke`)."""

    def revoke(self, token_or_id: str) -> str:
        """Refuse a worker token (given as itself or its `token_id`) from now on; returns its id."""
        for w in self.workers:
            if _same(w, token_or_id) or token_id(w) == token_or_id:
                self.revoked.add(token_id(w))
                return token_id(w)
        raise HubError(404, "unknown_token", "no such worker token")

    @classmethod
    def from_config(cls, cfg: RunConfig) -> tuple[Tokens, bool]:
        """Config, else env RL_HUB_ADMIN_TOKEN / RL_HUB_WORKER_TOKENS, else generated (second value True);
        plus env RL_HUB_LOCAL_TOKEN, the token `rl train` gives its local workers, when set."""
        admin = cfg.hub.admin_token or os.environ.get("RL_HUB_ADMIN_TOKEN")
        workers = cfg.hub.worker_tokens or [
            t.strip() for t in os.environ.get("RL_HUB_WORKER_TOKENS", "").split(",") if t.strip()
        ]
        generated = not admin or not workers
        admin = admin or f"adm-{secrets.token_urlsafe(24)}"
        workers = workers or [f"wrk-{secrets.token_urlsafe(24)}"]
        local = os.environ.get("RL_HUB_LOCAL_TOKEN")  # `rl train`'s own workers' token (rl/cli/launcher.py)
        tokens = cls(admin, [*workers, local] if local else workers)
        if local and os.environ.get("RL_HUB_TRUSTED_EVALS", "1") == "1":  # without local workers: anyone's
            tokens.local_id = token_id(local)
        return tokens, generated

    def caller(self, header: str | None) -> str | None:
        """Token id of a worker caller, None for admin; raises 401 for a missing/unknown token."""
        if not header or not header.startswith("Bearer "):
            raise HubError(401, "missing_token", "send Authorization: Bearer <token>")
        token = header[len("Bearer ") :].strip()
        if _same(token, self.admin):
            return None
        if any(_same(token, w) for w in self.workers):
            if token_id(token) in self.revoked:
                raise HubError(401, "revoked_token", "this worker token was revoked by the operator")
            return token_id(token)
        raise HubError(401, "bad_token", "unknown token")
