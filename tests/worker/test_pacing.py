"""A worker leases no more than it generates before the hub expires a lease (rollout_workers/pacing.py)."""

from __future__ import annotations

from rl.wire.protocol import Lease, LeasedTask, SamplingParamsWire
from rollout_workers.pacing import TTL_SHARE, Pacing, owed

FIRST = SamplingParamsWire(n=8, temperature=1.0, top_p=1.0, top_k=-1, max_tokens=64)
TURN = FIRST.model_copy(update={"n": 1})  # an episode's next turn: one sequence


def lease(tasks: int, ttl_s: float = 120.0) -> Lease:
    return Lease(
        lease_id="l", expires_in_s=ttl_s, tasks=[LeasedTask(task_id=i, prompt_token_ids=[1]) for i in range(tasks)]
    )


def test_the_tokens_owed_bound_leasing_once_the_throughput_is_known():
    pacing = Pacing()
    assert pacing.room(0.0) and pacing.room(20.0)  # idle: always
    pacing.leased(lease(2), FIRST)  # 2 prompts x 8 x 64 tokens
    assert pacing.tokens_owed == 1024 == owed(2, FIRST)
    assert pacing.room(0.0)  # throughput not measured yet: the engine's own limit applies
    # 1,024 tokens at 20 tokens/s is 51 s, under half of a 120 s lease; at 16 tokens/s it is 64 s, over.
    assert pacing.room(20.0) and not pacing.room(16.0)
    assert 1024 / 16.0 >= TTL_SHARE * 120.0 > 1024 / 20.0
    pacing.leased(lease(30), TURN)  # turns owe one sequence each
    assert pacing.tokens_owed == 1024 + 30 * 64
    pacing.finished(owed(2, FIRST) + owed(30, TURN))
    assert pacing.tokens_owed == 0 and pacing.room(1.0)


def test_the_lease_life_is_the_hubs_and_the_count_never_goes_negative():
    pacing = Pacing()
    pacing.leased(lease(1, ttl_s=10.0), TURN)
    assert pacing.lease_ttl_s == 10.0 and not pacing.room(10.0)  # 64 tokens at 10/s: 6.4 s > 5 s
    pacing.leased(lease(0, ttl_s=0.0), TURN)  # a hub that names no life keeps the last one
    assert pacing.lease_ttl_s == 10.0
    pacing.finished(10_000)
    assert pacing.tokens_owed == 0
