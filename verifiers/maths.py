"""Math correctness with math-verify: answer extraction and equivalence.

math-verify compares parsed expressions (sympy): `\\frac{1}{2}`, `0.5` and `1/2` are equal, as are
reordered sets, intervals, `50\\%` and `0.5`, and answers with units (`5\\text{ cm}`). Its timeouts
use `signal.alarm` (main thread only), so this runs in the pool's worker processes, which the pool
kills when an item outlives the hard timeout (`9^{9^{9^{9}}}` ends at the alarm, a stuck C call at
the kill). Prediction: the last `<answer>...</answer>` if any (param `answer_tag`), else the whole
completion (boxed answers first, then the last LaTeX or plain expression). Gold answers and tag
contents without LaTeX delimiters are read as if boxed (`10^{-3}` is 0.001, not 10); plain-text
function notation like `1/sqrt(2)` (math-verify would extract just `1`) is rewritten to LaTeX.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field

from verifiers.base import Example, Reward, failed
from verifiers.extract import last_tag

_DELIMITERS = ("$", "\\(", "\\[", "\\boxed", "\\fbox")
# A plain-text expression made of numbers, operators, parentheses, sqrt and pi (no backtracking traps).
_PLAIN_EXPR = re.compile(r"(?:sqrt|pi|[\d.+\-*/^() ])+")


class MathParams(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    answer_tag: bool = True
    """Verify the content of the last `<answer>` tag when there is one (else the whole completion)."""
    timeout_s: int | None = Field(None, ge=1)
    """math-verify's own per-call timeout (parse and compare); None: a third of the pool timeout."""
    float_rounding: int = Field(6, ge=0, le=20)
    """Decimal places numbers are rounded to before comparing."""


def prepare() -> None:
    """Import math-verify (and sympy) up front; workers call this before taking items."""
    from math_verify import parse, verify

    verify(parse("$1$"), parse("$1$"))


def _has_delimiters(text: str) -> bool:
    return any(d in text for d in _DELIMITERS)


def _parse_answer(text: str, timeout: int) -> list:
    """Parse a bare answer (a gold answer or tag content): as if boxed first, then as free text."""
    from math_verify import parse

    text = text.strip()
    if not text:
        return []
    if not _has_delimiters(text) and "\n" not in text:
        boxed = parse("\\boxed{" + text + "}", parsing_timeout=timeout)
        if boxed:
            return boxed
    return parse(text, parsing_timeout=timeout)


def _latexify_plain(expr: str) -> str | None:
    """`1/sqrt(2)` -> `1/\\sqrt{2}`; None when parentheses after sqrt do not balance."""
    out, i, depth_stack = [], 0, []
    while i < len(expr):
        if expr.startswith("sqrt", i):
            j = i + 4
            while j < len(expr) and expr[j] == " ":
                j += 1
            if j >= len(expr) or expr[j] != "(":
                return None
            out.append("\\sqrt{")
            depth_stack.append(True)
            i = j + 1
            continue
        ch = expr[i]
        if ch == "(":
            depth_stack.append(False)
            out.append(ch)
        elif ch == ")":
            if not depth_stack:
                return None
            out.append("}" if depth_stack.pop() else ")")
        elif expr.startswith("pi", i):
            out.append("\\pi ")
            i += 2
            continue
        else:
            out.append(ch)
        i += 1
    return "".join(out) if not depth_stack else None


def _plain_text_fallback(text: str, timeout: int) -> list:
    """Last plain expression using sqrt/pi, parsed through LaTeX (math-verify misreads `1/sqrt(2)` as 1)."""
    if _has_delimiters(text) or ("sqrt" not in text and "pi" not in text):
        return []
    candidates = [m.strip() for m in _PLAIN_EXPR.findall(text)]
    candidates = [c for c in candidates if ("sqrt" in c or "pi" in c) and any(ch.isdigit() for ch in c)]
    if not candidates:
        return []
    latex = _latexify_plain(candidates[-1])
    if latex is None:
        return []
    from math_verify import parse

    return parse("\\boxed{" + latex + "}", parsing_timeout=timeout)


def score(completion: str, example: Example, **params) -> Reward:
    """1.0 when the completion's final answer equals `example["answer"]` (math-verify), else 0."""
    from math_verify import parse, verify

    p = MathParams(**params)
    timeout = p.timeout_s or 2
    gold_text = example.get("answer")
    if gold_text is None:
        return failed("example has no 'answer'")
    gold = _parse_answer(str(gold_text), timeout)
    if not gold:
        return failed(f"could not parse the gold answer {str(gold_text)[:80]!r}")
    tagged = last_tag(completion, "answer") if p.answer_tag else None
    if tagged is not None:
        pred, source = _parse_answer(tagged, timeout), "answer_tag"
    else:
        pred = _plain_text_fallback(completion, timeout) or parse(completion, parsing_timeout=timeout)
        source = "text"
    if not pred:
        return failed(f"no answer found ({source})", extracted=0.0)
    ok = verify(gold, pred, float_rounding=p.float_rounding, timeout_seconds=timeout)
    shown = str(pred[-1])[:80]
    return Reward(float(ok), {"extracted": 1.0}, "" if ok else f"answer {shown!r} != gold {str(gold_text)[:80]!r}")
