"""Benchmark our trainer against TRL 1.16 `GRPOTrainer` on the same model, task and batch shape.

Three runs from one invocation, each in its own process with the same CPU thread budget:

- TRL `GRPOTrainer` (CPU, `use_vllm=False`: generation with HF `generate`, then training);
- `rl train` with `async.max_staleness 0` (on-policy: vLLM worker and trainer take turns);
- `rl train` with `async.max_staleness 1` (the worker generates the next batch while the trainer trains).

What is equal: the model and its training dtype (the quickstart's `model.dtype`; for bfloat16
TRL gets bf16 autocast over fp32 weights, as DeepSpeed's bf16 keeps fp32 master weights; our
workers generate in `rollout.dtype`, TRL generates with the training model), the quickstart's task
(reasoning-gym `basic_arithmetic`, its system prompt and worked example, rewards
`reasoning_gym` + 0.1 `format`), the prompts in the same order (the hub's seeded order, fed to
TRL unshuffled), group size, prompts per step, completion length, temperature 1, the loss and
its clipping, AdamW betas, constant lr, grad clip, no KL, no gradient checkpointing. The
config is resolved once and frozen into a file that all three runs read. TRL scores with the same extraction and
reasoning-gym scorer, in-process (this task's scorer is a plain string comparison).

Throughput is steady state: trained samples (and their completion tokens) per second between
the end of the first and the end of the last step, so start-up (vLLM, DeepSpeed, model loads)
is excluded; the wall time including start-up is listed too. Reward is the mean training reward
of the first step, of the last quarter of the steps, and of all steps.

    .venv/bin/python scripts/bench_vs_trl.py [--model tiny-test] [--steps 8] [--prompts-per-step 2]
        [--max-tokens 64] [--threads 2] [--dtype float32|bfloat16] [--write-docs]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUICKSTART = ROOT / "configs" / "quickstart.yaml"


@dataclass
class Result:
    name: str
    step_end_s: list[float]
    """Seconds since the run started at which each step finished."""
    wall_s: float
    rewards: list[float]
    accuracy_term: list[float]
    """Mean `reasoning_gym` reward component per step."""
    tokens: list[float]
    """Completion tokens trained per step."""
    samples_per_step: int
    cpu_pressure: float = math.nan
    """Share of the run's wall time in which some task waited for a CPU (Linux PSI), all processes."""


def run_overrides(args: argparse.Namespace) -> list[str]:
    """The quickstart, shrunk to the benchmark's shape."""
    n = 8
    dtype = [f"model.dtype={args.dtype}"] if args.dtype else []
    return [
        *dtype,
        f"model.name={args.model}",
        f"sampling.max_tokens={args.max_tokens}",
        f"trainer.max_steps={args.steps}",
        f"trainer.prompts_per_step={args.prompts_per_step}",
        f"trainer.micro_batch_size={args.prompts_per_step * n}",
        f"trainer.threads={args.threads}",
        f"sampling.n={n}",
        "rollout.local_workers=1",
        f"rollout.threads={args.threads}",
        f"rollout.prompts_per_lease={args.prompts_per_step}",
        "eval.num_prompts=0",
        "data.eval_size=0",
        "checkpoint.every=0",
        "logging.wandb.mode=disabled",
        "hub.port=0",
    ]


def freeze_config(args: argparse.Namespace, path: Path):
    """Resolve the benchmark's config once into `path`: every run reads that file, so an edit of the
    quickstart while the benchmark runs cannot make the runs differ."""
    from rl.config import dump_config, load_config

    cfg = load_config(QUICKSTART, run_overrides(args))
    path.write_text(dump_config(cfg))
    return cfg


def cpu_stall_us() -> float:
    """Microseconds some runnable task has waited for a CPU since boot (PSI); NaN where unavailable."""
    try:
        first = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except (OSError, IndexError):
        return math.nan
    return float(first.rpartition("total=")[2])


def measured(run, *args) -> Result:
    """Run one benchmark and note the machine's CPU pressure meanwhile (others' work shows up here)."""
    stall, start = cpu_stall_us(), time.perf_counter()
    result = run(*args)
    result.cpu_pressure = (cpu_stall_us() - stall) / 1e6 / (time.perf_counter() - start)
    return result


