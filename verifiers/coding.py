"""Code correctness: extract the model's program and run it against tests in sandboxes.

Tests come from the example: `tests: str` (assert-style code run after the program, one case),
`tests: list[str]` (several cases, partial credit), `tests: list[{"input", "output"}]` (stdin/stdout),
or HumanEval rows (`test` defining `check`, `entry_point`, the stub in `code_prompt` or `prompt`).
With a stub, a completion that re-defines the entry point is appended to it, else taken as its body.
No process that runs model code ever holds an expected output or a pass/fail signal: stdin/stdout
programs run in one sandbox (`_code_runner.py stdio`) and are compared here; assert-style tests run
in a persistent test-harness sandbox (`_code_harness.py`) that calls the program, in a fresh sandbox
per item (`_code_runner.py serve`), over two pipes. Every case gets a fresh copy of the program with
CPU and wall-clock limits. Threat model and process layout: docs/security.md, "Model-written code".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from verifiers._ipc import ChildDied, ChildProcess, IdleSet
from verifiers.base import Example, Reward, failed
from verifiers.extract import extract_code
from verifiers.sandbox import SCRIPTS, SandboxSpec, bwrap_argv, python_command, require_sandbox, script_binds

HARNESS = Path(__file__).with_name("_code_harness.py")
RUNNER = Path(__file__).with_name("_code_runner.py")
PLAIN = Path(__file__).with_name("_plain.py")


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


def function_stub(example: Example) -> str | None:
    """The task's function stub (HumanEval `code_prompt` or `prompt`), if it has one and an entry point."""
    entry = example.get("entry_point")
    stub = example.get("code_prompt") or (example.get("prompt") if entry and "test" in example else None)
    return stub if isinstance(stub, str) and isinstance(entry, str) and entry else None


def build_job(completion: str, example: Example) -> tuple[str, str, list[Any]] | str:
    """(program, mode, cases) for an example, or the reason it has no usable tests."""
    code = extract_code(completion)
    tests = example.get("tests")
    entry = example.get("entry_point")
    stub = function_stub(example)
    if stub is not None and entry:
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


class _SandboxFailed(Exception):
    """An item's sandbox timed out, died or answered nonsense: the item scores 0 with this reason."""


def _compare(stdout: str, error: str, expected: str) -> tuple[bool, str]:
    """Trailing whitespace on lines and at the end is ignored."""
    if error:
        return False, error
    got = [line.rstrip() for line in stdout.rstrip().splitlines()]
    want = [line.rstrip() for line in expected.rstrip().splitlines()]
    if got == want:
        return True, ""
    return False, f"wrong output: got {chr(10).join(got)[:100]!r}, want {chr(10).join(want)[:100]!r}"


class _Harness:
    """A persistent sandboxed test harness and the unix socket that hands it each item's pipe ends."""

    def __init__(self, argv: list[str], limits: str) -> None:
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            fd = theirs.fileno()
            self.child = ChildProcess([*argv, str(fd), limits], pass_fds=(fd,), max_output=16 << 20)
        except BaseException:
            self.sock.close()
            raise
        finally:
            theirs.close()
        self.sock.setblocking(False)  # one byte and two fds per item: never fills the buffer

    def hand_over(self, fds: tuple[int, int]) -> None:
        socket.send_fds(self.sock, [b"p"], list(fds))

    def kill(self) -> None:
        self.child.kill()
        self.sock.close()


