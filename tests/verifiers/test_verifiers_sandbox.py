"""The sandbox, for real: hostile programs and hostile reasoning-gym answers are contained.

Every attack below is written so that it would *pass* its test if it escaped;
contained, it scores 0 with a reason, and the host is checked afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from helpers.sandbox import sandbox_required  # noqa: F401 - the fixture

from rl.config import RewardTerm
from verifiers import sandbox
from verifiers.base import Reward
from verifiers.coding import CodeTerm
from verifiers.humaneval import load_humaneval
from verifiers.pool import VerifierPool
from verifiers.procedural import make_dataset

CASE_TIMEOUT_S = 1.5

pytestmark = pytest.mark.usefixtures("sandbox_required")


@pytest.fixture(scope="module")
def code_pool():
    params = {"case_timeout_s": CASE_TIMEOUT_S, "memory_mb": 256}
    with VerifierPool([RewardTerm(name="code", params=params)], workers=2, timeout_s=6.0) as pool:
        yield pool


def run(pool: VerifierPool, program: str, tests: str = "assert True") -> tuple[Reward, float]:
    start = time.perf_counter()
    (reward,) = pool.score_many_sync([(f"```python\n{program}\n```", {"tests": tests})])
    return reward, time.perf_counter() - start


def assert_contained(reward: Reward, elapsed: float) -> None:
    assert reward.value == 0.0, reward
    assert reward.info
    assert elapsed < 6.0 + 1.0
    assert subprocess.run(["true"], timeout=10).returncode == 0  # the host can still start processes


def test_sandboxed_code_runs_as_non_root_without_capabilities(code_pool) -> None:
    program = (
        "import os\n"
        "status = open('/proc/self/status').read()\n"
        "cap_eff = [l for l in status.splitlines() if l.startswith('CapEff')][0].split()[1]\n"
        "assert os.getuid() == 65534 and int(cap_eff, 16) == 0\n"
        "assert not os.path.exists('/work') or os.listdir('/') != os.listdir('/work')\n"
        "open('scratch.txt', 'w').write('the work dir is writable')\n"
    )
    reward, _ = run(code_pool, program)
    assert reward.value == 1.0, reward.info


def test_fork_bomb_is_contained(code_pool) -> None:
    program = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    reward, elapsed = run(code_pool, program)
    assert_contained(reward, elapsed)
    # Count only program runners: other sandboxes (scorer servers, test harnesses, other test runs) share the uid.
    pgrep = ["pgrep", "-u", str(sandbox.SANDBOX_UID), "-c", "-f", "_code_runner.py"]
    leftover = subprocess.run(pgrep, capture_output=True, text=True)
    assert int(leftover.stdout.strip() or 0) < 8  # the bomb's processes died with its sandbox


def test_infinite_loop_is_killed_and_other_items_are_unaffected(code_pool) -> None:
    example = {"tests": "assert f() == 1"}
    good = ("```python\ndef f():\n    return 1\n```", example)
    start = time.perf_counter()
    rewards = code_pool.score_many_sync([good, ("```python\nwhile True:\n    pass\n```", example), good])
    elapsed = time.perf_counter() - start
    assert [r.value for r in rewards] == [1.0, 0.0, 1.0]
    assert_contained(rewards[1], elapsed)
    assert "timeout" in rewards[1].info
    assert elapsed < CASE_TIMEOUT_S + 3.0


def test_memory_bomb_is_contained(code_pool) -> None:
    reward, elapsed = run(code_pool, "blocks = []\nwhile True:\n    blocks.append(bytearray(50 * 2**20))")
    assert_contained(reward, elapsed)
    assert "MemoryError" in reward.info


def test_network_is_unreachable(code_pool) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(4)
    port = server.getsockname()[1]
    accepted: list[object] = []

    def accept() -> None:
        with contextlib.suppress(OSError):
            accepted.append(server.accept())

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    program = (
        "import socket\n"
        f"socket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'leak')\n"
        "socket.create_connection(('1.1.1.1', 80), timeout=1)\n"
    )
    reward, elapsed = run(code_pool, program)
    assert_contained(reward, elapsed)
    assert "Error" in reward.info
    thread.join(timeout=0.5)
    server.close()
    assert not accepted


def test_writing_outside_the_work_dir_fails(code_pool, tmp_path: Path) -> None:
    host_file = tmp_path / "escaped.txt"
    repo_file = Path(sys.prefix) / f"escaped-{uuid.uuid4().hex}.txt"  # bound read-only inside
    for target in (host_file, repo_file):
        reward, elapsed = run(code_pool, f"open({str(target)!r}, 'w').write('escaped')")
        assert_contained(reward, elapsed)
        assert "Error" in reward.info
        assert not target.exists()


def test_host_secrets_and_files_are_invisible(code_pool, monkeypatch) -> None:
    secret = uuid.uuid4().hex
    monkeypatch.setenv("SCATTER_RL_TEST_SECRET", secret)
    token = Path.home() / f".scatter-rl-test-token-{uuid.uuid4().hex}"
    token.write_text(secret)
    try:
        reward, elapsed = run(code_pool, "import os\nassert os.environ['SCATTER_RL_TEST_SECRET']")
        assert_contained(reward, elapsed)
        assert "KeyError" in reward.info
        reward, elapsed = run(code_pool, f"assert open({str(token)!r}).read()")
        assert_contained(reward, elapsed)
        assert "No such file" in reward.info
        reward, elapsed = run(code_pool, "print(open('/etc/passwd').read())")
        assert_contained(reward, elapsed)
    finally:
        token.unlink()


def test_exit_zero_is_not_a_pass(code_pool) -> None:
    reward, _ = run(code_pool, "import os\nos._exit(0)", tests="assert False")
    assert reward.value == 0.0 and "before the tests completed" in reward.info
    for program in ("import sys\nsys.exit(0)", "raise SystemExit"):
        reward, _ = run(code_pool, program, tests="assert False")
        assert reward.value == 0.0 and "the program failed: SystemExit" in reward.info


def test_stdio_cases_and_partial_credit() -> None:
    tests = [{"input": "3\n", "output": "6\n"}, {"input": "5", "output": "10"}, {"input": "1", "output": "3"}]
    with VerifierPool([RewardTerm(name="code", params={"partial": True})], workers=1) as pool:
        (reward,) = pool.score_many_sync([("print(int(input()) * 2)", {"tests": tests})])
    assert reward.value == pytest.approx(2 / 3) and "wrong output" in reward.info


def test_humaneval_canonical_solutions_pass_and_broken_ones_fail(code_pool) -> None:
    problems = load_humaneval()
    assert len(problems) == 164
    sample = problems[::20]
    items = [(p["canonical_solution"], p) for p in sample]  # a body that continues the stub
    items += [(f"```python\n{p['answer']}\n```", p) for p in sample[:3]]  # the whole function, fenced
    items += [("    return None\n", p) for p in sample]
    rewards = code_pool.score_many_sync(items)
    n = len(sample)
    assert [r.value for r in rewards[: n + 3]] == [1.0] * (n + 3), [r.info for r in rewards]
    assert all(r.value == 0.0 and r.info for r in rewards[n + 3 :])


@pytest.mark.slow
def test_every_humaneval_canonical_solution_passes_across_the_pipe(code_pool) -> None:
    """The tests call the program over a plain-data pipe: all 164 reference solutions must still pass."""
    problems = load_humaneval()
    rewards = code_pool.score_many_sync([(p["canonical_solution"], p) for p in problems])
    failed = {p["task_id"]: r.info for p, r in zip(problems, rewards, strict=True) if r.value != 1.0}
    assert not failed


@pytest.fixture(scope="module")
def rg_pool():
    with VerifierPool([RewardTerm(name="reasoning_gym")], workers=1, timeout_s=2.0) as pool:
        yield pool


def test_reasoning_gym_eval_attack_leaves_host_untouched(rg_pool) -> None:
    (row,) = make_dataset("string_insertion", size=1, seed=0)
    marker = Path("/tmp") / f"scatter-rl-pwned-{uuid.uuid4().hex}"
    attacks = [
        f"__import__('os').system('touch {marker}')",
        f"open('{marker}', 'w').write('x') and list('{row['answer']}')",  # written, in the sandbox only
    ]
    items = [(f"<answer>{a}</answer>", row) for a in attacks]
    items.append((f"<answer>list('{row['answer']}')</answer>", row))  # the scorer really evals: 0.1
    items.append((f"<answer>{row['answer']}</answer>", row))
    rewards = rg_pool.score_many_sync(items)
    assert not marker.exists()
    assert [r.value for r in rewards] == [0.0, 0.1, 0.1, 1.0]


@pytest.mark.slow
def test_reasoning_gym_answer_that_kills_its_server_only_hurts_itself(rg_pool) -> None:
    (row,) = make_dataset("string_insertion", size=1, seed=0)
    good = (f"<answer>{row['answer']}</answer>", row)
    kill = ("<answer>__import__('os').kill(__import__('os').getppid(), 9)</answer>", row)
    rewards = rg_pool.score_many_sync([good, kill, good])
    assert [r.value for r in rewards] == [1.0, 0.0, 1.0]
    assert "sandbox server failed" in rewards[1].info
    assert rg_pool.score_many_sync([good])[0].value == 1.0


def test_reasoning_gym_hung_scorer_is_killed_and_batch_continues(rg_pool) -> None:
    (row,) = make_dataset("string_insertion", size=1, seed=1)
    hang = "__import__('signal').pthread_sigmask(0, {14}) or __import__('time').sleep(60)"
    items = [(f"<answer>{row['answer']}</answer>", row), (f"<answer>{hang}</answer>", row)]
    items += [(f"<answer>{row['answer']}</answer>", row)]
    start = time.perf_counter()
    rewards = rg_pool.score_many_sync(items)
    assert time.perf_counter() - start < 6.0
    assert [r.value for r in rewards] == [1.0, 0.0, 1.0]
    assert "timeout" in rewards[1].info


def test_reasoning_gym_scores_quickstart_rows(rg_pool) -> None:
    params = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1, "operators": ["+", "-"]}
    rows = make_dataset("basic_arithmetic", params, size=200, seed=0)
    items = [(f"Thinking. <answer>{r['answer']}</answer>", r) for r in rows]
    items += [(f"the result is {r['answer']}", r) for r in rows]  # last-number fallback
    items += [("<answer>not a number</answer>", rows[0])]
    rewards = rg_pool.score_many_sync(items)  # throughput: scripts/bench_verifiers.py, not a timed assertion
    assert [r.value for r in rewards] == [1.0] * 400 + [0.0]


def test_missing_bubblewrap_refuses_to_run_code(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    sandbox._probe.cache_clear()
    try:
        with pytest.raises(sandbox.SandboxUnavailable, match="bwrap.* not found on PATH; install bubblewrap"):
            VerifierPool([RewardTerm(name="code")])
        with pytest.raises(sandbox.SandboxUnavailable):
            VerifierPool([RewardTerm(name="reasoning_gym")])
    finally:
        sandbox._probe.cache_clear()


def test_dead_test_harness_is_replaced_for_the_next_item() -> None:
    """The persistent test-harness sandbox dies (killed from outside): the next item starts a fresh one."""
    term = CodeTerm({"case_timeout_s": CASE_TIMEOUT_S}, timeout_s=6.0, concurrency=1)
    item = ("```python\ndef f():\n    return 1\n```", {"tests": "assert f() == 1"})
    try:
        assert asyncio.run(term.score(*item)).value == 1.0
        (harness,) = term._harnesses
        os.killpg(harness.child.pid, signal.SIGKILL)
        harness.child.proc.wait(timeout=10)
        assert asyncio.run(term.score(*item)).value == 1.0
        assert harness not in term._harnesses and len(term._harnesses) == 1
    finally:
        term.close()
    assert not term._harnesses


def test_program_with_a_big_table_and_small_constants_passes(code_pool) -> None:
    """A global too big to send to the harness stays with the program; small ones reach the tests."""
    program = "SQUARES = [i * i for i in range(300_000)]\nLIMIT = 10\n\ndef square(n):\n    return SQUARES[n]\n"
    reward, _ = run(code_pool, program, tests="assert square(LIMIT) == 100 and square(299_999) == 299_999**2")
    assert reward.value == 1.0, reward.info
