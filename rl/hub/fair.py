"""Fair shares between operators: of the leasable window, of late tasks (backup leases), of scoring.

An operator (a worker token) holds at most its share of the tasks in flight (`operator_room`); a task
another operator holds past `hub.backup_factor` x the median turnaround is leased again (`late_tasks`).

Scoring slots go round-robin over operators (`FairTurns`): a flood of answers that are slow to verify
(each bounded by `rewards.timeout_s`) delays only its own groups; an honest operator waits for at most
one job per slot of each other operator, however many they queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import statistics
from collections import Counter, OrderedDict, deque
from collections.abc import AsyncIterator
from typing import Any

HubLike = Any
"""The hub's state (rl/hub/state.py `HubState`): its workers, leases, config and recent turnaround."""


def fair_share(state: HubLike) -> int:
    """Tasks one operator may hold: the leasable window over the operators with live, unblocked registrations."""
    operators = {w.token for w in state.workers.values() if w.token not in state.blocked}
    window = min(state.prompts_per_step * (state.max_staleness + 1), state.cfg.hub.buffer_size)
    return max(1, math.ceil(window / max(len(operators), 1)))


def held_by(state: HubLike, operator: str) -> int:
    return sum(len(lease.task_ids) for lease in state.leases.values()
               if state.workers[lease.worker_id].token == operator)  # fmt: skip


def operator_room(state: HubLike, operator: str) -> int:
    """Tasks `operator` may still take: its fair share of the leasable window less what it holds."""
    if not state.cfg.hub.fair_share:
        return state.cfg.hub.max_tasks_per_lease
    return fair_share(state) - held_by(state, operator)


def late_tasks(state: HubLike, operator: str, limit: int, now: float) -> list[int]:
    """Training tasks another operator has held too long (`hub.backup_factor` x the median turnaround, at least
    `hub.backup_min_s`), or holds beyond its fair share (it took them before others joined): leased again as
    backups, at most two holders each; the first valid result wins."""
    if state.cfg.hub.backup_factor <= 0 or limit <= 0:
        return []
    typical = statistics.median(state.turnaround) if state.turnaround else 0.0
    late_after = max(state.cfg.hub.backup_min_s, state.cfg.hub.backup_factor * typical)
    over: Counter[str] = Counter()  # operator -> tasks it holds beyond its share
    if state.cfg.hub.fair_share:
        share = fair_share(state)
        for lease in state.leases.values():
            over[state.workers[lease.worker_id].token] += len(lease.task_ids)
        over = Counter({op: held - share for op, held in over.items()})
    found: list[int] = []
    for lease in state.leases.values():  # oldest first
        holder = state.workers[lease.worker_id].token
        if holder == operator:
            continue
        if now - lease.granted_at < late_after and over[holder] <= 0:
            continue
        for tid in sorted(lease.task_ids):
            if tid in state.evals or len(state.leased.get(tid, ())) > 1:
                continue
            found.append(tid)
            over[holder] -= 1
            if len(found) == limit:
                return found
    return found


class FairTurns:
    """Scoring slots handed out round-robin over the operators that have a job waiting."""

    def __init__(self, slots: int) -> None:
        if slots < 1:
            raise ValueError(f"need at least one slot, got {slots}")
        self.slots = slots
        self.busy = 0
        self.waiting: OrderedDict[str, deque[asyncio.Future[None]]] = OrderedDict()

    def queued(self) -> dict[str, int]:
        """Jobs waiting for a turn, per operator."""
        return {op: len(q) for op, q in self.waiting.items()}

    @contextlib.asynccontextmanager
    async def turn(self, operator: str) -> AsyncIterator[None]:
        """Hold one slot for the body; waits for this operator's turn when every slot is busy."""
        if self.busy < self.slots and not self.waiting:
            self.busy += 1
        else:
            granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self.waiting.setdefault(operator, deque()).append(granted)
            try:
                await granted  # the slot is handed over with the result: `busy` already counts it
            except asyncio.CancelledError:
                if granted.done() and not granted.cancelled():
                    self._hand_over()  # cancelled right after being granted: pass the slot on
                else:
                    self._forget(operator, granted)
                raise
        try:
            yield
        finally:
            self._hand_over()

    def _forget(self, operator: str, granted: asyncio.Future[None]) -> None:
        queue = self.waiting.get(operator)
        if queue is not None and granted in queue:
            queue.remove(granted)
            if not queue:
                del self.waiting[operator]

    def _hand_over(self) -> None:
        """A slot is free: give it to the operator first in line (who then goes to the back), else idle."""
        while self.waiting:
            operator, queue = next(iter(self.waiting.items()))
            granted = queue.popleft()
            if queue:
                self.waiting.move_to_end(operator)
            else:
                del self.waiting[operator]
            if not granted.done():
                granted.set_result(None)
                return
        self.busy -= 1
