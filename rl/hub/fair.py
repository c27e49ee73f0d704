"""Fair shares between operators: of the leasable window, of late tasks (backup leases), of scoring.

An operator (a worker token) holds at most its share of the tasks in flight (`operator_room`); a task
another operator holds past `hub.backup_factor` x the median turnaround is leased again (`late_tasks`).

Scoring slots go round-robin over operators (`FairTurns`), and while two or more operators are live
none holds more than all slots but one: a flood of answers that are slow to verify (each bounded by
`rewards.timeout_s`) delays only its own groups, and another operator's group finds a slot free.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import statistics
from collections import Counter, OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from typing import Any

HubLike = Any
"""The hub's state (rl/hub/state.py `HubState`): its workers, leases, config and recent turnaround."""


def fair_share(state: HubLike) -> int:
    """Tasks one operator may hold: the leasable window over the operators with live, unblocked registrations."""
    window = min(state.prompts_per_step * (state.max_staleness + 1), state.cfg.hub.buffer_size)
    return max(1, math.ceil(window / max(state.live_operators(), 1)))


def held_by(state: HubLike, operator: str) -> int:
    """Task ids `operator`'s leases hold: kept as leases change (`HubState.held`), since every lease asks."""
    return state.held[operator]


def holdings_agree(state: HubLike) -> bool:
    """The counts the state keeps as workers and leases come and go (`registered`, `held`) equal a count from
    scratch (`GET /v1/audit`; tests)."""
    held, registered = Counter(), Counter(w.token for w in state.workers.values())
    for lease in state.leases.values():
        held[lease.token] += len(lease.task_ids)
    nonzero = lambda counts: {k: v for k, v in counts.items() if v}  # noqa: E731
    return nonzero(held) == nonzero(state.held) and registered == state.registered


def operator_room(state: HubLike, operator: str) -> int:
    """Tasks `operator` may still take: its fair share of the leasable window less what it holds."""
    if not state.cfg.hub.fair_share:
        return state.cfg.hub.max_tasks_per_lease
    return fair_share(state) - held_by(state, operator)


def late_tasks(state: HubLike, operator: str, limit: int, now: float) -> list[int]:
    """Training tasks another operator has held too long (`hub.backup_factor` x the median turnaround, at least
    `hub.backup_min_s`), or holds beyond its fair share (it took them before others joined): leased again as
    backups, at most two holders each; the first valid result wins. Not an episode's later turn (it goes back to
    the queue when its lease expires: `hub.lease_ttl_s`)."""
    if state.cfg.hub.backup_factor <= 0 or limit <= 0:
        return []
    typical = statistics.median(state.turnaround) if state.turnaround else 0.0
    late_after = max(state.cfg.hub.backup_min_s, state.cfg.hub.backup_factor * typical)
    over: Counter[str] = Counter()  # operator -> tasks it holds beyond its share
    if state.cfg.hub.fair_share:
        share = fair_share(state)
        over = Counter({op: held - share for op, held in state.held.items()})
    anyone_over = any(extra > 0 for op, extra in over.items() if op != operator)
    found: list[int] = []
    for lease in state.leases.values():  # in the order they were granted: oldest first
        holder = lease.token
        if now - lease.granted_at < late_after:
            if not anyone_over:
                break  # the rest are younger still, and no one holds more than its share
            if over[holder] <= 0:
                continue
        if holder == operator:
            continue
        for tid in sorted(lease.task_ids):
            if tid < 0 or tid in state.episodes or len(state.leased.get(tid, ())) > 1:  # evals; episodes' turns
                continue
            found.append(tid)
            over[holder] -= 1
            if len(found) == limit:
                return found
    return found


class FairTurns:
    """Scoring slots handed out round-robin over the operators that have a job waiting.

    `operators()` counts the live operators: while there are two or more, one operator holds at most
    `slots - 1` slots (so with one hostile operator, the others' jobs never wait for its slow ones).
    """

    def __init__(self, slots: int, operators: Callable[[], int] = lambda: 1) -> None:
        if slots < 1:
            raise ValueError(f"need at least one slot, got {slots}")
        self.slots, self.operators = slots, operators
        self.busy = 0
        self.held: Counter[str] = Counter()
        self.waiting: OrderedDict[str, deque[asyncio.Future[None]]] = OrderedDict()

    def queued(self) -> dict[str, int]:
        """Jobs waiting for a turn, per operator."""
        return {op: len(q) for op, q in self.waiting.items()}

    def cap(self) -> int:
        """Slots one operator may hold now."""
        return self.slots - 1 if self.slots > 1 and self.operators() > 1 else self.slots

    @contextlib.asynccontextmanager
    async def turn(self, operator: str) -> AsyncIterator[None]:
        """Hold one slot for the body; waits for this operator's turn when every slot is busy (or it holds its cap)."""
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiting.setdefault(operator, deque()).append(granted)
        self._hand_over()  # a free slot under this operator's cap: granted at once
        try:
            await granted  # the slot is handed over with the result: `busy` and `held` already count it
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self._release(operator)  # cancelled right after being granted: pass the slot on
            else:
                self._forget(operator, granted)
            raise
        try:
            yield
        finally:
            self._release(operator)

    def _forget(self, operator: str, granted: asyncio.Future[None]) -> None:
        queue = self.waiting.get(operator)
        if queue is not None and granted in queue:
            queue.remove(granted)
            if not queue:
                del self.waiting[operator]

    def _release(self, operator: str) -> None:
        self.busy -= 1
        self.held[operator] -= 1
        if self.held[operator] <= 0:
            del self.held[operator]
        self._hand_over()

    def _hand_over(self) -> None:
        """Free slots go to the operators first in line under their cap (who then go to the back)."""
        cap = self.cap()
        for operator in list(self.waiting):
            if self.busy >= self.slots:
                return
            queue = self.waiting[operator]
            while queue and queue[0].done():  # cancelled while waiting
                queue.popleft()
            if not queue:
                del self.waiting[operator]
                continue
            if self.held[operator] >= cap:
                continue
            queue.popleft().set_result(None)
            self.busy += 1
            self.held[operator] += 1
            del self.waiting[operator]
            if queue:
                self.waiting[operator] = queue  # to the back of the line
