"""Code correctness: extract the model's program and run it against tests in the sandbox.

Tests come from the example, in one of these shapes:
- `tests: str` - assert-style test code run after the program (one case);
- `tests: list[str]` - several assert-style cases (partial credit possible);
- `tests: list[{"input": str, "output": str}]` - stdin/stdout cases;
- HumanEval rows: `test` (defines `check`) and `entry_point`, with the function
  stub in `code_prompt` (our rows) or `prompt` (the original jsonl).

With a function stub, a completion that re-defines the entry point is appended
to the stub (imports stay available); otherwise it is taken as the body that
continues the stub. Every item gets its own sandbox (`verifiers.sandbox`), its
cases run one after another in fresh processes inside it with per-case CPU and
wall-clock limits, and the whole run is killed at the item timeout.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from verifiers._ipc import ChildDied, ChildProcess, IdleSet
from verifiers.base import Example, Reward, failed
from verifiers.extract import extract_code
from verifiers.sandbox import SCRIPTS, SandboxSpec, bwrap_argv, python_command, require_sandbox

HARNESS = Path(__file__).with_name("_code_harness.py")


class CodeParams(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    case_timeout_s: float = Field(3.0, gt=0)
    """Wall-clock (and CPU) limit of one test case."""
    timeout_s: float | None = Field(None, gt=0)
    """Wall-clock limit of a whole item, sandbox start included (None: the pool timeout)."""
    memory_mb: int = Field(512, ge=32)
    """Address-space limit of every process in the sandbox."""
    max_processes: int = Field(32, ge=2)
    """Processes (and threads) the sandbox may hold at once: fork bombs stop here."""
    file_size_mb: int = Field(16, ge=1)
    """Largest file a program may write (in its tmpfs)."""
    tmpfs_mb: int = Field(64, ge=1)
    """Size of the writable work dir and /tmp."""
    max_output_kb: int = Field(1024, ge=1)
    """Stdout a case may produce before it fails."""
    partial: bool = False
    """Reward is the fraction of passing cases instead of all-or-nothing."""
    concurrency: int | None = Field(None, ge=1)
    """Sandboxes running at once (None: the pool's worker count)."""


def build_job(completion: str, example: Example) -> tuple[str, str, list[Any]] | str:
    """(program, mode, cases) for an example, or the reason it has no usable tests."""
    code = extract_code(completion)
    tests = example.get("tests")
    entry = example.get("entry_point")
    stub = example.get("code_prompt") or (example.get("prompt") if entry and "test" in example else None)
    if isinstance(stub, str) and entry:
        program = stub + code if f"def {entry}(" not in code else stub + "\n\n" + code
    else:
        program = code
    if tests is None and isinstance(example.get("test"), str) and entry:
        tests = example["test"] + f"\n\ncheck({entry})\n"
    if isinstance(tests, str):
        return program, "assert", [tests]
    if isinstance(tests, list) and tests and all(isinstance(t, str) for t in tests):
        return program, "assert", tests
    if isinstance(tests, list) and tests and all(isinstance(t, dict) and "output" in t for t in tests):
        return program, "stdio", [{"input": str(t.get("input", "")), "output": str(t["output"])} for t in tests]
    return "example has no usable tests (`tests`, or HumanEval `test` + `entry_point`)"


class CodeTerm:
    """The `code` reward term: one sandbox per item, at most `concurrency` at a time."""

    def __init__(self, params: dict[str, Any], *, timeout_s: float, concurrency: int) -> None:
        require_sandbox()
        self.params = CodeParams(**params)
        self.timeout_s = self.params.timeout_s or timeout_s
        self._python, roots = python_command(with_site_packages=False)
        script = f"{SCRIPTS}/{HARNESS.name}"
        spec = SandboxSpec(ro_paths=roots, ro_files=((str(HARNESS), script),), tmpfs_mb=self.params.tmpfs_mb)
        self._argv = bwrap_argv(spec, [*self._python, script])
        self._slots: IdleSet[int] = IdleSet()
        for slot in range(self.params.concurrency or concurrency):
            self._slots.release(slot)
        self.timeouts = 0
        self.errors = 0

    async def score_many(self, items: list[tuple[str, Example]]) -> list[Reward]:
        return list(await asyncio.gather(*(self.score(text, example) for text, example in items)))

    async def score(self, completion: str, example: Example) -> Reward:
        job = build_job(completion, example)
        if isinstance(job, str):
            return failed(job)
        program, mode, cases = job
        slot = await self._slots.acquire()
        try:
            return await self._run(program, mode, cases)
        finally:
            self._slots.release(slot)

    async def _run(self, program: str, mode: str, cases: list[Any]) -> Reward:
        p = self.params
        nonce = secrets.token_hex(16)
        payload = {
            "program": program,
            "mode": mode,
            "cases": cases,
            "nonce": nonce,
            "case_timeout_s": min(p.case_timeout_s, self.timeout_s),
            "memory_mb": p.memory_mb,
            "max_processes": p.max_processes,
            "file_size_mb": p.file_size_mb,
            "max_output_bytes": p.max_output_kb << 10,
        }
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        child = ChildProcess(self._argv, max_output=(p.max_output_kb << 10) * (len(cases) + 1) + 65536)
        try:
            await child.write(json.dumps(payload).encode(), deadline)
            child.close_stdin()
            raw = await child.read_all(deadline)
        except TimeoutError:
            self.timeouts += 1
            return failed(f"timeout after {self.timeout_s:g}s (sandbox killed)", passed=0.0)
        except ChildDied as e:
            self.errors += 1
            return failed(f"sandbox failed: {e}", passed=0.0)
        finally:
            stderr = child.stderr_text()
            child.kill()
        try:
            results = json.loads(raw)["results"]
            oks = [bool(r["ok"]) for r in results]
            reasons = [str(r.get("reason", "")) for r in results]
        except (ValueError, KeyError, TypeError):
            self.errors += 1
            return failed(f"sandbox gave no result: {stderr[-300:] or 'no output'}", passed=0.0)
        if len(oks) != len(cases):
            return failed("sandbox returned the wrong number of results", passed=0.0)
        frac = sum(oks) / len(oks)
        value = frac if p.partial else float(all(oks))
        first_fail = next((f"case {i}: {r}" for i, (ok, r) in enumerate(zip(oks, reasons, strict=True)) if not ok), "")
        return Reward(value, {"passed": frac}, first_fail)

    def metrics(self) -> dict[str, float]:
        return {"timeouts": float(self.timeouts), "errors": float(self.errors)}

    def close(self) -> None:
        """Nothing persistent: each sandbox is killed when its item ends."""
