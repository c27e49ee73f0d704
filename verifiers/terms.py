"""The one table from reward-term names to implementations, and config validation against it.

Each built-in term says where it runs:
- `inline`: our own linear-time string checks, run directly in the pool's process;
- `worker`: in the pool's worker processes, with a hard per-item timeout (math-verify
  needs `signal.alarm`; custom functions may hang);
- `sandbox`: model-influenced code runs in bubblewrap (`code`, `reasoning_gym`);
  these are classes with `async score_many(items)`.

A name with a colon is a custom `module:function` (see `verifiers.custom`),
run in the workers. Adding a built-in term is one function and one line here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from verifiers import coding, formatting, maths, procedural
from verifiers.base import VerifierError
from verifiers.custom import check_target

Site = Literal["inline", "worker", "sandbox"]

TABLE: dict[str, tuple[Site, Any, type[BaseModel]]] = {
    "math": ("worker", maths.score, maths.MathParams),
    "format": ("inline", formatting.score_format, formatting.FormatParams),
    "length": ("inline", formatting.score_length, formatting.LengthParams),
    "reasoning_gym": ("sandbox", procedural.ReasoningGymTerm, procedural.ReasoningGymParams),
    "code": ("sandbox", coding.CodeTerm, coding.CodeParams),
}


@dataclass(frozen=True)
class Term:
    """A configured reward term, validated and resolved."""

    name: str
    weight: float
    site: Site
    target: Any
    """A score function (inline), `module:function` (worker), or a sandbox term class."""
    params: dict[str, Any] = field(default_factory=dict)


def _target_path(fn: Any) -> str:
    return f"{fn.__module__}:{fn.__qualname__}"


def resolve(name: str, weight: float, params: dict[str, Any], timeout_s: float) -> Term:
    """Check a term against the table; errors name the term and the bad field."""
    if name in TABLE:
        site, target, model = TABLE[name]
        try:
            checked = model(**params)
        except ValidationError as e:
            problems = "; ".join(f"params.{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
            raise VerifierError(f"reward term {name!r}: {problems}") from None
        if name == "math" and checked.timeout_s is None:
            # math-verify's own alarm should fire well before the pool's hard kill.
            checked = checked.model_copy(update={"timeout_s": max(1, int(timeout_s // 3))})
        resolved = checked.model_dump()
        return Term(name, weight, site, _target_path(target) if site == "worker" else target, resolved)
    if ":" in name:
        check_target(name)
        return Term(name, weight, "worker", name, dict(params))
    known = ", ".join([*TABLE, "module:function"])
    raise VerifierError(f"unknown reward term {name!r}; expected one of: {known}")


def resolve_all(terms: Sequence[Any], timeout_s: float) -> list[Term]:
    """Resolve `RewardTerm`s (or anything with name/weight/params); names must be unique."""
    if not terms:
        raise VerifierError("no reward terms configured")
    resolved = [resolve(t.name, t.weight, dict(t.params), timeout_s) for t in terms]
    names = [t.name for t in resolved]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise VerifierError(f"reward term(s) {', '.join(dupes)} configured twice; names must be unique")
    return resolved
