"""A tool-using environment in Prime Intellect's `verifiers` format (`vf.ToolEnv`), for the tests.

Runs only in the environments' venv (`.venv-envs`). The model may call `multiply(a, b)` with a native
tool call; the environment runs it and answers with a tool message; the episode ends on a turn without
a tool call, graded by whether its text holds the product.
"""

import random

from datasets import Dataset

import verifiers as vf


def multiply(a: int, b: int) -> int:
    """Multiply two integers.

    Args:
        a: The first factor.
        b: The second factor.
    """
    return a * b


def correct(completion, answer, **kwargs) -> float:
    last = next((m for m in reversed(completion) if m.role == "assistant"), None)
    return float(last is not None and answer in str(last.content or ""))


def load_environment(size: int = 16, max_turns: int = 3):
    rng = random.Random(0)
    rows = []
    for _ in range(size):
        a, b = rng.randint(100, 999), rng.randint(100, 999)
        rows.append({"question": f"What is {a} * {b}? Use the tool.", "answer": str(a * b)})
    return vf.ToolEnv(
        dataset=Dataset.from_list(rows), tools=[multiply], rubric=vf.Rubric(funcs=[correct]), max_turns=max_turns
    )
