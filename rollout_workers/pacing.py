"""How much work a worker may hold: no more than it generates before the hub expires a lease.

The lease thread keeps the engine fed (`Worker.inflight_target` prompts). On a slow or shared machine
that many prompts can take longer than a lease lives (`Lease.expires_in_s`, the hub's `lease_ttl_s`);
then the hub re-queues the lease and refuses its submission: the work is done again elsewhere, and a
worker that is always that slow never lands any (measured: multi-turn episodes of 64-token turns on
2 shared cores took 106-136 s per lease against a 120 s lease, 12 leases lost in 15 minutes).
`Pacing` counts the tokens leased and not yet generated (a task owes `n * max_tokens`, an upper bound)
and, once the worker's throughput is measured, lets it lease more only while those tokens take under
`TTL_SHARE` of a lease's life at that throughput. An idle worker may always lease.
"""

from __future__ import annotations

from dataclasses import dataclass

from rl.wire.protocol import Lease, SamplingParamsWire

TTL_SHARE = 0.5
"""Share of a lease's life the work already held may take (the rest: queueing here, submission, a slow step)."""


def owed(tasks: int, sampling: SamplingParamsWire) -> int:
    """Most tokens `tasks` tasks generate under `sampling`."""
    return tasks * sampling.n * sampling.max_tokens


@dataclass
class Pacing:
    tokens_owed: int = 0
    """Tokens leased and not yet generated (their bound)."""
    lease_ttl_s: float = 0.0
    """The last lease's life at the hub (0: not known yet)."""

    def leased(self, lease: Lease, sampling: SamplingParamsWire) -> None:
        self.tokens_owed += owed(len(lease.tasks), sampling)
        self.lease_ttl_s = lease.expires_in_s or self.lease_ttl_s

    def finished(self, tokens: int) -> None:
        self.tokens_owed = max(0, self.tokens_owed - tokens)

    def room(self, tokens_per_s: float) -> bool:
        """Whether one more lease fits: the tokens owed take under `TTL_SHARE` of a lease at `tokens_per_s`."""
        if self.tokens_owed == 0 or tokens_per_s <= 0.0 or self.lease_ttl_s <= 0.0:
            return True
        return self.tokens_owed / tokens_per_s < TTL_SHARE * self.lease_ttl_s
