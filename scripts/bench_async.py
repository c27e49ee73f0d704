"""P2: synchronous (`async.max_staleness 0`) vs asynchronous `rl train`, trainer and workers on disjoint cores.

Both modes run the same frozen config (the quickstart, shrunk: one local vLLM worker, no
evaluation, no checkpoints), differing only in `async.max_staleness`. The trainer is pinned to
one CPU set (`trainer.cpus`), the hub with its verifier processes and the worker to another of
the same size (`hub.cpus`, `rollout.cpus`); each side gets `--threads` threads. So in sync mode
one side idles while the other works, and async mode may overlap them: nothing else differs.

Runs alternate (sync, async, then async, sync, ...) for `--repeats` rounds, so slow drift in the
machine's load hits both modes alike. Throughput is steady state: trained samples per second
between the end of step 1 and the end of the last step (start-up excluded), timed by when each
step's record lands in `metrics.jsonl`. Reported: median and min-max over the repeats, and the
async/sync ratio of the medians and of each round.

The per-phase breakdown comes from each run's own `metrics.jsonl` (docs/benchmarks.md says what
each key measures): per mode, the median over steps 2..N and then over the repeats.

    .venv/bin/python scripts/bench_async.py [--model smollm2-135m-instruct] [--steps 5] [--repeats 3]
        [--trainer-cpus 0] [--rollout-cpus 1] [--threads 1] [--async-staleness 1] [--write-docs]

Needs a quiet machine: other processes are not pinned away from the benchmark's cores (the CPU
pressure during each run is reported so a disturbed run shows).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_vs_trl import cpu_stall_us, run_train_watched  # noqa: E402 (scripts/ is on sys.path when run as a script)

QUICKSTART = ROOT / "configs" / "quickstart.yaml"

PHASES = [
    ("generate", "perf/generate_s"),
    ("score", "perf/score_s"),
    ("wait", "perf/wait_s"),
    ("provenance", "perf/provenance_s"),
    ("train", "perf/train_s"),
    ("publish (loop blocked)", "weights/publish_blocking_s"),
    ("publish (total, background)", "weights/publish_s"),
    ("fetch", "weights/fetch_s"),
    ("load", "weights/load_s"),
    ("step", "perf/step_s"),
]
"""(row name, metrics.jsonl key) of the per-phase table, in the order a step goes through them."""


@dataclass
class Run:
    mode: str
    staleness: int
    step_end_s: list[float]
    """Seconds since the run started at which each step's record appeared."""
    samples_per_step: int
    records: list[dict] = field(default_factory=list)
    cpu_pressure: float = float("nan")

    @property
    def samples_per_s(self) -> float:
        steps = len(self.step_end_s)
        return (steps - 1) * self.samples_per_step / (self.step_end_s[-1] - self.step_end_s[0])

    def phase(self, key: str) -> float | None:
        """Median of `key` over steps 2..N (None when no step has it)."""
        values = [r[key] for r in self.records[1:] if r.get(key) is not None]
        return statistics.median(values) if values else None


def overrides(args: argparse.Namespace) -> list[str]:
    """The quickstart, shrunk to one worker and pinned; `async.max_staleness` is set per run."""
    return [
        f"model.name={args.model}",
        f"trainer.max_steps={args.steps}",
        f"trainer.threads={args.threads}",
        f"trainer.cpus=[{args.trainer_cpus}]",
        f"rollout.threads={args.threads}",
        f"rollout.cpus=[{args.rollout_cpus}]",
        f"hub.cpus=[{args.rollout_cpus}]",
        "rollout.local_workers=1",
        "eval.num_prompts=0",
        "data.eval_size=0",
        "checkpoint.every=0",
        "logging.wandb.mode=disabled",
        "hub.port=0",
    ] + ([f"trainer.prompts_per_step={args.prompts_per_step}"] if args.prompts_per_step else [])


def freeze_config(args: argparse.Namespace, path: Path):
    """Resolve the config once into `path`; every run reads that file."""
    from rl.config import dump_config, load_config

    cfg = load_config(QUICKSTART, overrides(args))
    if len(cfg.trainer.cpus) != len(cfg.rollout.cpus) or set(cfg.trainer.cpus) & set(cfg.rollout.cpus):
        sys.exit(f"--trainer-cpus {cfg.trainer.cpus} and --rollout-cpus {cfg.rollout.cpus}: "
                 "need disjoint sets of the same size")  # fmt: skip
    path.write_text(dump_config(cfg))
    return cfg


