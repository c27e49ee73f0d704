"""Trust on the hub, per operator: provenance statistics, reward comparison, quarantine, revocation.

Workers are untrusted, and registrations are free, so the unit of trust is the **operator**: the
worker token a registration came with (docs/security.md). Evidence is kept per operator and per
registration: the trainer's provenance verdicts (`POST /v1/provenance`, rl/trainer/provenance.py)
and the mean reward of every buffered group, compared with the other operators' groups of the same
policy version (best-of-k selection stands out). An operator over a threshold (`trust:`) is
quarantined with all its registrations, present and future: no leases, no accepted submissions,
its leased, scoring and buffered tasks back to the queue. Deleting a registration and registering
again keeps the operator's record. Admins lift a quarantine or revoke a token (`rl admin ...`).
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from dataclasses import dataclass, field

from rl.config import TrustConfig
from rl.wire.protocol import HubError, HubStatus, OperatorStatus, ProvenanceReport, ScoredGroup, WorkerTrust

log = logging.getLogger(__name__)

REWARD_VAR_FLOOR = 1e-4
"""Smallest variance assumed of a group's mean reward (constant rewards would otherwise divide by 0)."""


@dataclass
class Evidence:
    sequences: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    abs_diff_sum: float = 0.0
    tokens: int = 0
    groups: int = 0
    by_version: dict[int, list[float]] = field(default_factory=dict)
    """Policy version -> [groups, sum, sum of squares of group mean rewards]."""
    scoring_timeouts: int = 0

    def add_verdicts(self, sequences: int, rejected: dict[str, int], abs_diff_sum: float, tokens: int) -> None:
        self.sequences += sequences
        self.rejected.update(rejected)
        self.abs_diff_sum += abs_diff_sum
        self.tokens += tokens

    def add_group(self, version: int, mean: float) -> None:
        self.groups += 1
        _add(self.by_version, version, mean)

    def to_json(self) -> dict:
        return {"sequences": self.sequences, "rejected": dict(self.rejected), "abs_diff_sum": self.abs_diff_sum,
                "tokens": self.tokens, "groups": self.groups, "scoring_timeouts": self.scoring_timeouts,
                "by_version": {str(v): row for v, row in self.by_version.items()}}  # fmt: skip

    @classmethod
    def from_json(cls, d: dict) -> Evidence:
        return cls(d["sequences"], Counter(d["rejected"]), d["abs_diff_sum"], d["tokens"], d["groups"],
                   {int(v): list(row) for v, row in d["by_version"].items()}, d["scoring_timeouts"])  # fmt: skip

    def view(self, reward_z: float) -> WorkerTrust:
        return WorkerTrust(
            sequences_checked=self.sequences,
            rejected=dict(self.rejected),
            mean_abs_logprob_diff=self.abs_diff_sum / self.tokens if self.tokens else 0.0,
            groups=self.groups,
            reward_z=round(reward_z, 3),
            scoring_timeouts=self.scoring_timeouts,
        )


def _add(totals: dict[int, list[float]], version: int, mean: float, sign: float = 1.0) -> None:
    row = totals.setdefault(version, [0, 0.0, 0.0])
    row[0] += sign
    row[1] += sign * mean
    row[2] += sign * mean * mean


