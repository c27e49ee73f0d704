"""`GET /v1/status`'s answer, built from the hub's state (rl/hub/state.py)."""

from __future__ import annotations

import itertools
from collections import Counter
from typing import Any, Protocol

from rl.hub.records import LeaseRecord, WorkerRecord
from rl.wire.protocol import HubStatus, OperatorStatus, WorkersSummary, WorkerStatus


class StatusSource(Protocol):
    """What the answer reads of the hub's state (rl/hub/state.py's `HubState` has all of it)."""

    workers: dict[str, WorkerRecord]
    leases: dict[str, LeaseRecord]
    policy_version: int
    queue: Any
    leased: Any
    scoring: Any
    buffer: Any
    consumed: int
    batches: int
    rejections: dict[str, int]
    staleness_hist: dict[int, int]
    stale_dropped: int
    zero_variance_skipped: int
    submissions: int
    tokens_generated: int
    started: float
    scoring_failures: int
    scoring_dropped: int
    last_scoring_error: str | None


def hub_status(
    state: StatusSource, now: float, verifier: dict[str, float], offset: int = 0, limit: int = 100
) -> HubStatus:
    """The hub at a glance; `workers` lists `limit` workers from `offset` (registration order), so the
    answer stays small with thousands of them (`worker_summary` covers all)."""
    page = list(itertools.islice(state.workers.values(), offset, offset + limit))
    updated = [w for w in state.workers.values() if w.fetch_s > 0 or w.load_s > 0]
    summary = WorkersSummary(
        total=len(state.workers),
        by_version={str(k): v for k, v in sorted(Counter(w.policy_version for w in state.workers.values()).items())},
        tokens_per_s=sum(w.tokens_per_s for w in state.workers.values()),
        fetch_s=sum(w.fetch_s for w in updated) / len(updated) if updated else 0.0,
        load_s=sum(w.load_s for w in updated) / len(updated) if updated else 0.0,
    )
    by_operator: dict[str, list[int]] = {}
    for w in state.workers.values():
        row = by_operator.setdefault(w.token, [0, 0, 0])
        row[0] += 1
        row[1] += sum(len(state.leases[lid].task_ids) for lid in w.leases if lid in state.leases)
        row[2] += w.completed_tasks
    return HubStatus(
        policy_version=state.policy_version,
        operators=[
            OperatorStatus(operator=op, workers=n, leased_tasks=leased, completed_tasks=done)
            for op, (n, leased, done) in sorted(by_operator.items())
        ],  # fmt: skip
        worker_summary=summary,
        workers=[
            WorkerStatus(
                worker_id=w.worker_id,
                name=w.name,
                engine=w.engine,
                policy_version=w.policy_version,
                tokens_per_s=w.tokens_per_s,
                last_seen_s=round(now - w.last_seen, 2),
                leased_tasks=sum(len(state.leases[lid].task_ids) for lid in w.leases if lid in state.leases),
                completed_tasks=w.completed_tasks,
                fetch_s=w.fetch_s,
                load_s=w.load_s,
            )
            for w in page
        ],
        queued=len(state.queue),
        leased=len(state.leased),
        scoring=len(state.scoring),
        buffered=len(state.buffer),
        consumed=state.consumed,
        batches=state.batches,
        rejections=dict(state.rejections),
        staleness_histogram={str(k): v for k, v in sorted(state.staleness_hist.items())},
        stale_dropped=state.stale_dropped,
        zero_variance_skipped=state.zero_variance_skipped,
        submissions=state.submissions,
        tokens_generated=state.tokens_generated,
        verifier=verifier,
        uptime_s=round(now - state.started, 1),
        scoring_failures=state.scoring_failures,
        scoring_dropped=state.scoring_dropped,
        last_scoring_error=state.last_scoring_error,
        episodes=state.episodes.summary() if state.episodes.enabled else {},
    )