# --------------------------------------------------------------------------- TRL


def ordered_rows(cfg, tokenizer, count: int) -> list[dict]:
    """The first `count` training rows in the order the hub hands them out (same filtering too)."""
    from rl.data import PromptOrder, PromptSet, load_rows

    train, _ = load_rows(cfg.data)
    prompts = PromptSet.build(train, cfg.data, tokenizer)
    order = PromptOrder(len(prompts), cfg.data.seed)
    return [prompts.rows[order.index_of(seq)] for seq in range(count)]


def run_trl(config_path: Path, threads: int, out: Path) -> None:
    """Child process: one TRL GRPOTrainer run on the frozen config, results as JSON in `out`."""
    import torch
    from datasets import Dataset
    from reasoning_gym.factory import DATASETS
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rl.config import load_config
    from rl.data import build_messages
    from rl.models import resolve_model
    from verifiers.extract import extract_answer
    from verifiers.formatting import score_format

    torch.set_num_threads(threads)
    start = time.perf_counter()
    cfg = load_config(config_path)
    if cfg.model.dtype == "float16":
        raise SystemExit("TRL on CPU: float16 is not supported; use float32 or bfloat16")
    terms = {t.name: t for t in cfg.rewards.terms}
    model_dir = resolve_model(cfg.model.name)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    rows = ordered_rows(cfg, tokenizer, 2 * cfg.trainer.max_steps * cfg.trainer.prompts_per_step)
    dataset = Dataset.from_list([{"prompt": build_messages(r, cfg.data), "row": i} for i, r in enumerate(rows)])
    dataset_cls, config_cls = DATASETS[cfg.data.source.dataset]
    score_answer = dataset_cls(config=config_cls(**terms["reasoning_gym"].params.get("config", {}))).score_answer
    extract = terms["reasoning_gym"].params.get("extract", "answer_tag_or_last_number")
    format_params = terms["format"].params

    def text_of(completion) -> str:
        return completion[-1]["content"] if isinstance(completion, list) else completion

    def reasoning_gym(prompts, completions, row, **_) -> list[float]:
        scores = []
        for completion, i in zip(completions, row, strict=True):
            answer = extract_answer(text_of(completion), extract)
            scores.append(0.0 if answer is None else min(1.0, max(0.0, float(score_answer(answer, rows[i])))))
        return scores

    def format_reward(prompts, completions, **_) -> list[float]:
        return [score_format(text_of(c), {}, **format_params).value for c in completions]

    format_reward.__name__ = "format"  # TRL logs each reward under its function's name

    step_end: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *_, **__):
            step_end.append(time.perf_counter() - start)

    n, algo, tcfg = cfg.sampling.n, cfg.algorithm, cfg.trainer
    config = GRPOConfig(
        output_dir=str(out.parent / "trl"),
        use_cpu=True,
        use_vllm=False,
        bf16=cfg.model.dtype == "bfloat16",  # autocast over fp32 weights, as DeepSpeed's bf16 keeps fp32 masters
        gradient_checkpointing=tcfg.gradient_checkpointing,
        max_steps=tcfg.max_steps,
        per_device_train_batch_size=tcfg.prompts_per_step * n,
        gradient_accumulation_steps=1,
        num_generations=n,
        max_completion_length=cfg.sampling.max_tokens,
        temperature=cfg.sampling.temperature,
        top_p=cfg.sampling.top_p,
        top_k=0,
        learning_rate=tcfg.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        adam_beta1=tcfg.betas[0],
        adam_beta2=tcfg.betas[1],
        weight_decay=tcfg.weight_decay,
        max_grad_norm=tcfg.grad_clip,
        loss_type=algo.loss,
        epsilon=algo.epsilon_low,
        epsilon_high=algo.epsilon_high,
        scale_rewards=algo.scale_rewards,
        beta=algo.beta,
        num_iterations=algo.num_iterations,
        reward_weights=[terms["reasoning_gym"].weight, terms["format"].weight],
        shuffle_dataset=False,
        seed=tcfg.seed,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[reasoning_gym, format_reward],
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[Clock()],
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "reward" in entry]
    samples = tcfg.prompts_per_step * n
    result = Result(
        name="TRL GRPOTrainer (HF generate)",
        step_end_s=step_end,
        wall_s=time.perf_counter() - start,
        rewards=[e["reward"] for e in logs],
        accuracy_term=[e["rewards/reasoning_gym/mean"] for e in logs],
        tokens=[e["completions/mean_length"] * samples for e in logs],
        samples_per_step=samples,
    )
    out.write_text(json.dumps(asdict(result)))


