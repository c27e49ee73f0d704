"""The plain-data codec between the code sandboxes: exact round trips, and refusal of anything else."""

from __future__ import annotations

import math
import os

import pytest

from verifiers import _plain

VALUES = [
    None,
    True,
    0,
    -(10**40),
    1.5,
    -0.0,
    math.inf,
    "text é",
    b"\x00\xff",
    3 + 4j,
    [1, [2, (3,)]],
    (1, "a", None),
    {1, 2},
    frozenset({"x"}),
    {1: "a", (1, 2): [3], "k": {"nested": True}},
    [],
    (),
    {},
]


@pytest.mark.parametrize("value", VALUES, ids=repr)
def test_plain_values_round_trip_with_their_exact_types(value) -> None:
    back = _plain.decode(_plain.encode(value))
    assert back == value and type(back) is type(value)
    if isinstance(value, dict):
        assert [type(k) for k in back] == [type(k) for k in value]


def test_nan_survives() -> None:
    assert math.isnan(_plain.decode(_plain.encode(math.nan)))


class Anything:
    def __eq__(self, other: object) -> bool:
        return True


class Text(str):
    pass


@pytest.mark.parametrize("value", [Anything(), Text("x"), [1, Anything()], {"k": Text("v")}, print, range(3)])
def test_non_plain_values_are_refused(value) -> None:
    with pytest.raises(TypeError, match="not plain data"):
        _plain.encode(value)


def test_references_cross_only_when_asked_for() -> None:
    kept: list = []

    def keep(obj: object) -> int:
        kept.append(obj)
        return len(kept) - 1

    thing = Anything()
    data = _plain.encode([1, thing, {"k": print}], keep)
    assert data == {"$": "list", "v": [1, {"$": "ref", "v": 0}, {"$": "dict", "v": [["k", {"$": "ref", "v": 1}]]}]}
    assert _plain.decode(data, kept.__getitem__) == [1, thing, {"k": print}]
    with pytest.raises(ValueError, match="not plain data"):
        _plain.decode(data)  # no deref: references are refused
    with pytest.raises(ValueError, match="malformed ref"):
        _plain.decode({"$": "ref", "v": 7}, kept.__getitem__)


def test_self_reference_and_deep_nesting_are_refused() -> None:
    loop: list = []
    loop.append(loop)
    with pytest.raises(TypeError, match="nested too deeply"):
        _plain.encode(loop)
    deep = {"$": "list", "v": []}
    for _ in range(_plain.MAX_DEPTH + 2):
        deep = {"$": "list", "v": [deep]}
    with pytest.raises(ValueError, match="nested too deeply"):
        _plain.decode(deep)


@pytest.mark.parametrize(
    "data",
    [
        [1, 2],  # an untagged JSON array
        {"a": 1},
        {"$": "list", "v": [1], "extra": 1},
        {"$": "object", "v": []},
        {"$": "set", "v": [{"$": "list", "v": []}]},  # unhashable member
        {"$": "dict", "v": [[1]]},
        {"$": "bytes", "v": "zz"},
        {"$": "complex", "v": ["1", "2"]},
    ],
)
def test_malformed_data_is_refused(data) -> None:
    with pytest.raises(ValueError):
        _plain.decode(data)


def test_frames_round_trip_and_respect_the_size_limit() -> None:
    read, write = os.pipe()
    try:
        _plain.send(write, {"case": 0, "value": _plain.encode((1, 2))})
        assert _plain.recv(read, 1 << 20) == {"case": 0, "value": {"$": "tuple", "v": [1, 2]}}
        _plain.send(write, {"big": "x" * 2000})
        with pytest.raises(ValueError, match="over the 1000 byte limit"):
            _plain.recv(read, 1000)  # the stream is out of step after this: callers give up on it
    finally:
        os.close(write)
        os.close(read)
    read, write = os.pipe()
    os.write(write, _plain.HEADER.pack(5) + b"{nope")
    os.close(write)
    with pytest.raises(ValueError):
        _plain.recv(read, 1000)
    assert _plain.recv(read, 1000) is None  # end of input
    os.close(read)
