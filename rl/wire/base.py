"""The wire's ground floor: its bounds, the strict base model and `HubError` (re-exported by rl/wire/protocol.py)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

WORKER_SECRET_HEADER = "X-Worker-Secret"
"""Header carrying a registration's secret on every later call that names its worker id."""
IDENTITY_CHALLENGE_HEADER = "X-Identity-Challenge"
IDENTITY_SIGNATURE_HEADER = "X-Identity-Signature"
"""A contributor's proof of its key on `GET /v1/contributions/...`: a hub challenge and its signature."""

MAX_SEQUENCE_TOKENS = 1_048_576
"""Upper bound of any token list on the wire (the hub checks the run's own, tighter limits)."""
MAX_PACKED_CHARS = (4 * MAX_SEQUENCE_TOKENS + 2) // 3 * 4
"""Longest packed array text (base64 of MAX_SEQUENCE_TOKENS four-byte values)."""
MAX_GROUP = 1024
"""Most completions per task (sampling.n's bound)."""
MAX_TASKS = 4096
"""Most tasks per lease or submission (hub.max_tasks_per_lease caps leases further)."""
MAX_ID = 64
"""Longest worker, lease or job id."""
MAX_COUNT = 2**31 - 1
"""Largest policy version or optimizer step: the ledger (SQLite) and C code take it, JSON allows far more."""
MAX_TOKENS_PER_S = 1e9
"""Largest generation speed a worker may report (far above any GPU's): sums over workers stay finite."""
MAX_SECONDS = 1e7
"""Largest duration a worker may report (about four months)."""
SAFE_NAME = r"^[A-Za-z0-9._:@+-]{1,64}$"
"""A worker name: printed raw in logs, terminals, batches.jsonl and W&B keys, so no escapes or newlines."""
PRINTABLE = r"^[\x20-\x7e]*$"
"""Printable ASCII: no control characters (terminal escapes, newlines)."""
PUBLIC_KEY = r"^ed25519:[0-9a-f]{64}$"
"""A contributor identity or a run key: an Ed25519 public key (rl/wire/identity.py)."""
SIGNATURE = r"^[0-9a-f]{128}$"
"""An Ed25519 signature, hex."""


class Wire(BaseModel):
    # allow_inf_nan=False: NaN/inf (also JSON's 1e999, parsed as inf) never enter the hub's state.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Ack(Wire):
    ok: bool = True
    detail: str = ""


class ErrorBody(Wire):
    """Body of every 4xx/5xx: a machine-readable reason and a human sentence."""

    reason: str
    detail: str


class HubError(RuntimeError):
    """A rejected request: HTTP status, machine-readable reason, human detail.

    The one error type of the wire: the hub raises it (and sends it as an `ErrorBody`), every
    client rebuilds it from the response with `HubError.from_response`.
    """

    def __init__(self, status: int, reason: str, detail: str = "") -> None:
        super().__init__(f"hub answered {status} {reason}: {detail}" if detail else f"hub answered {status} {reason}")
        self.status, self.reason, self.detail = status, reason, detail

    def body(self) -> ErrorBody:
        return ErrorBody(reason=self.reason, detail=self.detail)

    @classmethod
    def from_response(cls, status: int, content: bytes, reason_phrase: str = "") -> HubError:
        """Rebuild the hub's error from a response body; a body that is not an `ErrorBody`
        (a proxy's HTML page, a framework's own error) keeps its first 500 characters as detail."""
        try:
            body = ErrorBody.model_validate_json(content)
            return cls(status, body.reason, body.detail)
        except ValueError:
            return cls(status, reason_phrase or "http_error", content[:500].decode("utf-8", "replace"))