def run_once(tmp: Path, name: str, staleness: int, threads: int) -> Run:
    """One `rl train` as a user runs it; a step ends when its record lands in metrics.jsonl."""
    run_dir = tmp / name
    metrics = run_dir / "metrics.jsonl"
    cmd = [sys.executable, "-m", "rl.cli", "train", str(tmp / "bench.yaml"), "--run-dir", str(run_dir),
           f"async.max_staleness={staleness}"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    stall = cpu_stall_us()
    wall, seen = run_train_watched(cmd, env, tmp / f"{name}.log", metrics)
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    steps = [r for r in records if "reward/mean" in r]
    return Run(
        mode="sync" if staleness == 0 else "async",
        staleness=staleness,
        step_end_s=[seen[r["step"]] for r in steps],
        samples_per_step=int(steps[0]["sequences"]),
        records=steps,
        cpu_pressure=(cpu_stall_us() - stall) / 1e6 / wall,
    )


def spread(values: list[float], fmt: str = "{:.3f}") -> str:
    """`median (min-max)`."""
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def report(runs: list[Run], args: argparse.Namespace, cfg, load: tuple[float, float]) -> str:
    sync = [r for r in runs if r.mode == "sync"]
    asyn = [r for r in runs if r.mode == "async"]
    ratio = statistics.median(r.samples_per_s for r in asyn) / statistics.median(r.samples_per_s for r in sync)
    rounds = [a.samples_per_s / s.samples_per_s for s, a in zip(sync, asyn, strict=True)]
    lines = [
        f"Model `{args.model}` (trainer {cfg.model.dtype}, worker {cfg.rollout.dtype or cfg.model.dtype}), the "
        f"quickstart's task and rewards, {cfg.trainer.prompts_per_step} prompts x {cfg.sampling.n} completions "
        f"per step, up to {cfg.sampling.max_tokens} tokens, {cfg.rollout.prompts_per_lease} prompts per lease, "
        f"one local vLLM worker, {args.steps} steps, no evaluation or checkpoints. Trainer on CPUs "
        f"{cfg.trainer.cpus}; hub, verifier processes and worker on CPUs {cfg.rollout.cpus}; {args.threads} "
        f"thread(s) each. {args.repeats} interleaved rounds (sync/async alternating first). Samples/s: steady "
        f"state, end of step 1 to end of step {args.steps}; median (min-max) over the rounds.",
        "",
        "| mode | samples/s | s/step | CPU pressure |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, group in (("sync (`max_staleness 0`)", sync), (f"async (`max_staleness {args.async_staleness}`)", asyn)):
        per_step = [r.samples_per_step / r.samples_per_s for r in group]
        pressure = ", ".join(f"{r.cpu_pressure:.0%}" for r in group)
        lines.append(f"| {name} | {spread([r.samples_per_s for r in group])} | {spread(per_step, '{:.1f}')} | "
                     f"{pressure} |")  # fmt: skip
    verdict = "met" if ratio >= 1.5 else "not met"
    lines += [
        "",
        f"async / sync: **{ratio:.2f}x** (ratio of medians); per round {', '.join(f'{x:.2f}x' for x in rounds)}. "
        f"Goal >= 1.5x: {verdict}.",
        "",
        "Per-phase timing of a step (seconds; median over steps 2-N of each run, then median (min-max) over "
        "the rounds; from each run's `metrics.jsonl`):",
        "",
        "| phase | key | sync | async |",
        "| --- | --- | ---: | ---: |",
    ]
    for name, key in PHASES:
        cells = []
        for group in (sync, asyn):
            values = [v for r in group if (v := r.phase(key)) is not None]
            cells.append(spread(values, "{:.2f}") if values else "-")
        lines.append(f"| {name} | `{key}` | {cells[0]} | {cells[1]} |")
    lines += [
        "",
        f"Machine load average (1 min) {load[0]:.2f} before and {load[1]:.2f} after; CPU pressure: share of "
        "each run's wall time in which some task on the machine waited for a core (Linux PSI).",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="Model alias or directory (tiny-test: quick).")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3, help="Interleaved rounds of (sync, async).")
    ap.add_argument(
        "--prompts-per-step", type=int, default=None, help="trainer.prompts_per_step (default: the quickstart's)."
    )
    ap.add_argument("--trainer-cpus", default="0", help="CPU ids of the trainer, comma-separated.")
    ap.add_argument("--rollout-cpus", default="1", help="CPU ids of the hub and the worker, comma-separated.")
    ap.add_argument("--threads", type=int, default=1, help="Threads of the trainer and of the worker.")
    ap.add_argument("--async-staleness", type=int, default=1, help="async.max_staleness of the async runs.")
    ap.add_argument("--write-docs", action="store_true", help="Write the section into docs/benchmarks.md.")
    args = ap.parse_args()
    if args.steps < 2:
        ap.error("--steps must be at least 2 (throughput is measured between the first and the last step)")
    if args.async_staleness < 1:
        ap.error("--async-staleness must be at least 1 (0 is the sync mode)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from rl.models import resolve_model

    resolve_model(args.model)  # prepare an alias once, outside the timed runs
    load_before = os.getloadavg()[0]
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="bench-async-") as tmp:
        tmp = Path(tmp)
        cfg = freeze_config(args, tmp / "bench.yaml")
        for i in range(args.repeats):
            order = [0, args.async_staleness] if i % 2 == 0 else [args.async_staleness, 0]
            for staleness in order:
                run = run_once(tmp, f"round{i}-staleness{staleness}", staleness, args.threads)
                runs.append(run)
                print(f"round {i + 1}/{args.repeats} {run.mode}: {run.samples_per_s:.3f} samples/s "
                      f"(CPU pressure {run.cpu_pressure:.0%})", flush=True)  # fmt: skip
    runs.sort(key=lambda r: r.mode != "sync")  # stable: rounds stay in order within a mode
    table = report(runs, args, cfg, (load_before, os.getloadavg()[0]))
    print(table)
    if args.write_docs:
        from bench_docs import replace_section  # scripts/ is on sys.path when run as a script

        replace_section("Sync vs async on disjoint cores (P2)", "scripts/bench_async.py", table)


if __name__ == "__main__":
    main()
