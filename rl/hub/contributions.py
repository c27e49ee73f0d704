"""Who did the work: contributor identities, the contribution ledger and the receipts, on the hub.

A contributor is an Ed25519 identity that proved its key by signing a hub challenge when it registered,
or `token:<token id>` for registrations without one; a registration (worker id) belongs to one. The hub
counts per contributor, step and policy version what was submitted, scored and rejected, and the time a
token the contributor worked under was quarantined (in memory, written with the hub's ledger every 0.5 s),
and stores what the trainer reports per step (`POST /v1/receipts`): the signed
receipt, its entries (the trained work) and the masked work, keyed by step, so a retried or repeated report
replaces instead of adding. Everything lives in the hub's SQLite database (tables `contrib_*`, beside
rl/hub/ledger.py's), so a restarted hub keeps it. docs/contributions.md.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections import OrderedDict
from pathlib import Path

from rl.hub.contribution_db import ContributionDB
from rl.wire.identity import challenge_message, verify
from rl.wire.packed import as_ids, count_ids
from rl.wire.protocol import (
    Ack,
    ContributorStatus,
    HubError,
    HubStatus,
    IdentityChallenge,
    IdentityProof,
    ScoredGroup,
)
from rl.wire.receipts import CONTRIBUTOR_PATTERN, Contributions, StepReceipt, merkle_root, proofs_for

CHALLENGE_TTL_S = 120.0
"""How long a challenge may be signed and used (once)."""
MAX_CHALLENGES = 10_000
"""Outstanding challenges kept; the oldest go first."""


def token_contributor(token_id: str | None) -> str:
    """The contributor of work registered without an identity: its token (the admin token: `token:admin`)."""
    return f"token:{token_id or 'admin'}"


class ContributionLedger:
    """The hub's contributors, challenges and contribution counts; one event loop, writes in a thread."""

    def __init__(self, db_path: Path | None, run_key_file: Path | None = None) -> None:
        self.db = ContributionDB(db_path)
        self.run_key_file = run_key_file
        self.challenges: OrderedDict[str, float] = OrderedDict()
        self.contributor: dict[str, str] = {}
        """Registration (worker id) -> contributor, for every registration of this hub's life."""
        self.operator: dict[str, str] = {}
        """Registration -> token id."""
        self.tokens_of: dict[str, set[str]] = self.db.contributor_tokens()
        """Contributor -> the token ids it registered with, over the run (a restarted hub reads them back)."""
        self._ticked: float | None = None
        self.pending: dict[tuple[str, int, int, str, str], list[int]] = {}
        """(contributor, step, policy version, event, reason) -> [groups, samples, tokens, seconds] not yet written."""
        self.seen: dict[str, float] = {}
        """Contributor -> last activity (unix time) not yet written."""
        self.totals = self.db.activity_totals()
        """Contributor -> event -> [groups, samples, tokens, seconds] over the run, written or pending (status)."""
        self.times = self.db.seen_times()
        """Contributor -> [first seen, last seen] (unix time), written or pending (status)."""
        self._lock = asyncio.Lock()

    # ------------------------------------------------------------------ identities

    def challenge(self, now: float | None = None) -> IdentityChallenge:
        now = time.monotonic() if now is None else now
        while len(self.challenges) >= MAX_CHALLENGES:
            self.challenges.popitem(last=False)
        challenge = secrets.token_urlsafe(24)
        self.challenges[challenge] = now + CHALLENGE_TTL_S
        return IdentityChallenge(challenge=challenge, expires_in_s=CHALLENGE_TTL_S)

    def _take_challenge(self, challenge: str | None, now: float) -> None:
        expiry = self.challenges.pop(challenge or "", None)
        if expiry is None or expiry < now:
            raise HubError(409, "unknown_challenge", "challenge unknown, used or expired (hub restarted?): "
                           "ask POST /v1/challenges for a new one")  # fmt: skip

    def _proves(self, public_key: str, purpose: str, challenge: str | None, signature: str | None) -> bool:
        self._take_challenge(challenge, time.monotonic())
        return verify(public_key, challenge_message(challenge or "", purpose), signature or "")

    def identify(self, proof: IdentityProof | None, token_id: str | None) -> str:
        """The contributor a registration will be credited to (403 `bad_identity` for a wrong signature)."""
        if proof is None:
            return token_contributor(token_id)
        if not self._proves(proof.public_key, "register", proof.challenge, proof.signature):
            raise HubError(403, "bad_identity", "the signature does not prove the identity key (sign the challenge "
                           "with rl.wire.identity.challenge_message(challenge, 'register'))")  # fmt: skip
        return proof.public_key

    def bind(self, worker_id: str, contributor: str, token_id: str | None, name: str) -> None:
        """A registration of `contributor` (recorded at once: identity, token and registration stay distinct)."""
        self.contributor[worker_id] = contributor
        self.operator[worker_id] = token_id or "admin"
        self.tokens_of.setdefault(contributor, set()).add(token_id or "admin")
        now = time.time()
        self.db.register(worker_id, contributor, token_id or "admin", name, now)
        self._saw(contributor, now)

    def _saw(self, contributor: str, now: float) -> None:
        first, last = self.times.get(contributor, (now, now))
        self.times[contributor] = [min(first, now), max(last, now)]

    def contributor_of(self, worker_id: str) -> str:
        return self.contributor.get(worker_id, f"worker:{worker_id}")

    def authorize(self, contributor: str, token_id: str | None, challenge: str | None, signature: str | None) -> None:
        """May this caller read `contributor`'s receipts? The admin may; a token its own `token:` contributor;
        an identity only with its signature of a fresh challenge for exactly this purpose."""
        if not re.fullmatch(CONTRIBUTOR_PATTERN, contributor):
            raise HubError(422, "bad_contributor", "a contributor is ed25519:<64 hex digits> or token:<token id>")
        if token_id is None or contributor == token_contributor(token_id):
            return
        purpose = f"contributions {contributor}"
        if contributor.startswith("ed25519:") and challenge and self._proves(contributor, purpose, challenge,
                                                                              signature):  # fmt: skip
            return
        raise HubError(403, "not_your_contributions", f"the receipts of {contributor} are for that contributor only: "
                       "sign a challenge with its key (rl contributions fetch --identity KEY)")  # fmt: skip

    # ------------------------------------------------------------------ hub-side counts

    def count(self, worker_id: str, event: str, step: int, version: int, groups: int, samples: int = 0,
              tokens: int = 0, reason: str = "", seconds: float = 0.0) -> None:  # fmt: skip
        """Add to a contributor's `submitted` (with generation `seconds`), `scored` or `rejected` counts (written
        by `flush`)."""
        contributor, now = self.contributor_of(worker_id), time.time()
        self._add(contributor, event, step, version, groups, samples, tokens, reason, seconds)
        self.seen[contributor] = now
        self._saw(contributor, now)

    def _add(self, contributor: str, event: str, step: int, version: int, groups: int, samples: int, tokens: int,
             reason: str, seconds: float) -> None:  # fmt: skip
        row = self.pending.setdefault((contributor, step, version, event, reason), [0, 0, 0, 0.0])
        total = self.totals.setdefault(contributor, {}).setdefault(event, [0, 0, 0, 0.0])
        for i, value in enumerate((groups, samples, tokens, seconds)):
            row[i] += value
            total[i] += value

    def rejected(self, worker_id: str, step: int, req, reason: str) -> None:
        """Count a refused submission (`SubmitRequest`): its tasks, completions and tokens."""
        completions = [c for r in req.results for c in r.completions]
        try:
            tokens = sum(len(as_ids(c.token_ids)) for c in completions)
        except ValueError:  # refused because its ids do not decode: no tokens to count
            tokens = 0
        self.count(worker_id, "rejected", step, req.policy_version, len(req.results), len(completions), tokens,
                   reason=reason)  # fmt: skip

    def tick(self, quarantined: dict[str, str], step: int, version: int, now: float | None = None) -> None:
        """Add the time since the last tick to each contributor that registered with a quarantined token
        (`quarantined`: token id -> why; the reason recorded is the token). Called before each flush."""
        now = time.monotonic() if now is None else now
        elapsed, self._ticked = (0.0 if self._ticked is None else now - self._ticked), now
        if elapsed <= 0 or not quarantined:
            return
        for contributor, tokens in self.tokens_of.items():
            for token in sorted(tokens & set(quarantined))[:1]:  # counted once, however many of its tokens
                self._add(contributor, "quarantined", step, version, 0, 0, 0, token, elapsed)

    def submitted(self, jobs: list, step: int, gen_seconds: float) -> None:
        """Count accepted tasks (`ScoringJob`s of one submission; its generation time shared among them)."""
        for job in jobs:
            tokens = sum(len(c.ids) for c in job.completions)
            self.count(job.worker_id, "submitted", step, job.policy_version, 1, len(job.completions), tokens,
                       seconds=gen_seconds / len(jobs))  # fmt: skip

    def scored(self, group: ScoredGroup, step: int) -> None:
        """Label a buffered group with its contributor (the trainer signs that) and count it."""
        group.contributor = self.contributor_of(group.worker_id)
        tokens = sum(count_ids(c.token_ids) for c in group.completions)  # packed text or a list
        self.count(group.worker_id, "scored", step, group.policy_version, 1, len(group.completions), tokens)

    def _take_pending(self) -> tuple[dict, dict]:
        pending, seen = self.pending, self.seen
        self.pending, self.seen = {}, {}
        return pending, seen

    def flush(self) -> None:
        """Write the pending counts (blocking: start-up, shutdown, tests)."""
        pending, seen = self._take_pending()
        self.db.add_activity(pending, seen)

    async def flush_async(self) -> None:
        async with self._lock:
            pending, seen = self._take_pending()
            if not (pending or seen):
                return
            try:
                await asyncio.to_thread(self.db.add_activity, pending, seen)
            except Exception:  # a full disk: counted again at the next flush
                for key, row in pending.items():
                    mine = self.pending.setdefault(key, [0, 0, 0, 0.0])
                    for i in range(4):
                        mine[i] += row[i]
                self.seen = seen | self.seen
                raise

    # ------------------------------------------------------------------ receipts

    def run_key(self) -> str | None:
        """The run's public key: the one its receipts are signed with, else the run directory's."""
        key = self.db.run_key()
        if key is None and self.run_key_file is not None and self.run_key_file.is_file():
            key = self.run_key_file.read_text().strip()
        return key

    def check_receipt(self, report: StepReceipt) -> None:
        """422 `bad_receipt` unless the receipt is the run key's signature over exactly these entries."""
        r, known = report.receipt, self.run_key()
        problem = None
        if known is not None and r.run_key != known:
            problem = f"signed by {r.run_key}, the run's key is {known}"
        elif r.size != len(report.entries) or merkle_root([e.leaf() for e in report.entries]).hex() != r.root:
            problem = "its root is not the Merkle root of its entries"
        elif not r.valid():
            problem = "the signature does not verify"
        if problem:
            raise HubError(422, "bad_receipt", f"receipt of step {r.step}: {problem}")

    async def record(self, report: StepReceipt) -> Ack:
        """Store a step's receipt, entries and masked work, replacing that step and any later one (a trainer
        that resumed from a checkpoint trains them again); answered once committed."""
        self.check_receipt(report)
        async with self._lock:
            await asyncio.to_thread(self.db.record_step, report, time.time())
        return Ack(detail=f"step {report.receipt.step}: {len(report.entries)} entries")

    def receipts_of(self, contributor: str, from_step: int = 0) -> Contributions:
        run_key = self.run_key()
        if run_key is None:
            raise HubError(404, "no_receipts", "no trained step has a receipt yet")
        found = self.db.steps_of(contributor, from_step)
        steps = [proofs_for(receipt, entries, contributor) for receipt, entries in found]
        return Contributions(contributor=contributor, run_key=run_key, receipts=steps)

    # ------------------------------------------------------------------ status

    def annotate(self, status: HubStatus, viewer: str | None, live: dict) -> HubStatus:
        """Contributor and token of each listed worker; the contributors table (a worker token: its own)."""
        workers = [
            w.model_copy(
                update={"contributor": self.contributor_of(w.worker_id), "operator": self.operator.get(w.worker_id, "")}
            )  # fmt: skip
            for w in status.workers
        ]
        alive: dict[str, int] = {}
        for worker_id in live:
            alive[self.contributor_of(worker_id)] = alive.get(self.contributor_of(worker_id), 0) + 1
        trained = self.db.trained_totals()
        total = sum(tokens for _, tokens, _ in trained.values()) or 1
        mine = {c for w, c in self.contributor.items() if self.operator.get(w) == viewer} | {token_contributor(viewer)}
        rows = [self._status_row(c, alive.get(c, 0), trained.get(c, (0, 0, 0)), total)
                for c in sorted(set(alive) | set(trained) | set(self.totals))
                if viewer is None or c in mine]  # fmt: skip
        return status.model_copy(update={"workers": workers, "contributors": rows})

    def _status_row(self, contributor: str, workers: int, trained: tuple[int, int, int], total: int):
        events = self.totals.get(contributor, {})
        first, last = self.times.get(contributor, (None, None))
        counts = {"masked_samples": trained[2], "submitted_groups": events.get("submitted", [0])[0],
                  "rejected_groups": events.get("rejected", [0])[0],
                  "quarantined_s": events.get("quarantined", [0, 0, 0, 0.0])[3]}  # fmt: skip
        if first is not None:
            counts |= {"first_seen": first, "last_seen": last}
        return ContributorStatus(contributor=contributor, workers=workers, trained_samples=trained[0],
                                 trained_tokens=trained[1], share=trained[1] / total, counts=counts)  # fmt: skip

    def close(self) -> None:
        self.db.close()
