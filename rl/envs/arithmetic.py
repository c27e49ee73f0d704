"""Arithmetic with a Python tool: multi-digit products the model may compute by calling a sandboxed interpreter.

A turn either calls the tool (`<python>code</python>`, or a fenced ```python block, the form small chat
models write unprompted: the code runs in the verifiers' bubblewrap sandbox on the hub side, no network,
bounded time and memory, a fresh filesystem per call, and its printed output comes back as the next
observation) or answers: `<answer>N</answer>`, or with `plain_answers`, a turn without code (and the last
turn the episode allows, code or not: its output could not be seen) is the answer and its last integer is
graded. Either ends the episode. The grade compares the answer with the row's
product, which the model never sees.
"""

from __future__ import annotations

import random
import re
import subprocess
import time
from dataclasses import dataclass
from typing import Any

from rl.envs.base import Grade, State, Step
from verifiers.sandbox import SandboxSpec, bwrap_argv, python_command, require_sandbox

CODE = re.compile(r"<python>(.*?)(?:</python>|$)|```(?:python|py)[ \t]*\n(.*?)(?:```|$)", re.DOTALL)
ANSWER = re.compile(r"<answer>\s*(-?[\d,]+)\s*</answer>")
INTEGER = re.compile(r"-?\d[\d,]*")
OUTPUT_CHARS = 512
"""A tool's output is cut to this many characters before it becomes observation tokens."""


def run_python(code: str, timeout_s: float, memory_mb: int) -> tuple[str, bool]:
    """(output, ok) of `code` in a fresh sandbox: no network, rlimits, killed after `timeout_s`."""
    require_sandbox()
    python, roots = python_command(with_site_packages=False)
    limits = f"import resource as r; r.setrlimit(r.RLIMIT_AS, ({memory_mb << 20},) * 2)\n"
    argv = bwrap_argv(SandboxSpec(ro_paths=roots, tmpfs_mb=8), [*python, "-c", limits + code])
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout_s:g} s", False
    out = (done.stdout + done.stderr[-OUTPUT_CHARS:]).strip()
    return out[:OUTPUT_CHARS], done.returncode == 0


@dataclass(frozen=True)
class ArithmeticTool:
    min_digits: int = 2
    max_digits: int = 3
    max_turns: int = 3
    tool_timeout_s: float = 5.0
    tool_memory_mb: int = 256
    plain_answers: bool = False
    """A turn without code answers with its last integer (no `<answer>` tag needed)."""

    def rows(self, size: int, seed: int) -> list[dict[str, Any]]:
        rng = random.Random(seed)
        out = []
        for _ in range(size):
            a, b = (rng.randint(10 ** (rng.randint(self.min_digits, self.max_digits) - 1),
                                10 ** self.max_digits - 1) for _ in range(2))  # fmt: skip
            out.append({"question": f"What is {a} * {b}? You may run Python by writing <python>print(...)</python>; "
                                    "give the result as <answer>N</answer>.", "answer": a * b})  # fmt: skip
        return out

    def reset(self, row: dict[str, Any]) -> State:
        return {"answer": int(row["answer"]), "given": None, "tool_calls": 0, "turns": 0}

    def step(self, state: State, turn: str) -> tuple[State, Step]:
        state = {**state, "turns": state["turns"] + 1}
        if (m := ANSWER.search(turn)) is not None:
            return {**state, "given": _integer(m.group(1))}, Step(done=True)
        code, last = CODE.search(turn), state["turns"] >= self.max_turns
        if self.plain_answers and (code is None or last) and (numbers := INTEGER.findall(turn)):
            return {**state, "given": _integer(numbers[-1])}, Step(done=True)  # the last turn answers, code or not
        if last:
            return state, Step(done=True)
        if code is not None:
            t0 = time.perf_counter()
            source = code.group(1) if code.group(1) is not None else code.group(2)
            output, ok = run_python(source, self.tool_timeout_s, self.tool_memory_mb)
            tool_s = time.perf_counter() - t0
            state = {**state, "tool_calls": state["tool_calls"] + 1}
            return state, Step(messages=[{"role": "user", "content": f"<output>\n{output}\n</output>"}],
                               tool_calls=1, tool_errors=int(not ok), tool_s=tool_s)  # fmt: skip
        return state, Step(messages=[{"role": "user", "content": "Answer with <answer>N</answer>, or run "
                                      "<python>...</python> first."}])  # fmt: skip

    def grade(self, state: State) -> Grade:
        correct = float(state["given"] == state["answer"])
        return Grade(correct, {"correct": correct, "tool_calls": float(state["tool_calls"])})


def _integer(text: str) -> int | None:
    """An integer written with or without thousands separators; None when it is not one (e.g. "1,,2")."""
    digits = text.replace(",", "")
    return int(digits) if digits.lstrip("-").isdigit() and len(digits) <= 64 else None
