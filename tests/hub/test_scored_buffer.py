"""ScoredBuffer's version bound: a pull's stale scan, skipped when the bound says none can be stale, finds
exactly what a scan of every group finds."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from rl.hub.records import ScoredBuffer
from rl.wire.protocol import ScoredGroup


def group(tid: int, version: int) -> ScoredGroup:
    return ScoredGroup.model_construct(task_id=tid, policy_version=version, completions=[])


ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(0, 30), st.integers(0, 8)),
        st.tuples(st.just("del"), st.integers(0, 30), st.just(0)),
        st.tuples(st.just("pop"), st.integers(0, 30), st.just(0)),
        st.tuples(st.just("stale"), st.integers(0, 10), st.just(0)),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_drop_stale_equals_a_full_scan(steps):
    buffer, plain = ScoredBuffer(), {}
    for op, a, b in steps:
        if op == "add":
            buffer[a] = group(a, b)
            plain[a] = b
        elif op == "del" and a in plain:
            del buffer[a], plain[a]
        elif op == "pop":
            assert (buffer.pop(a, None) is None) == (plain.pop(a, None) is None)
        elif op == "stale":
            expected = [tid for tid, version in plain.items() if version < a]
            assert buffer.drop_stale(a) == expected
            plain = {tid: v for tid, v in plain.items() if v >= a}
        assert buffer.floor <= min(plain.values(), default=float("inf"))
        assert [(tid, g.policy_version) for tid, g in buffer.items()] == list(plain.items())
