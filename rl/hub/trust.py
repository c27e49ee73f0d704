"""Per-worker trust on the hub: provenance statistics, reward comparison, quarantine, revocation.

Workers are untrusted (docs/security.md). Two kinds of evidence reach this module:

- the trainer's provenance verdicts (`ProvenanceReport`, `POST /v1/provenance`): per worker, how
  many of its sequences were checked and how many were masked out of the loss, by reason
  (rl/provenance.py), and the mean |claimed - recomputed| logprob;
- every scored group the hub buffers: its mean reward, compared with the other workers' (a
  worker that generates k groups and submits the best one has a reward far above the others').

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
from rl.protocol import HubError, HubStatus, ProvenanceReport, ScoredGroup, WorkerTrust

log = logging.getLogger(__name__)

REWARD_VAR_FLOOR = 1e-4
"""Smallest reward variance assumed per group mean (constant rewards would otherwise divide by 0)."""


@dataclass
class WorkerStats:
    sequences: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    abs_diff_sum: float = 0.0
    tokens: int = 0
    groups: int = 0
    reward_sum: float = 0.0
    reward_sumsq: float = 0.0
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
        self.groups = 0
        self.reward_sum = 0.0
        self.reward_sumsq = 0.0

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
        s.reward_sum += mean
        s.reward_sumsq += mean * mean
        self.groups += 1
        self.reward_sum += mean
        self.reward_sumsq += mean * mean
        z = self.reward_z(group.worker_id)
        if not s.quarantined and z > self.cfg.reward_z:
            others = (self.reward_sum - s.reward_sum) / max(self.groups - s.groups, 1)
            self.quarantine(
                group.worker_id,
                f"reward outlier: mean group reward {s.reward_sum / s.groups:.3f} over {s.groups} groups vs "
                f"{others:.3f} for the other workers (z = {z:.1f} > {self.cfg.reward_z:g}; cherry-picked samples?)",
            )
            return True
        return False

    def reward_z(self, worker_id: str) -> float:
        """Standard errors between this worker's mean group reward and the other (unquarantined)
        workers' (0: too few groups, or the worker is quarantined)."""
        s = self.stats.get(worker_id)
        n_o = self.groups - (s.groups if s else 0)
        if s is None or s.quarantined or s.groups < self.cfg.reward_min_groups or n_o < self.cfg.reward_min_groups:
            return 0.0
        m_w = s.reward_sum / s.groups
        m_o = (self.reward_sum - s.reward_sum) / n_o
        v_w = max(s.reward_sumsq / s.groups - m_w * m_w, REWARD_VAR_FLOOR)
        v_o = max((self.reward_sumsq - s.reward_sumsq) / n_o - m_o * m_o, REWARD_VAR_FLOOR)
        return (m_w - m_o) / math.sqrt(v_w / s.groups + v_o / n_o)

    # ------------------------------------------------------------------ actions

    def quarantine(self, worker_id: str, reason: str) -> int:
        """Quarantine a worker: no more leases; its leased, scoring and buffered tasks re-queued."""
        stats = self._of(worker_id)
        if not stats.quarantined:  # out of the population the other workers are compared with
            self.groups -= stats.groups
            self.reward_sum -= stats.reward_sum
            self.reward_sumsq -= stats.reward_sumsq
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
