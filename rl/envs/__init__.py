"""Environments: multi-turn tasks whose every step, tool and grade runs on the trusted side (the hub).

`base.py` is the interface, `render.py` turns observations into token ids with the chat template,
and the built-in environments are registered in `ENVIRONMENTS` by the name a config gives in
`data.source: {type: env, name: ...}`. How it fits together: docs/environments.md.
"""

from __future__ import annotations

from typing import Any

from rl.envs.arithmetic import ArithmeticTool
from rl.envs.base import Environment, Grade, State, Step
from rl.envs.guess import GuessNumber
from rl.envs.third_party import TextArenaEnv, VerifiersEnv

ENVIRONMENTS: dict[str, type] = {"guess_number": GuessNumber, "arithmetic_tool": ArithmeticTool,
                                  "verifiers": VerifiersEnv, "textarena": TextArenaEnv}  # fmt: skip
"""Environments by config name: the built-in ones, and third-party ones run in a process of their own."""

__all__ = ["ENVIRONMENTS", "Environment", "Grade", "State", "Step", "make"]


def make(name: str, params: dict[str, Any]) -> Environment:
    """The environment `name` configured with `params`; a clear error for an unknown name or parameter."""
    cls = ENVIRONMENTS.get(name)
    if cls is None:
        raise ValueError(f"unknown environment {name!r}; built in: {', '.join(sorted(ENVIRONMENTS))}")
    try:
        return cls(**params)
    except TypeError as e:
        raise ValueError(f"environment {name!r}: bad params {params}: {e}") from None
