"""Pull the answer (or the code) out of a completion.

These run on untrusted model output, sometimes in the hub's own process, so
they use plain string scans and regexes that cannot backtrack badly: the cost
is linear in the completion length.
"""

from __future__ import annotations

import re
from typing import Literal

AnswerMode = Literal["answer_tag", "last_number", "raw", "answer_tag_or_last_number"]

# A number with optional thousands separators and decimals: "-4", "1,234", "3.50".
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?")
_PY_LANGS = {"python", "py", "python3"}


def last_tag(text: str, tag: str = "answer") -> str | None:
    """Stripped content of the last complete `<tag>...</tag>`, or None when there is none."""
    close = f"</{tag}>"
    end = text.rfind(close)
    if end < 0:
        return None
    start = text.rfind(f"<{tag}>", 0, end)
    if start < 0:
        return None
    return text[start + len(tag) + 2 : end].strip()


def last_number(text: str) -> str | None:
    """The last number in the text, thousands separators removed ("1,234" -> "1234")."""
    matches = _NUMBER.findall(text)
    return matches[-1].replace(",", "") if matches else None


def extract_answer(text: str, mode: AnswerMode = "answer_tag_or_last_number") -> str | None:
    """The answer string a scorer should see, by `mode`:

    - `answer_tag`: content of the last `<answer>...</answer>` (None without one);
    - `last_number`: the last number anywhere in the completion;
    - `raw`: the whole completion, stripped;
    - `answer_tag_or_last_number` (default): the tag if present, else the last number.
    """
    if mode == "raw":
        return text.strip()
    if mode == "last_number":
        return last_number(text)
    tagged = last_tag(text, "answer")
    if tagged is not None or mode == "answer_tag":
        return tagged
    return last_number(text)


def extract_code(text: str) -> str:
    """The program in a completion: the last fenced python block (or last plain fence), else the text.

    An unterminated final fence (a completion cut at max_tokens) still counts as a block.
    """
    parts = text.split("```")
    if len(parts) < 2:
        return text
    blocks = parts[1::2]
    python_block = plain_block = None
    for block in blocks:
        first, _, body = block.partition("\n")
        lang = first.strip().lower()
        if lang in _PY_LANGS:
            python_block = body
        elif not lang:
            plain_block = body
    chosen = python_block if python_block is not None else plain_block
    return chosen if chosen is not None else text
