"""Benchmark the verifiers (not a test): math throughput, sandbox overhead, reasoning-gym throughput.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_verifiers.py [--items 2000] [--runs 30] [--no-write]

1. Math: verifications/s of raw `math_verify.verify(parse(gold), parse(pred))`
   in this process vs our verifier on the same items: `verifiers.maths.score`
   in-process, and `VerifierPool` with 1 and 2 workers (goal: >= 0.8x raw).
2. Code: wall time of one sandboxed run (bubblewrap + harness, one assert case)
   vs the same program in a plain unsandboxed `python -I -S` subprocess
   (goal: < 50 ms overhead per run).
3. reasoning-gym: answers/s through the sandboxed scorer servers, in GRPO-sized
   groups of 8 and in batches of 256.

Results are printed and written to the `## Verifiers` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rl.config import RewardTerm  # noqa: E402
from verifiers.coding import CodeTerm  # noqa: E402
from verifiers.maths import score as math_score  # noqa: E402
from verifiers.pool import VerifierPool  # noqa: E402
from verifiers.procedural import make_dataset  # noqa: E402
from verifiers.sandbox import python_command  # noqa: E402

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
SECTION = "## Verifiers"


def math_items(n: int, seed: int = 0) -> list[tuple[str, dict]]:
    """A mix like real GRPO traffic: integers, fractions vs decimals, LaTeX, some wrong answers."""
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        a, b = rng.randint(1, 999), rng.randint(2, 50)
        kind = rng.random()
        if kind < 0.5:
            gold, pred = str(a), f"Adding up, the answer is \\boxed{{{a if rng.random() < 0.7 else a + 1}}}."
        elif kind < 0.8:
            decimal = rng.random() < 0.5
            gold, pred = f"\\frac{{{a}}}{{{b}}}", f"So $x = {a / b:.6f}$" if decimal else f"\\boxed{{{a}/{b}}}"
        else:
            gold, pred = f"{a}\\sqrt{{{b}}}", f"The result is $\\boxed{{\\sqrt{{{a * a * b}}}}}$"
        items.append((pred, {"answer": gold}))
    return items


def bench_math(n: int) -> dict[str, float]:
    from math_verify import parse, verify

    items = math_items(n)
    math_score(*items[0])  # imports
    start = time.perf_counter()
    raw_ok = sum(bool(verify(parse(f"${ex['answer']}$"), parse(text))) for text, ex in items)
    raw = n / (time.perf_counter() - start)
    start = time.perf_counter()
    ours_ok = sum(math_score(text, ex, timeout_s=5).value for text, ex in items)
    inproc = n / (time.perf_counter() - start)
    out = {"raw": raw, "inproc": inproc, "raw_correct": raw_ok / n, "ours_correct": ours_ok / n}
    for workers in (1, 2):
        with VerifierPool([RewardTerm(name="math")], workers=workers, timeout_s=15.0) as pool:
            pool.score_many_sync(items[:workers])  # start-up
            start = time.perf_counter()
            pool.score_many_sync(items)
            out[f"pool{workers}"] = n / (time.perf_counter() - start)
    return out


def bench_code(runs: int) -> dict[str, float]:
    program = "def add(a, b):\n    return a + b\n"
    tests = "assert add(1, 2) == 3\n"
    python, _ = python_command()
    plain = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([*python, "-c", program + tests], check=True)
        plain.append(time.perf_counter() - start)

    async def sandboxed() -> list[float]:
        term = CodeTerm({}, timeout_s=10.0, concurrency=1)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            reward = await term.score(f"```python\n{program}```", {"tests": tests})
            assert reward.value == 1.0, reward.info
            times.append(time.perf_counter() - start)
        return times

    boxed = asyncio.run(sandboxed())
    return {
        "plain_ms": statistics.median(plain) * 1000,
        "sandbox_ms": statistics.median(boxed) * 1000,
        "overhead_ms": (statistics.median(boxed) - statistics.median(plain)) * 1000,
    }


def bench_reasoning_gym(n: int) -> dict[str, float]:
    params = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}
    rows = make_dataset("basic_arithmetic", params, size=n, seed=0)
    items = [(f"Thinking... <answer>{r['answer']}</answer>", r) for r in rows]
    out = {}
    with VerifierPool([RewardTerm(name="reasoning_gym")], workers=2, timeout_s=5.0) as pool:

        async def run() -> None:
            await pool.score_many(items[:16])  # start-up
            start = time.perf_counter()
            await asyncio.gather(*(pool.score_many(items[i : i + 8]) for i in range(0, n, 8)))
            out["groups_of_8"] = n / (time.perf_counter() - start)
            start = time.perf_counter()
            for i in range(0, n, 256):
                await pool.score_many(items[i : i + 256])
            out["batches_of_256"] = n / (time.perf_counter() - start)

        asyncio.run(run())
    return out


def write_section(text: str) -> None:
    doc = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    start = doc.find(SECTION)
    if start < 0:
        doc = doc.rstrip() + "\n\n" + text
    else:
        end = doc.find("\n## ", start + len(SECTION))
        doc = doc[:start] + text + (doc[end + 1 :] if end >= 0 else "")
    DOC.write_text(doc.rstrip() + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=2000, help="math items and reasoning-gym answers")
    parser.add_argument("--runs", type=int, default=30, help="code runs per variant")
    parser.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("math_verify").setLevel(logging.ERROR)

    m = bench_math(args.items)
    c = bench_code(args.runs)
    r = bench_reasoning_gym(args.items)
    cores, threads = os.cpu_count(), os.environ.get("OMP_NUM_THREADS", "unset")
    text = f"""{SECTION}

