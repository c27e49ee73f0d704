"""Scoring turns are round-robin over operators (rl/hub/fair.py): a flood delays only its own jobs."""

from __future__ import annotations

import asyncio

import pytest

from rl.hub.fair import FairTurns


def run_jobs(slots: int, jobs: list[tuple[str, float]]) -> list[str]:
    """Start every job at once (in list order); returns the operators in the order their jobs began."""
    order: list[str] = []

    async def main() -> None:
        turns = FairTurns(slots)

        async def job(operator: str, seconds: float) -> None:
            async with turns.turn(operator):
                order.append(operator)
                await asyncio.sleep(seconds)

        await asyncio.gather(*(job(op, s) for op, s in jobs))
        assert turns.busy == 0 and not turns.waiting

    asyncio.run(main())
    return order


def test_a_flooding_operator_waits_its_turn():
    order = run_jobs(1, [("flood", 0.01)] * 20 + [("honest", 0.0)] * 2)
    assert order.index("honest") <= 2, order  # the first free slot after the flood's first job
    assert order[: order.index("honest") + 1].count("flood") <= 2


def test_every_slot_is_used_and_operators_alternate():
    order = run_jobs(2, [("a", 0.01)] * 4 + [("b", 0.01)] * 4 + [("c", 0.01)] * 4)
    assert sorted(order) == sorted(["a"] * 4 + ["b"] * 4 + ["c"] * 4)
    # "a" arrived first and took both free slots; then turns rotate over whoever is still waiting
    assert order == ["a", "a", "a", "b", "c", "a", "b", "c", "b", "c", "b", "c"], order


def test_a_cancelled_waiter_gives_its_turn_away():
    async def main() -> None:
        turns = FairTurns(1)
        started: list[str] = []

        async def job(op: str) -> None:
            async with turns.turn(op):
                started.append(op)
                await asyncio.sleep(0.02)

        first = asyncio.create_task(job("a"))
        await asyncio.sleep(0)
        waiting = asyncio.create_task(job("b"))
        third = asyncio.create_task(job("c"))
        await asyncio.sleep(0.005)
        waiting.cancel()
        await asyncio.gather(first, third, return_exceptions=True)
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert started == ["a", "c"] and turns.busy == 0 and not turns.waiting

    asyncio.run(main())


def test_no_slots_is_an_error():
    with pytest.raises(ValueError):
        FairTurns(0)


def test_with_two_operators_one_never_holds_every_slot():
    """A flood of slow jobs from one operator keeps a slot free: the other's jobs start at once, not after
    a slow one ends; alone, an operator uses every slot."""

    async def main(operators: int) -> tuple[int, float]:
        turns = FairTurns(2, operators=lambda: operators)
        most, started = 0, {}
        loop = asyncio.get_running_loop()

        async def job(op: str, seconds: float, key: str) -> None:
            nonlocal most
            async with turns.turn(op):
                started[key] = loop.time()
                most = max(most, turns.held["flood"])
                await asyncio.sleep(seconds)

        flood = [asyncio.create_task(job("flood", 0.2, f"f{i}")) for i in range(6)]
        await asyncio.sleep(0.01)  # the flood holds what it may
        asked = loop.time()
        await job("honest", 0.0, "honest")
        waited = started["honest"] - asked
        await asyncio.gather(*flood)
        assert turns.busy == 0 and not turns.waiting and not turns.held
        return most, waited

    most, waited = asyncio.run(main(operators=2))
    assert most == 1 and waited < 0.1, (most, waited)  # a flood job takes 0.2 s
    most, waited = asyncio.run(main(operators=1))
    assert most == 2 and waited >= 0.15, (most, waited)  # alone it took both: the next job waits for one
