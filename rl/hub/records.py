"""What the hub keeps per worker, per lease and per task on its way to the verifier (rl/hub/state.py)."""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any

from rl.wire.packed import PackedCompletion
from rl.wire.protocol import ScoredGroup

MAX_SCORING_ATTEMPTS = 3
"""Scoring attempts of one task before it is dropped (each failure is logged and counted)."""
SCORING_RETRY_S = 1.0
"""Pause before the first re-try of a failed scoring; doubled for each further attempt."""
MAX_SCORING_RETRY_S = 30.0
"""Longest pause between two scoring attempts."""


@dataclass
class WorkerRecord:
    worker_id: str
    name: str
    engine: str
    token: str
    last_seen: float
    secret: str = ""
    policy_version: int = -1
    tokens_per_s: float = 0.0
    fetch_s: float = 0.0
    load_s: float = 0.0
    leases: set[str] = field(default_factory=set)
    completed_tasks: int = 0


@dataclass
class LeaseRecord:
    lease_id: str
    worker_id: str
    task_ids: set[int]
    expires_at: float
    version: int = 0
    """The policy version the worker held when it took the lease: its results cannot be older."""
    granted_at: float = 0.0
    token: str = ""
    """The holder's operator (its worker's token id): whose fair share the tasks count against."""
    done: set[int] = field(default_factory=set)
    lost: set[int] = field(default_factory=set)
    """Tasks another lease (a backup) finished first: a later result for them is a duplicate."""


@dataclass(frozen=True)
class ScoringJob:
    """One accepted task on its way to the verifier: all the scorer needs, so it never reads the state."""

    task_id: int
    example: dict[str, Any]
    """The data row the verifier checks the completions against."""
    completions: list[PackedCompletion]
    """Checked by rl/hub/submissions.py."""
    policy_version: int
    worker_id: str
    worker_name: str
    attempt: int = 1
    gen_s: float = 0.0
    """The submission's generation seconds (carried to the `ScoredGroup`)."""
    cached_prompt_tokens: int = 0
    """Prompt tokens the worker says its prefix cache held (reported for an episode's later turns)."""

    def key(self) -> tuple[str, int]:
        """What `HubState.scoring` holds for the task while this job is its live one (not given up meanwhile, and
        not taken and submitted again by another worker since)."""
        return (self.worker_id, self.policy_version)

    def retry(self) -> ScoringJob:
        return replace(self, attempt=self.attempt + 1)


class ScoredBuffer(OrderedDict[int, ScoredGroup]):
    """Scored groups by task id, in arrival order, with a lower bound on their policy versions: a batch pull
    looks for stale groups only when one may be there, not through the whole buffer at every wake-up (each
    scored group wakes a waiting pull: with thousands of groups buffered, as behind a trainer that falls
    behind, that scan took a third of a saturated hub's CPU, docs/benchmarks.md). Removing groups never makes
    the bound wrong, only loose."""

    floor: float = math.inf

    def __setitem__(self, task_id: int, group: ScoredGroup) -> None:
        super().__setitem__(task_id, group)
        self.floor = min(self.floor, group.policy_version)

    def drop_stale(self, oldest: int) -> list[int]:
        """Remove the groups made before version `oldest`; their task ids, in arrival order."""
        if self.floor >= oldest:
            return []
        stale = [tid for tid, group in self.items() if group.policy_version < oldest]
        for tid in stale:
            del self[tid]
        self.floor = min((group.policy_version for group in self.values()), default=math.inf)
        return stale
