"""VerifierPool with real worker processes: composition, custom and TRL-style functions, hung and
crashing scorers, a free event loop, metrics, shutdown; and `rl verify` end to end."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.sandbox import sandbox_required  # noqa: F401 - the fixture

from rl.config import RewardsConfig, RewardTerm
from verifiers.base import VerifierError
from verifiers.pool import VerifierPool

REPO = Path(__file__).resolve().parents[2]

REWARDS_MODULE = '''
import os, time

def trl_accuracy(prompts, completions, answer, **kwargs):
    """A TRL reward function, unchanged."""
    return [1.0 if str(a) in c else 0.0 for c, a in zip(completions, answer)]

def politeness(text, example, bonus=0.5):
    print("stray output must not break the worker protocol")
    return bonus if "please" in text else 0.0

def hang(text, example):
    if "hang" in text:
        time.sleep(60)
    return 1.0

def crash(text, example):
    if "crash" in text:
        os._exit(3)
    return 1.0
'''


@pytest.fixture(scope="module")
def rewards_module(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("custom_rewards")
    (root / "scatter_test_rewards.py").write_text(REWARDS_MODULE)
    sys.path.insert(0, str(root))
    yield "scatter_test_rewards"
    sys.path.remove(str(root))


def test_terms_compose_by_weight_in_order(rewards_module: str) -> None:
    terms = [
        RewardTerm(name="math"),
        RewardTerm(name="format", weight=0.1, params={"tags": ["answer"]}),
        RewardTerm(name=f"{rewards_module}:politeness", weight=2.0, params={"bonus": 0.25}),
        RewardTerm(name="length", params={"max_length": 30, "buffer": 5, "unit": "chars"}),
    ]
    items = [(f"<answer>{i}</answer>", {"answer": str(i)}) for i in range(12)]
    items.append(("please, the answer is <answer>3</answer>", {"answer": "4"}))
    with VerifierPool(terms, workers=2, timeout_s=5.0) as pool:
        rewards = pool.score_many_sync(items)
    assert [r.components["math"] for r in rewards] == [1.0] * 12 + [0.0]
    assert rewards[0].value == pytest.approx(1.0 + 0.1)
    last = rewards[-1]
    assert last.components[f"{rewards_module}:politeness"] == 0.25
    assert last.components["length"] == -1.0  # 40 chars > L_max 30
    assert last.value == pytest.approx(0.0 + 0.1 + 2 * 0.25 - 1.0)
    assert "math:" in last.info and "length:" in last.info


def test_trl_style_reward_function_works_unchanged(rewards_module: str) -> None:
    rewards = RewardsConfig(terms=[RewardTerm(name=f"{rewards_module}:trl_accuracy")], workers=1, timeout_s=5.0)
    with VerifierPool.from_config(rewards) as pool:
        got = pool.score_many_sync([("it is 4", {"question": "2+2", "answer": 4}), ("5", {"answer": 4})])
    assert [r.value for r in got] == [1.0, 0.0]


def test_hung_scorer_times_out_and_worker_is_replaced(rewards_module: str) -> None:
    """A scoring process that never returns (sleeps 60 s): killed at its 1 s budget, the item scores 0, a fresh
    process scores the rest, and the pool keeps working."""
    with VerifierPool([RewardTerm(name=f"{rewards_module}:hang")], workers=1, timeout_s=1.0) as pool:
        start = time.perf_counter()
        rewards = pool.score_many_sync([("fine", {}), ("hang", {}), ("fine", {})])
        took = time.perf_counter() - start
        timing = f"hung item killed at the 1 s budget; the three items scored in {took:.1f} s"
        assert took < 10.0, timing
        assert [r.value for r in rewards] == [1.0, 0.0, 1.0], timing
        assert "timeout after 1s" in rewards[1].info, timing
        m = pool.metrics()
        assert m["verifier/timeouts"] == 1.0 and m["verifier/worker_restarts"] == 1.0, timing
        assert pool.score_many_sync([("fine", {})])[0].value == 1.0, timing
        print(timing)


def test_crashing_scorer_scores_zero_and_pool_recovers(rewards_module: str) -> None:
    with VerifierPool([RewardTerm(name=f"{rewards_module}:crash")], workers=1, timeout_s=5.0) as pool:
        rewards = pool.score_many_sync([("crash", {}), ("fine", {})])
        assert [r.value for r in rewards] == [0.0, 1.0]
        assert "worker crashed" in rewards[0].info and "exit code 3" in rewards[0].info
        assert pool.metrics()["verifier/errors"] == 1.0


def test_event_loop_never_blocks_while_scoring(rewards_module: str) -> None:
    terms = [RewardTerm(name=f"{rewards_module}:hang"), RewardTerm(name="math")]

    async def main() -> float:
        async with VerifierPool(terms, workers=2, timeout_s=1.0) as pool:
            await pool.score_many([("warm up \\boxed{1}", {"answer": "1"})] * 2)
            gaps: list[float] = []
            stop = asyncio.Event()

            async def ticker() -> None:
                last = time.perf_counter()
                while not stop.is_set():
                    await asyncio.sleep(0.01)
                    now = time.perf_counter()
                    gaps.append(now - last)
                    last = now

            tick = asyncio.create_task(ticker())
            items = [("hang", {"answer": "1"})] * 2 + [("\\boxed{1}", {"answer": "1"})] * 50
            start = time.perf_counter()
            rewards = await pool.score_many(items)
            scoring_s = time.perf_counter() - start
            stop.set()
            await tick
            assert [r.components["math"] for r in rewards[2:]] == [1.0] * 50
            return max(gaps) / scoring_s

    # The hung items took >= 1 s each; a blocked loop would show one gap as long as the whole call.
    assert asyncio.run(main()) < 0.5


def test_config_errors_are_raised_clearly(rewards_module: str) -> None:
    with pytest.raises(VerifierError, match="unknown reward term"):
        VerifierPool([RewardTerm(name="nope")])
    pool = VerifierPool([RewardTerm(name=f"{rewards_module}:missing_fn")], workers=1)
    with pool, pytest.raises(VerifierError, match="has no attribute 'missing_fn'"):
        pool.score_many_sync([("x", {})])


def test_metrics_and_close(rewards_module: str) -> None:
    pool = VerifierPool([RewardTerm(name="format")], workers=1)
    assert pool.score_many_sync([]) == []
    pool.score_many_sync([("<think>a</think><answer>b</answer>", {})] * 3)
    m = pool.metrics()
    for key in ("latency_p50_ms", "latency_p99_ms", "timeouts", "errors", "scored"):
        assert f"verifier/{key}" in m
    assert m["verifier/scored"] == 3.0
    pool.close()
    with pytest.raises(VerifierError, match="closed"):
        pool.score_many_sync([("x", {})])


def _rl_verify(*args: str) -> subprocess.CompletedProcess:
    rl = Path(sys.executable).with_name("rl")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(rl), "verify", *args], capture_output=True, text=True, timeout=120, env=env, cwd=REPO)


@pytest.mark.usefixtures("sandbox_required")  # reasoning_gym scores in the sandbox
def test_rl_verify_end_to_end(tmp_path: Path) -> None:
    rows = [
        {"completion": "4 plus 3 is 7. <answer>7</answer>", "answer": "7", "metadata": {"x": 1}},
        {"completion": "<answer>8</answer>", "answer": "7"},
        {"completion": "so \\boxed{\\frac{1}{2}}", "answer": "0.5"},
    ]
    src, dst = tmp_path / "samples.jsonl", tmp_path / "results.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    names = "math,format,reasoning_gym:basic_arithmetic"
    done = _rl_verify("--rewards", names, "--input", str(src), "--output", str(dst))
    assert done.returncode == 0, done.stderr
    assert "summary" in done.stdout and "mean reward" in done.stdout
    results = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [r["components"]["math"] for r in results] == [1.0, 0.0, 1.0]
    assert [r["components"]["reasoning_gym"] for r in results] == [1.0, 0.0, 0.0]
    assert results[0]["reward"] == pytest.approx(2.0)


def test_rl_verify_rejects_bad_input(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"completion": "x", "answer": "1"}\n{not json\n')
    done = _rl_verify("--rewards", "format", "--input", str(bad))
    assert done.returncode == 2 and "bad.jsonl:2" in done.stderr
    done = _rl_verify("--rewards", "format,bogus", "--input", str(bad))
    assert done.returncode == 2 and "unknown reward term 'bogus'" in done.stderr
    done = _rl_verify("--rewards", "format", "--input", str(tmp_path / "missing.jsonl"))
    assert done.returncode == 2 and "does not exist" in done.stderr
