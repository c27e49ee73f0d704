"""Per-worker trust on the hub: provenance statistics, reward comparison, quarantine, revocation.

Workers are untrusted (docs/security.md). Two kinds of evidence reach this module:

- the trainer's provenance verdicts (`ProvenanceReport`, `POST /v1/provenance`): per worker, how
  many of its sequences were checked and how many were masked out of the loss, by reason
  (rl/provenance.py), and the mean |claimed - recomputed| logprob;
- every scored group the hub buffers: its mean reward, compared with the other workers' groups
  generated with the same policy version (a worker that generates k groups and submits the best
  one has a reward far above the others'). Comparing within a version keeps a worker that joins
  late, after training raised every reward, from looking like a cheat.

A worker over a threshold (`trust:` in the config) is quarantined: no more leases or accepted
submissions, and its leased, scoring and buffered tasks go back to the queue, so no prompt is
lost. An operator lifts a quarantine, revokes a worker or a whole token through the admin routes
(`rl admin ...`). Quarantine is per registration: a token whose workers keep being quarantined
should be revoked (see docs/security.md, "still open").
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field

from rl.config import TrustConfig
from rl.wire.protocol import HubError, HubStatus, ProvenanceReport, ScoredGroup, WorkerTrust

log = logging.getLogger(__name__)

REWARD_VAR_FLOOR = 1e-4
"""Smallest variance assumed of a group's mean reward (constant rewards would otherwise divide by 0)."""


@dataclass
class WorkerStats:
    sequences: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    abs_diff_sum: float = 0.0
    tokens: int = 0
    groups: int = 0
    by_version: dict[int, list[float]] = field(default_factory=dict)
    """Policy version -> [groups, sum, sum of squares of group mean rewards] of this worker."""
    quarantined: str = ""

    def view(self, reward_z: float) -> WorkerTrust:
        return WorkerTrust(
            sequences_checked=self.sequences,
            rejected=dict(self.rejected),
            mean_abs_logprob_diff=self.abs_diff_sum / self.tokens if self.tokens else 0.0,
            groups=self.groups,
            reward_z=round(reward_z, 3),
        )


class Trust:
    """Trust bookkeeping beside `HubState` (same event loop, no locks); acts on the state through
    its public methods (`drop_worker_work`, `leave`)."""

    def __init__(self, cfg: TrustConfig, state) -> None:
        self.cfg, self.state = cfg, state
        self.stats: dict[str, WorkerStats] = {}
        self.by_version: dict[int, list[float]] = {}
        """Policy version -> [groups, sum, sum of squares of group mean rewards] of unquarantined workers."""

    def _of(self, worker_id: str) -> WorkerStats:
        return self.stats.setdefault(worker_id, WorkerStats())

    # ------------------------------------------------------------------ gates

    def check(self, worker_id: str) -> None:
        """403 `quarantined` for a quarantined worker (leases and submissions call this)."""
        stats = self.stats.get(worker_id)
        if stats is not None and stats.quarantined:
            raise HubError(403, "quarantined", f"worker {worker_id} is quarantined: {stats.quarantined}")

    # ------------------------------------------------------------------ evidence

    def record(self, report: ProvenanceReport) -> list[str]:
        """Add the trainer's verdicts of one step; returns the workers quarantined because of them."""
        newly = []
        for v in report.workers:
            s = self._of(v.worker_id)
            s.sequences += v.sequences
            s.rejected.update(v.rejected)
            s.abs_diff_sum += v.abs_logprob_diff_sum
            s.tokens += v.tokens
            rejected = sum(s.rejected.values())
            if (
                not s.quarantined
                and s.sequences >= self.cfg.quarantine_min_sequences
                and rejected / s.sequences > self.cfg.quarantine_rejected_fraction
            ):
                reasons = ", ".join(f"{k} {n}" for k, n in s.rejected.most_common())
                self.quarantine(v.worker_id, f"provenance: {rejected}/{s.sequences} sequences rejected ({reasons})")
                newly.append(v.worker_id)
        return newly

    def observe_group(self, group: ScoredGroup) -> bool:
        """Count a buffered group's mean reward; True if that quarantined its worker (cherry-picking)."""
        mean = sum(c.reward for c in group.completions) / len(group.completions)
        s = self._of(group.worker_id)
        if s.quarantined:  # a group scored after its worker's quarantine: dropped, not evidence
            return False
        s.groups += 1
        for totals in (s.by_version, self.by_version):
            row = totals.setdefault(group.policy_version, [0, 0.0, 0.0])
            row[0] += 1
            row[1] += mean
            row[2] += mean * mean
        z = self.reward_z(group.worker_id)
        if z > self.cfg.reward_z:
            self.quarantine(
                group.worker_id,
                f"reward outlier: its groups' rewards are {z:.1f} standard errors above the other workers' "
                f"with the same policy versions, over {s.groups} groups (> {self.cfg.reward_z:g}; cherry-picked?)",
            )
            return True
        return False

    def reward_z(self, worker_id: str) -> float:
        """Standard errors by which this worker's group rewards beat the other workers' groups of the
        same policy versions (0: fewer than `reward_min_groups` comparable groups on either side)."""
        s = self.stats.get(worker_id)
        if s is None or s.quarantined or s.groups < self.cfg.reward_min_groups:
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
        """Quarantine a worker: no more leases; its leased, scoring and buffered tasks re-queued."""
        stats = self._of(worker_id)
        if not stats.quarantined:  # its groups no longer count as the others' evidence
            for version, mine in stats.by_version.items():
                every = self.by_version[version]
                for i in range(3):
                    every[i] -= mine[i]
        stats.quarantined = reason
        requeued = self.state.drop_worker_work(worker_id)
        log.warning("worker %s quarantined (%d tasks re-queued): %s", worker_id, requeued, reason)
        return requeued

    def release(self, worker_id: str) -> None:
        """Lift a quarantine; the worker's statistics start again from zero."""
        stats = self.stats.get(worker_id)
        if stats is None or not stats.quarantined:
            raise HubError(404, "not_quarantined", f"worker {worker_id} is not quarantined")
        self.stats[worker_id] = WorkerStats()
        log.warning("quarantine of worker %s lifted", worker_id)

    # ------------------------------------------------------------------ status

    def annotate(self, status: HubStatus, viewer: str | None) -> HubStatus:
        """Status for a caller: trust columns filled in; a worker token (`viewer`, its token id)
        sees only the workers registered with it, and only counts of the others."""
        workers = []
        for w in status.workers:
            rec = self.state.workers.get(w.worker_id)
            if viewer is not None and (rec is None or rec.token != viewer):
                continue
            stats = self.stats.get(w.worker_id)
            if stats is not None:
                trust = stats.view(self.reward_z(w.worker_id))
                w = w.model_copy(update={"quarantined": stats.quarantined, "trust": trust})
            workers.append(w)
        quarantined = sum(1 for wid, s in self.stats.items() if s.quarantined and wid in self.state.workers)
        return status.model_copy(
            update={"workers": workers, "workers_total": len(status.workers), "quarantined": quarantined}
        )
