"""Models the hub builds with `model_construct` (per submission, per batch) have no `default_factory`.

pydantic 2.14's `model_construct` inspects every default factory's signature on every call
(`inspect.signature(list)` parses a builtin's text signature: ~0.9 ms); one such field on
`ScoredCompletion` once cost 55% of the hub's CPU per submission (docs/benchmarks.md, "Hot routes and
a pydantic trap"). A default pydantic copies (`= []`) is as safe and costs nothing of the kind.
"""

from __future__ import annotations

import re
from pathlib import Path

from rl.wire import protocol

ROOT = Path(__file__).resolve().parents[2]
CONSTRUCTED = re.compile(r"\b([A-Z]\w*)\.model_construct\(")


def constructed_models() -> set[str]:
    names = set()
    for path in (ROOT / "rl").rglob("*.py"):
        names |= set(CONSTRUCTED.findall(path.read_text()))
    return names


def test_models_built_by_model_construct_have_no_default_factory():
    names = constructed_models()
    assert {"ScoredCompletion", "ScoredGroup", "Batch", "Completion"} <= names
    for name in sorted(names):
        model = getattr(protocol, name)
        factories = [f for f, info in model.model_fields.items() if info.default_factory is not None]
        assert factories == [], f"{name}.{factories}: use a plain default (pydantic copies it)"


def test_a_plain_list_default_is_not_shared_between_models():
    a = protocol.ScoredCompletion.model_construct(token_ids=[1], logprobs=[0.0], finish_reason="stop", reward=1.0,
                                                  components={})  # fmt: skip
    b = protocol.ScoredCompletion.model_validate({"token_ids": [2], "logprobs": [0.0], "finish_reason": "stop",
                                                  "reward": 0.0, "components": {}})  # fmt: skip
    a.turns.append([0, 1, 7, 0])
    assert b.turns == [] and protocol.ScoredCompletion.model_fields["turns"].default == []