class Trust:
    """Trust bookkeeping beside `HubState` (same event loop, no locks); acts on the state through its
    public methods (`drop_worker_work`, `block_operator`)."""

    def __init__(self, cfg: TrustConfig, state) -> None:
        self.cfg, self.state = cfg, state
        self.operators: dict[str, Evidence] = {}
        """Operator (token id) -> its evidence, over every registration it ever had."""
        self.workers: dict[str, Evidence] = {}
        """Registration -> its own evidence (shown in status; decisions use the operator's)."""
        self.owner: dict[str, str] = {}
        """Registration -> operator, kept after the registration is gone (late verdicts still count)."""
        self.quarantined: dict[str, str] = {}
        """Operator -> why it is quarantined."""
        self.by_version: dict[int, list[float]] = {}
        """Policy version -> [groups, sum, sum of squares of group mean rewards] of unquarantined operators."""

    def operator_of(self, worker_id: str) -> str:
        op = self.owner.get(worker_id)
        if op is None:
            rec = self.state.workers.get(worker_id)
            op = self.owner[worker_id] = rec.token if rec is not None else worker_id
        return op

    def reason(self, worker_id: str) -> str:
        """Why this registration's operator is quarantined ("" when it is not)."""
        return self.quarantined.get(self.operator_of(worker_id), "")

    # ------------------------------------------------------------------ persistence

    def records(self) -> dict[str, str]:
        """Operator -> its record (evidence and quarantine) as JSON, for the hub's database (rl/hub/ledger.py)."""
        ops = set(self.operators) | set(self.quarantined)
        return {op: json.dumps({"quarantined": self.quarantined.get(op, ""),
                                "evidence": self.operators.get(op, Evidence()).to_json()}, sort_keys=True)
                for op in ops}  # fmt: skip

    def restore(self, records: dict[str, str]) -> None:
        """A restarted hub takes up the operators' records: quarantines hold, evidence keeps counting."""
        for op, text in records.items():
            record = json.loads(text)
            self.operators[op] = Evidence.from_json(record["evidence"])
            if record["quarantined"]:
                self.quarantined[op] = record["quarantined"]
                self.state.block_operator(op)
            else:
                for version, row in self.operators[op].by_version.items():
                    every = self.by_version.setdefault(version, [0, 0.0, 0.0])
                    for i in range(3):
                        every[i] += row[i]
        if records:
            log.info("trust records of %d operators restored (%d quarantined)", len(records), len(self.quarantined))

    # ------------------------------------------------------------------ gates

    def check(self, worker_id: str) -> None:
        """403 `quarantined` for a registration of a quarantined operator (leases and submissions call this)."""
        if reason := self.reason(worker_id):
            raise HubError(403, "quarantined", f"worker {worker_id} is quarantined: {reason}")

    # ------------------------------------------------------------------ evidence

    def record(self, report: ProvenanceReport) -> list[str]:
        """Add the trainer's verdicts of one step; returns the operators quarantined because of them."""
        newly = []
        for v in report.workers:
            op = self.operator_of(v.worker_id)
            for ev in (self.workers.setdefault(v.worker_id, Evidence()), self.operators.setdefault(op, Evidence())):
                ev.add_verdicts(v.sequences, v.rejected, v.abs_logprob_diff_sum, v.tokens)
            s = self.operators[op]
            rejected = sum(s.rejected.values())
            if (
                op not in self.quarantined
                and s.sequences >= self.cfg.quarantine_min_sequences
                and rejected / s.sequences > self.cfg.quarantine_rejected_fraction
            ):
                reasons = ", ".join(f"{k} {n}" for k, n in s.rejected.most_common())
                self.quarantine(v.worker_id, f"provenance: {rejected}/{s.sequences} sequences rejected ({reasons})")
                newly.append(op)
        return newly

    def observe_group(self, group: ScoredGroup) -> bool:
        """Count a buffered group's mean reward; True when its operator is quarantined (now, as a cherry-picker,
        or already: then the group goes back to the queue) and waiting workers should be woken."""
        op = self.operator_of(group.worker_id)
        if op in self.quarantined:  # scored after its operator's quarantine: re-queued, not evidence
            self.state.drop_worker_work(group.worker_id)
            return True
        mean = sum(c.reward for c in group.completions) / len(group.completions)
        self.workers.setdefault(group.worker_id, Evidence()).add_group(group.policy_version, mean)
        self.operators.setdefault(op, Evidence()).add_group(group.policy_version, mean)
        _add(self.by_version, group.policy_version, mean)
        z = self.operator_reward_z(op)
        if z > self.cfg.reward_z:
            groups = self.operators[op].groups
            self.quarantine(
                group.worker_id,
                f"reward outlier: its groups' rewards are {z:.1f} standard errors above the other operators' "
                f"with the same policy versions, over {groups} groups (> {self.cfg.reward_z:g}; cherry-picked?)",
            )
            return True
        return False

    def count_timeouts(self, worker_id: str, timeouts: int) -> None:
        """Completions of this registration that the verifier had to kill (slow to verify: scored 0)."""
        if timeouts:
            self.workers.setdefault(worker_id, Evidence()).scoring_timeouts += timeouts
            self.operators.setdefault(self.operator_of(worker_id), Evidence()).scoring_timeouts += timeouts

    def reward_z(self, worker_id: str) -> float:
        return self.operator_reward_z(self.operator_of(worker_id))

    def operator_reward_z(self, op: str) -> float:
        """Standard errors by which this operator's group rewards beat the other operators' groups of the
        same policy versions (0: fewer than `reward_min_groups` comparable groups on either side)."""
        s = self.operators.get(op)
        if s is None or op in self.quarantined or s.groups < self.cfg.reward_min_groups:
            return 0.0
        excess, n_w, n_o = 0.0, 0, 0
        for version, (count, total, _) in s.by_version.items():
            all_count, all_total, _ = self.by_version[version]
            others = all_count - count
            if others < 1:
                continue
            excess += total - count * (all_total - total) / others
            n_w, n_o = n_w + count, n_o + others
        if n_w < self.cfg.reward_min_groups or n_o < self.cfg.reward_min_groups:
            return 0.0
        # Spread of a group's mean reward around its version's mean, pooled over versions.
        within = sum(sq - t * t / c for c, t, sq in self.by_version.values() if c > 1)
        dof = sum(c - 1 for c, _, _ in self.by_version.values() if c > 1)
        var = max(within / max(dof, 1), REWARD_VAR_FLOOR)
        return excess / math.sqrt(n_w * var)

    # ------------------------------------------------------------------ actions

    def quarantine(self, worker_id: str, reason: str) -> int:
        """Quarantine the registration's operator: every registration of it gets no more leases, and
        their leased, scoring and buffered tasks go back to the queue."""
        op = self.operator_of(worker_id)
        if op not in self.quarantined:  # its groups no longer count as the others' evidence
            for version, mine in self.operators.get(op, Evidence()).by_version.items():
                every = self.by_version[version]
                for i in range(3):
                    every[i] -= mine[i]
        self.quarantined[op] = reason
        self.state.block_operator(op)
        registrations = set(self.state.workers_of(op)) | {w for w, owner in self.owner.items() if owner == op}
        requeued = sum(self.state.drop_worker_work(w) for w in registrations)  # departed ones' groups too
        log.warning("operator %s quarantined (%d tasks re-queued): %s", op, requeued, reason)
        return requeued

    def release(self, worker_id: str) -> None:
        """Lift the quarantine of the registration's operator; its statistics start again from zero."""
        op = self.operator_of(worker_id)
        if op not in self.quarantined:
            raise HubError(404, "not_quarantined", f"worker {worker_id} is not quarantined")
        del self.quarantined[op]
        self.operators[op] = Evidence()
        for w, owner in self.owner.items():
            if owner == op:
                self.workers.pop(w, None)
        self.state.unblock_operator(op)
        log.warning("quarantine of operator %s lifted", op)

    # ------------------------------------------------------------------ status

    def annotate(self, status: HubStatus, viewer: str | None) -> HubStatus:
        """Status for a caller: trust columns and operators filled in; a worker token (`viewer`, its token
        id) sees only its own workers and operator, and only counts of the others."""
        workers = []
        for w in status.workers:
            op = self.operator_of(w.worker_id)
            if viewer is not None and op != viewer:
                continue
            update: dict = {"quarantined": self.quarantined.get(op, "")}
            if (ev := self.workers.get(w.worker_id)) is not None:
                update["trust"] = ev.view(self.operator_reward_z(op))
            workers.append(w.model_copy(update=update))
        operators = [
            o.model_copy(
                update={
                    "quarantined": self.quarantined.get(o.operator, ""),
                    "trust": self.operators[o.operator].view(self.operator_reward_z(o.operator))
                    if o.operator in self.operators
                    else None,
                }
            )  # fmt: skip
            for o in status.operators
            if viewer is None or o.operator == viewer
        ]
        listed = {o.operator for o in status.operators}  # quarantined operators with no registration left, too
        operators += [OperatorStatus(operator=op, workers=0, leased_tasks=0, completed_tasks=0, quarantined=why,
                                     trust=self.operators[op].view(0.0) if op in self.operators else None)
                      for op, why in self.quarantined.items() if op not in listed and viewer in (None, op)]  # fmt: skip
        live = {w.token for w in self.state.workers.values()}
        quarantined = sum(1 for w in self.state.workers.values() if w.token in self.quarantined)
        return status.model_copy(
            update={"workers": workers, "operators": operators, "workers_total": len(status.workers),
                    "quarantined": quarantined, "operators_quarantined": len(live & set(self.quarantined))}
        )  # fmt: skip