class CodeTerm:
    """The `code` reward term: a fresh program sandbox per item, at most `concurrency` items at a time."""

    def __init__(self, params: dict[str, Any], *, timeout_s: float, concurrency: int) -> None:
        require_sandbox()
        self.params = CodeParams(**params)
        self.timeout_s = self.params.timeout_s or timeout_s
        python, roots = python_command(with_site_packages=False)
        files = script_binds(PLAIN, RUNNER, HARNESS)
        spec = SandboxSpec(ro_paths=roots, ro_files=files, tmpfs_mb=self.params.tmpfs_mb)
        self._runner_argv = bwrap_argv(spec, [*python, f"{SCRIPTS}/{RUNNER.name}"])
        self._harness_argv = bwrap_argv(spec, [*python, f"{SCRIPTS}/{HARNESS.name}"])
        # A slot per concurrent item; it holds that slot's test harness once an assert-style item started one.
        self._slots: IdleSet[_Harness | None] = IdleSet()
        for _ in range(self.params.concurrency or concurrency):
            self._slots.release(None)
        self._harnesses: set[_Harness] = set()
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
            if mode == "stdio":
                oks, reasons = await self._run_stdio(program, cases)
            else:
                slot = slot if slot is not None and slot.child.alive() else self._start_harness(slot)
                trusted = {"entry_point": example.get("entry_point"), "stub": function_stub(example)}
                oks, reasons = await self._run_asserts(slot, program, cases, trusted)
        except _SandboxFailed as e:
            return failed(str(e), passed=0.0)
        except BaseException:
            if slot is not None:  # e.g. cancelled mid-item: its verdict may still arrive, out of step
                self._retire(slot)
                slot = None
            raise
        finally:
            if slot is not None and not slot.child.alive():  # killed after a timeout or a protocol error
                self._retire(slot)
                slot = None
            self._slots.release(slot)
        p = self.params
        frac = sum(oks) / len(oks)
        value = frac if p.partial else float(all(oks))
        first_fail = next((f"case {i}: {r}" for i, (ok, r) in enumerate(zip(oks, reasons, strict=True)) if not ok), "")
        return Reward(value, {"passed": frac}, first_fail)

    def _limits(self) -> dict[str, Any]:
        p = self.params
        return {
            "case_timeout_s": min(p.case_timeout_s, self.timeout_s),
            "memory_mb": p.memory_mb,
            "max_processes": p.max_processes,
            "file_size_mb": p.file_size_mb,
            "max_output_bytes": p.max_output_kb << 10,
            "max_message_bytes": (p.max_output_kb << 10) + 4096,
        }

    async def _run_stdio(self, program: str, cases: list[dict[str, str]]) -> tuple[list[bool], list[str]]:
        """Run the program per input in one sandbox; compare what it printed here, outside it."""
        limits = self._limits()
        job = {"mode": "stdio", "program": program, "inputs": [c["input"] for c in cases], **limits}
        runner = ChildProcess(self._runner_argv, max_output=(limits["max_output_bytes"] + 4096) * len(cases) * 2)
        try:
            raw = await self._exchange(runner, job)
        finally:
            runner.kill()
        try:
            runs = json.loads(raw)["runs"]
            got = [(r["stdout"], r["error"]) for r in runs]
            if len(got) != len(cases) or not all(isinstance(o, str) and isinstance(e, str) for o, e in got):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            self.errors += 1
            raise _SandboxFailed(f"sandbox gave no result: {runner.stderr_text()[-300:] or 'no output'}") from None
        verdicts = [_compare(out, err, case["output"]) for (out, err), case in zip(got, cases, strict=True)]
        return [ok for ok, _ in verdicts], [why for _, why in verdicts]

    def _start_harness(self, old: _Harness | None) -> _Harness:
        if old is not None:
            self._retire(old)
        limits = json.dumps({"memory_mb": self.params.memory_mb})
        harness = _Harness(self._harness_argv, limits)
        self._harnesses.add(harness)
        return harness

    def _retire(self, harness: _Harness) -> None:
        harness.kill()
        self._harnesses.discard(harness)

    async def _run_asserts(
        self, harness: _Harness, program: str, cases: list[str], trusted: dict[str, Any]
    ) -> tuple[list[bool], list[str]]:
        """The program in a fresh sandbox, the tests (with the task's stub) in the slot's harness, joined by
        two pipes."""
        limits = self._limits()
        calls_r, calls_w = os.pipe()
        replies_r, replies_w = os.pipe()
        runner = None
        try:
            runner = ChildProcess(self._runner_argv, pass_fds=(calls_r, replies_w), max_output=65536)
            harness.hand_over((calls_w, replies_r))
        except OSError as e:
            if runner is not None:
                runner.kill()
            harness.kill()  # its stream may be out of step now; the slot starts a fresh one
            self.errors += 1
            raise _SandboxFailed(f"cannot start the item's sandboxes: {e}") from None
        finally:
            for fd in (calls_r, calls_w, replies_r, replies_w):
                os.close(fd)  # the sandboxes hold their ends; a dead one's peer then sees end of file
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        serve = {"mode": "serve", "program": program, "call_fds": [calls_r, replies_w], **limits}
        tests = {"cases": cases, "call_fds": [calls_w, replies_r], **trusted, **limits}
        try:
            with contextlib.suppress(ChildDied):  # a runner that died at once fails the cases, below
                await runner.write(json.dumps(serve).encode(), deadline)
            runner.close_stdin()
            await harness.child.send_frame(json.dumps(tests).encode(), deadline)
            reply = json.loads(await harness.child.read_frame(deadline))
        except TimeoutError:
            self.timeouts += 1
            harness.kill()  # its verdict may still come: the slot starts a fresh harness
            raise _SandboxFailed(f"timeout after {self.timeout_s:g}s (sandboxes killed)") from None
        except (ChildDied, ValueError) as e:
            self.errors += 1
            harness.kill()
            raise _SandboxFailed(f"test harness failed: {e}") from None
        finally:
            runner.kill()
        try:
            if "error" in reply:
                raise _SandboxFailed(f"test harness failed: {str(reply['error'])[:300]}")
            oks = [r["ok"] for r in reply["results"]]
            reasons = [str(r["reason"]) for r in reply["results"]]
            if len(oks) != len(cases) or not all(isinstance(ok, bool) for ok in oks):
                raise TypeError
        except (KeyError, TypeError):
            self.errors += 1
            raise _SandboxFailed("test harness answered out of protocol") from None
        return oks, reasons

    async def _exchange(self, child: ChildProcess, job: dict[str, Any]) -> bytes:
        """Send `job` as the child's whole stdin and read its whole stdout, within the item timeout."""
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        try:
            await child.write(json.dumps(job).encode(), deadline)
            child.close_stdin()
            return await child.read_all(deadline)
        except TimeoutError:
            self.timeouts += 1
            raise _SandboxFailed(f"timeout after {self.timeout_s:g}s (sandbox killed)") from None
        except ChildDied as e:
            self.errors += 1
            raise _SandboxFailed(f"sandbox failed: {e}") from None

    def metrics(self) -> dict[str, float]:
        return {"timeouts": float(self.timeouts), "errors": float(self.errors)}

    def close(self) -> None:
        """Kill the test harnesses (program sandboxes die with their items)."""
        for harness in list(self._harnesses):
            self._retire(harness)