def trl_in_child(args: argparse.Namespace, tmp: Path) -> Result:
    out = tmp / "trl.json"
    cmd = [sys.executable, __file__, "--trl-child", str(out), "--config", str(tmp / "bench.yaml"),
           "--threads", str(args.threads)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    log = tmp / "trl.log"
    with open(log, "w") as f:
        code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if code != 0:
        sys.exit(f"TRL run failed ({code}); last lines of {log}:\n{tail(log)}")
    return Result(**json.loads(out.read_text()))


# --------------------------------------------------------------------------- ours


def run_ours(args: argparse.Namespace, tmp: Path, staleness: int) -> Result:
    """`rl train` as a user runs it; the end of each step is when its line lands in metrics.jsonl."""
    run_dir = tmp / f"rl-staleness-{staleness}"
    metrics = run_dir / "metrics.jsonl"
    cmd = [sys.executable, "-m", "rl.cli", "train", str(tmp / "bench.yaml"), "--run-dir", str(run_dir),
           f"async.max_staleness={staleness}"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    seen: dict[int, float] = {}
    done = threading.Event()
    start = time.perf_counter()

    def watch() -> None:
        while not done.is_set():
            if metrics.is_file():
                for line in metrics.read_text().splitlines():
                    if line.strip():
                        seen.setdefault(json.loads(line)["step"], time.perf_counter() - start)
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    log = tmp / f"rl-staleness-{staleness}.log"
    with open(log, "w") as f:
        code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - start
    done.set()
    watcher.join()
    if code != 0:
        sys.exit(f"rl train failed ({code}); last lines of {log}:\n{tail(log)}")
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "reward/mean" in r]
    return Result(
        name=f"`rl train`, max_staleness {staleness} (vLLM worker)",
        step_end_s=[seen[r["step"]] for r in steps],
        wall_s=wall,
        rewards=[r["reward/mean"] for r in steps],
        accuracy_term=[r.get("reward/reasoning_gym", math.nan) for r in steps],
        tokens=[r["response_length/mean"] * r["sequences"] for r in steps],
        samples_per_step=int(steps[0]["sequences"]),
    )


# --------------------------------------------------------------------------- report


def tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def summarize(r: Result) -> dict:
    steps = len(r.step_end_s)
    seconds = r.step_end_s[-1] - r.step_end_s[0]
    last = max(1, steps // 4)
    return {
        "name": r.name,
        "samples_per_s": (steps - 1) * r.samples_per_step / seconds,
        "tokens_per_s": sum(r.tokens[1:]) / seconds,
        "step_s": seconds / (steps - 1),
        "wall_s": r.wall_s,
        "reward_first": r.rewards[0],
        "reward_end": sum(r.rewards[-last:]) / last,
        "rg_end": sum(r.accuracy_term[-last:]) / last,
        "reward_mean": sum(r.rewards) / steps,
        "rg_mean": sum(r.accuracy_term) / steps,
        "cpu_pressure": r.cpu_pressure,
    }


def report(results: list[Result], args: argparse.Namespace, cfg, load: tuple[float, float]) -> str:
    rows = [summarize(r) for r in results]
    base = rows[0]["samples_per_s"]
    last = max(1, args.steps // 4)
    per_step = args.prompts_per_step * 8
    lines = [
        f"Model `{args.model}`: trained in {cfg.model.dtype} by both (TRL: bf16 autocast over fp32 weights when "
        f"bfloat16); generated in {cfg.rollout.dtype or cfg.model.dtype} by our vLLM worker (`rollout.dtype`) and in "
        f"the training dtype by TRL's HF generate. "
        f"reasoning-gym `{cfg.data.source.dataset}` with the quickstart's prompt and rewards "
        f"(`reasoning_gym` + 0.1 `format`), group size 8, {args.prompts_per_step} prompts per step, "
        f"{args.max_tokens}-token completions, {args.steps} steps, lr {cfg.trainer.lr:g}, {args.threads} CPU "
        "threads per process "
        f"(ours: the trainer and one vLLM worker each get them). Throughput is steady state, between the "
        f"end of step 1 and the end of step {args.steps}; wall includes start-up. Reward: mean training reward, "
        "`reasoning_gym` component in brackets; over all steps it is the steadiest estimate (the policy barely "
        "moves in so few steps at the quickstart's lr).",
        "",
        "| trainer | samples/s | completion tokens/s | s/step | vs TRL | wall (s) | reward, step 1 | "
        f"reward, last {last} steps | reward, all steps |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['samples_per_s']:.2f} | {r['tokens_per_s']:.0f} | {r['step_s']:.1f} | "
            f"{r['samples_per_s'] / base:.2f}x | {r['wall_s']:.0f} | {r['reward_first']:.3f} | "
            f"{r['reward_end']:.3f} ({r['rg_end']:.3f}) | {r['reward_mean']:.3f} ({r['rg_mean']:.3f}) |"
        )
    best = max(rows[1:], key=lambda r: r["samples_per_s"])
    speedup = best["samples_per_s"] / base
    verdict = "met" if speedup >= 3.0 and best["reward_mean"] >= rows[0]["reward_mean"] - 0.05 else "not met"
    overlap = rows[2]["samples_per_s"] < rows[1]["samples_per_s"]
    lines += [
        "",
        f"Goal >= 3x TRL's samples/s at equal or better reward (all-steps mean within 0.05): {verdict} "
        f"({speedup:.2f}x, {best['name']}).",
        "",
        f"Machine load average (1 min) {load[0]:.2f} before and {load[1]:.2f} after the runs; CPU pressure (share "
        "of the time some task waited for a core, ours included) "
        + ", ".join(f"{r['cpu_pressure']:.0%}" for r in rows)
        + " during the three runs. The machine is shared, so absolute numbers move with other work; rewards "
        f"differ by sampling noise (a reward's std is ~0.35: +-{0.35 / math.sqrt(per_step):.2f} for one step of "
        f"{per_step} samples, +-{0.35 / math.sqrt(per_step * args.steps):.2f} over all steps), not by learning.",
    ]
    if overlap:
        lines += [
            "",
            "max_staleness 1 lets the local worker generate while the trainer trains; with "
            f"{args.threads} threads each on {os.cpu_count()} cores the two then compete for the same cores, "
            "which is slower than taking turns. Asynchrony pays off when workers have their own hardware.",
        ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="Model alias or directory (tiny-test: quick).")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--prompts-per-step", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads of each process (TRL; our trainer, worker).")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], help="Override the quickstart's model.dtype.")
    ap.add_argument("--write-docs", action="store_true", help="Write the section into docs/benchmarks.md.")
    ap.add_argument("--trl-child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.steps < 2:
        ap.error("--steps must be at least 2 (throughput is measured between the first and the last step)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.trl_child is not None:
        run_trl(args.config, args.threads, args.trl_child)
        return
    from rl.models import resolve_model

    resolve_model(args.model)  # prepare an alias once, outside the timed runs
    load_before = os.getloadavg()[0]
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-vs-trl-") as tmp:
        tmp = Path(tmp)
        cfg = freeze_config(args, tmp / "bench.yaml")
        for run, extra in ((trl_in_child, ()), (run_ours, (0,)), (run_ours, (1,))):
            results.append(measured(run, args, tmp, *extra))
            s = summarize(results[-1])
            speed = f"{s['samples_per_s']:.2f} samples/s, {s['tokens_per_s']:.0f} tokens/s"
            print(f"{s['name']}: {speed}, reward {s['reward_first']:.3f} -> {s['reward_end']:.3f}", flush=True)
    table = report(results, args, cfg, (load_before, os.getloadavg()[0]))
    print(table)
    if args.write_docs:
        from bench_docs import replace_section  # scripts/ is on sys.path when run as a script

        replace_section("Trainer vs TRL", "scripts/bench_vs_trl.py", table)


if __name__ == "__main__":
    main()