`scripts/bench_verifiers.py` on {platform.machine()}, {cores} cores (shared), Python {platform.python_version()},
OMP_NUM_THREADS={threads}, {time.strftime("%Y-%m-%d")}. Numbers move with machine load; ratios within one run are the
point.

Math, {args.items} mixed answers (integers, fractions vs decimals, radicals; ~25% wrong):

| verifier | verifications/s | vs raw |
| --- | ---: | ---: |
| raw `math_verify.verify(parse(gold), parse(pred))`, this process | {m["raw"]:.0f} | 1.00x |
| `verifiers.maths.score`, this process | {m["inproc"]:.0f} | {m["inproc"] / m["raw"]:.2f}x |
| `VerifierPool`, 1 worker process | {m["pool1"]:.0f} | {m["pool1"] / m["raw"]:.2f}x |
| `VerifierPool`, 2 worker processes | {m["pool2"]:.0f} | {m["pool2"] / m["raw"]:.2f}x |

Goal >= 0.8x raw: {"met" if m["pool1"] >= 0.8 * m["raw"] else "NOT met"} with one worker. Accuracy on this set:
raw {m["raw_correct"]:.3f}, ours {m["ours_correct"]:.3f} (ours also reads undelimited gold like `\\frac{{a}}{{b}}`).

Sandboxed code execution, one assert-style test, median of {args.runs} runs:

| run | ms/run |
| --- | ---: |
| plain `python -I -S -c` subprocess (no sandbox) | {c["plain_ms"]:.1f} |
| bubblewrap sandbox + harness (`CodeTerm`) | {c["sandbox_ms"]:.1f} |
| overhead | {c["overhead_ms"]:.1f} |

Goal < 50 ms overhead: {"met" if c["overhead_ms"] < 50 else "NOT met"}.

reasoning-gym `basic_arithmetic` through the sandboxed scorer servers (2 servers, batch isolation):
{r["groups_of_8"]:.0f} answers/s in concurrent groups of 8, {r["batches_of_256"]:.0f} answers/s in batches of 256.
"""
    print(text)
    if not args.no_write:
        write_section(text)
        print(f"updated {DOC}")


if __name__ == "__main__":
    main()
