"""Format and length rewards: tag structure (`<think>`, `<answer>`) and DAPO overlong shaping.

Both are cheap, linear string scans of our own, so the pool runs them inline
(no worker process). Typical use is a small weight next to a correctness term:

    terms: [{name: reasoning_gym}, {name: format, weight: 0.1, params: {tags: [answer]}},
            {name: length, weight: 1.0, params: {max_length: 512, buffer: 128}}]
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from verifiers.base import Example, Reward


class FormatParams(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    tags: list[str] = Field(default_factory=lambda: ["think", "answer"], min_length=1)
    """Tags that must each appear exactly once, complete and non-empty, in this order."""
    answer_last: bool = True
    """Nothing but whitespace may follow the last tag's closing."""
    strict: bool = False
    """Nothing but whitespace may appear outside the tags at all."""
    partial: bool = False
    """Value is the fraction of checks passed instead of all-or-nothing."""


class LengthParams(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    max_length: int = Field(1024, ge=1)
    """L_max: completions longer than this get the full penalty (-1)."""
    buffer: int = Field(256, ge=0)
    """L_cache: the penalty ramps linearly from 0 to -1 over the last `buffer` units before L_max."""
    unit: Literal["tokens", "chars"] = "tokens"
    """Length unit; tokens come from `example["completion_tokens"]`, else are estimated from characters."""
    chars_per_token: float = Field(4.0, gt=0)
    """Estimate used when the example carries no token count."""


def score_format(completion: str, example: Example, **params) -> Reward:
    """1.0 when the completion has the required tag structure (see `FormatParams`), else 0."""
    p = FormatParams(**params)
    checks: dict[str, float] = {}
    spans: list[tuple[int, int]] = []  # (start of open tag, end of close tag)
    for tag in p.tags:
        open_, close = f"<{tag}>", f"</{tag}>"
        start, end = completion.find(open_), completion.find(close)
        once = completion.count(open_) == 1 and completion.count(close) == 1
        ok = once and 0 <= start < end and completion[start + len(open_) : end].strip() != ""
        checks[tag] = float(ok)
        if ok:
            spans.append((start, end + len(close)))
    complete = len(spans) == len(p.tags)
    checks["order"] = float(complete and all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False)))
    if p.answer_last:
        checks["end"] = float(complete and completion[spans[-1][1] :].strip() == "")
    if p.strict:
        outside, pos = [], 0
        for start, end in sorted(spans):
            outside.append(completion[pos:start])
            pos = max(pos, end)
        outside.append(completion[pos:])
        checks["strict"] = float(complete and "".join(outside).strip() == "")
    passed = sum(checks.values())
    value = passed / len(checks) if p.partial else float(passed == len(checks))
    missing = [k for k, v in checks.items() if not v]
    return Reward(value, checks, f"failed checks: {', '.join(missing)}" if missing else "")


def overlong_penalty(length: float, max_length: int, buffer: int) -> float:
    """DAPO soft overlong punishment: 0 up to L_max - L_cache, linear to -1 at L_max, -1 beyond."""
    if length <= max_length - buffer:
        return 0.0
    if length > max_length:
        return -1.0
    return (max_length - buffer - length) / buffer if buffer else -1.0


def score_length(completion: str, example: Example, **params) -> Reward:
    """Overlong shaping in [-1, 0] (use a positive weight; the value is already a penalty)."""
    p = LengthParams(**params)
    if p.unit == "chars":
        length, how = float(len(completion)), "chars"
    elif isinstance(example.get("completion_tokens"), int):
        length, how = float(example["completion_tokens"]), "tokens"
    else:
        length, how = len(completion) / p.chars_per_token, "tokens (estimated)"
    value = overlong_penalty(length, p.max_length, p.buffer)
    info = f"{length:.0f} {how} > {p.max_length - p.buffer}" if value < 0 else ""
    return Reward(value, {"units": length}, info)
