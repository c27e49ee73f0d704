"""The reward contract every verifier follows, and how term rewards compose.

A score function is `score(completion_text, example, **params) -> Reward`:
`example` is one data row (`question`, `answer`, `metadata`, other columns) and
`params` are the term's `RewardTerm.params` from the run config. The pool
(`verifiers.pool`) runs each configured term and combines them with
`combine`: the total is the weighted sum of the term values, and
`components` keeps every term's unweighted value by name (plus sub-components
as `term/name`), so a user can see why a completion got its reward.

A verifier never raises for bad model output: it returns `failed(reason)`
(value 0, the reason in `info`). Exceptions are for broken configs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

Example = dict[str, Any]


@dataclass(frozen=True)
class Reward:
    """A scored completion: the value used for training, its parts, and a human-readable reason."""

    value: float
    components: dict[str, float] = field(default_factory=dict)
    info: str = ""


ScoreFn = Callable[..., Reward]


class VerifierError(RuntimeError):
    """A reward configuration that cannot work (unknown term, bad params, missing sandbox)."""


TIMEOUT_MARK = "timeout after"
"""How every scorer's timeout reason begins (`Reward.info`): the hub counts them per operator."""


def failed(reason: str, **components: float) -> Reward:
    """Reward 0 with a reason, for output that cannot be scored (no answer, timeout, crash)."""
    return Reward(0.0, dict(components), reason)


def as_reward(result: Any, name: str = "custom") -> Reward:
    """Accept what user reward functions return: a `Reward`, a number, a bool or None."""
    if isinstance(result, Reward):
        return result
    if result is None:
        return failed(f"{name} returned None (not applicable)")
    if isinstance(result, bool | int | float):
        return Reward(float(result), {})
    raise TypeError(f"{name} returned {type(result).__name__}; expected Reward, float, bool or None")


def finite(value: Any, default: float = 0.0) -> float:
    """A float that is safe to train on: NaN and infinities become `default`."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return default
    return v if math.isfinite(v) else default


def combine(terms: Sequence[tuple[str, float, Reward]]) -> Reward:
    """Weighted sum of (name, weight, term reward); components keep each term's unweighted value."""
    components: dict[str, float] = {}
    infos: list[str] = []
    total = 0.0
    for name, weight, reward in terms:
        value = finite(reward.value)
        total += weight * value
        components[name] = value
        for key, sub in reward.components.items():
            components[key if key.startswith(f"{name}/") else f"{name}/{key}"] = finite(sub)
        if reward.info:
            infos.append(f"{name}: {reward.info}")
    return Reward(total, components, "; ".join(infos))
