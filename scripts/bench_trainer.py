"""Benchmark one trainer step (forward + backward + AdamW), this checkout against an earlier commit,
or (`--paths`) this checkout's two provenance paths against each other.

The batch is shaped like the quickstart's: `--prompts` GRPO groups of `--n`
completions, prompts of `--prompt-tokens` tokens, completion lengths drawn
uniformly from 1..`--max-tokens` (random token ids: the cost does not depend on
them). Each side runs the real `DeepSpeedStrategy` of its own code with the
quickstart's trainer settings (default DeepSpeed JSON, no `trainer.zero_stage`,
prompt sharing on, as `rl train` does) in a fresh process: "before" is
`--before` (a git ref, extracted with `git archive`), "after" this working
tree. The sides alternate `--repeats` times; each process times `--steps`
steps after a warm-up step and reports its peak RSS. The first step's loss of
both sides is printed: the same weights and batch must give the same loss.

`--paths`: the whole trainer step as `rl train` runs it (`Trainer.check_and_train`: provenance
checks, advantages, loss, backward, AdamW) with the quickstart's config, with
`trust.shared_forward false` (a no-grad forward for the checks, then the training forward) and
with it on (the checks' statistics from the training forward), alternating step by step in one
process (the cost does not depend on the weights, which move at lr 3e-5); every
group is of the version the trainer holds, with seeds (the draw check runs), and the thresholds are
opened so no sequence is masked (the cost is the same; an honest batch). Each step is broken down
into the checks' own forward, the training forward (with the statistics, when shared), backward and
optimizer step.

`--size tiny|0.5b|1.5b|7b` (`--device cuda`, or `cpu` for a dry run): no comparison, the trainer's
speed on one device with realistic shapes (default 64 prompts x 8 completions, prompts of 256 and
completions of up to 1,024 tokens; 7b: 8 prompts), on a random-weight Qwen2 of that size
(rl/models.py): tokens/s, model FLOPs utilisation against the chip's bf16 dense peak, and the peak
allocated memory against `rl plan`'s estimate for the same config (`--deepspeed`, default
zero2.json = ZeRO-0 on one rank; 7b: zero3_offload.json with gradient checkpointing).

    taskset -c 0,1 .venv/bin/python scripts/bench_trainer.py [--before main | --paths | --size S]
        [--model smollm2-135m-instruct]
        [--dtype float32] [--prompts 4] [--n 8] [--prompt-tokens 150] [--max-tokens 48] [--micro-batch 16]
        [--steps 2] [--repeats 3] [--threads 2] [--write-docs]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_batch(args: argparse.Namespace, vocab: int):
    import torch

    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(args.prompts):
        prompt = torch.randint(0, vocab, (args.prompt_tokens,), generator=g).tolist()
        for _ in range(args.n):
            length = int(torch.randint(1, args.max_tokens + 1, (1,), generator=g))
            rows.append((prompt, torch.randint(0, vocab, (length,), generator=g).tolist()))
    width = max(len(p) + len(c) for p, c in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, (p, c) in enumerate(rows):
        ids[r, : len(p) + len(c)] = torch.tensor(p + c)
        mask[r, : len(p) + len(c)] = 1
    plen = torch.tensor([len(p) for p, _ in rows])
    completion = ((torch.arange(width)[None] >= plen[:, None]) & mask.bool()).float()
    return ids, mask, plen, completion


def make_groups(args: argparse.Namespace, vocab: int, version: int) -> list:
    """The batch of `make_batch` as scored groups of policy `version`, with seeds and logprobs."""
    import torch

    from rl.wire.protocol import ScoredCompletion, ScoredGroup

    ids, mask, plen, _ = make_batch(args, vocab)
    groups = []
    for t in range(args.prompts):
        comps, p = [], int(plen[t * args.n])
        for j in range(t * args.n, (t + 1) * args.n):
            tokens = ids[j, p : int(mask[j].sum())].tolist()
            comps.append(ScoredCompletion(token_ids=tokens, logprobs=[-5.0] * len(tokens), finish_reason="stop",
                                          reward=float(j % 3 == 0), components={}))  # fmt: skip
        groups.append(ScoredGroup(task_id=t, row_index=t, prompt_token_ids=ids[t * args.n, :p].tolist(),
                                  policy_version=version, worker_id="w", worker_name="bench", completions=comps,
                                  seeds=[1000 * t + j for j in range(args.n)]))  # fmt: skip
    del torch
    return groups


def paths_child(args: argparse.Namespace) -> None:
    """Both provenance paths in one process and one trainer, alternating step by step (ABBA order): the
    trainer's whole step, timed by phase."""
    import resource
    import tempfile
    from collections import defaultdict

    import torch

    import rl
    from rl.config import load_config
    from rl.trainer.batch import build_batch
    from rl.trainer.loop import Trainer

    torch.set_num_threads(args.threads)
    overrides = [f"model.name={args.model}", f"model.dtype={args.dtype}", f"sampling.n={args.n}",
                 f"trainer.prompts_per_step={args.prompts}", f"trainer.micro_batch_size={args.micro_batch}",
                 f"sampling.max_tokens={args.max_tokens}", f"trainer.threads={args.threads}",
                 "logging.wandb.mode=disabled",
                 # an honest batch: nothing masked (random tokens would fail the checks; the checks cost the same)
                 "trust.typicality_z=1e9", "trust.max_mean_logprob_diff=1e9", "trust.max_token_logprob_diff=1e9",
                 "trust.draw_tolerance=1.0", "trust.max_outside_fraction=1.0",
                 "trust.mask_special_tokens=false"]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(load_config("quickstart", [*overrides, f"run_dir={tmp}"]), hub=None)
        strategy = trainer.strategy
        phases: dict[str, float] = defaultdict(float)

        def timed(name: str, fn):
            def run(*a, **kw):
                start = time.perf_counter()
                try:
                    return fn(*a, **kw)
                finally:
                    key = name if name != "forward" or torch.is_grad_enabled() else "checks_forward"
                    phases[key] += time.perf_counter() - start

            return run

        strategy.token_logprobs = timed("forward", strategy.token_logprobs)
        strategy.backward = timed("backward", strategy.backward)
        strategy.step = timed("optimizer", strategy.step)
        runs = {side: {"times": [], "cpu": [], "breakdown": [], "masked": 0.0} for side in PATHS}
        sides = list(PATHS)
        order = sides + [side for i in range(args.repeats) for side in (sides if i % 2 else sides[::-1])]
        for i, side in enumerate(order):  # the first step of each path warms up
            trainer.cfg.trust.shared_forward = PATHS[side]
            groups = make_groups(args, strategy.module.config.vocab_size, trainer.step)
            batch = build_batch(groups, trainer.pad_id)
            phases.clear()
            start, start_cpu = time.perf_counter(), time.process_time()
            _, metrics = trainer.check_and_train(batch, groups)
            wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
            trainer.step += 1
            print(f"step {i} {side}: {wall:.2f} s {dict(phases)}", file=sys.stderr, flush=True)
            if i >= len(PATHS):
                run = runs[side]
                run["times"].append(wall)
                run["cpu"].append(cpu)
                run["breakdown"].append(dict(phases))
                run["masked"] += metrics.get("trust/masked_sequences", 0.0)
        print(json.dumps({
            "runs": runs, "zero_stage": strategy.zero_stage,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "completion_tokens": int(batch.completion_mask.sum()), "code": str(Path(rl.__file__).parents[1]),
        }))  # fmt: skip


def child(args: argparse.Namespace) -> None:
    """One side, in its own process: build the strategy its code builds, time the steps, print JSON."""
    import resource

    import torch

    import rl
    from rl.config import ModelConfig, TrainerConfig
    from rl.trainer.strategy import DeepSpeedStrategy

    torch.set_num_threads(args.threads)
    trainer = TrainerConfig(micro_batch_size=args.micro_batch, threads=args.threads, lr=1e-6)
    strategy = DeepSpeedStrategy(ModelConfig(name=args.model, dtype=args.dtype), trainer)
    ids, mask, plen, completion = make_batch(args, strategy.module.config.vocab_size)
    weight = torch.linspace(-1.0, 1.0, ids.shape[0])
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times, cpu, first_loss = [], [], None
    for _ in range(args.steps + 1):
        start, start_cpu = time.perf_counter(), time.process_time()
        loss_sum = 0.0
        for part in torch.arange(ids.shape[0]).split(args.micro_batch):
            logp, _ = strategy.token_logprobs(ids[part], mask[part], prompt_lengths=plen[part], with_entropy=True)
            loss = -((logp * completion[part]).sum(-1) * weight[part]).sum() / completion.sum()
            strategy.backward(loss)
            loss_sum += float(loss.detach())
        strategy.step()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        first_loss = loss_sum if first_loss is None else first_loss
    print(json.dumps({
        "times": times[1:],  # the first step warms up allocators and DeepSpeed buffers
        "cpu": cpu[1:],  # CPU seconds of the process (all threads): less moved by other work than wall time
        "first_loss": first_loss,
        "zero_stage": strategy.zero_stage,
        "rss_after_init_mb": rss_before,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "completion_tokens": int(completion.sum()),
        "code": str(Path(rl.__file__).parents[1]),
    }))  # fmt: skip


def extract(ref: str, into: Path) -> str:
    """The packages of commit `ref` under `into`; returns the commit's short hash."""
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", ref], check=True, capture_output=True,
                         text=True).stdout.strip()  # fmt: skip
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", sha, "rl", "configs", "rollout_workers", "verifiers"],
                             check=True, capture_output=True).stdout  # fmt: skip
    with tempfile.TemporaryFile() as f:
        f.write(archive)
        f.seek(0)
        with tarfile.open(fileobj=f) as tar:
            tar.extractall(into, filter="data")
    return sha


def run_side(code: Path, argv: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": argv[argv.index("--threads") + 1]}
    res = subprocess.run([sys.executable, __file__, "--child", *argv], env=env, capture_output=True, text=True,
                         cwd=code)  # fmt: skip
    if res.returncode != 0:
        raise SystemExit(f"bench child under {code} failed:\n{res.stderr[-3000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    if Path(out["code"]).resolve() != code.resolve():
        raise SystemExit(f"the child imported rl from {out['code']}, not {code}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", default="main", help="git ref of the 'before' code")
    ap.add_argument("--paths", action="store_true", help="compare this tree's two provenance paths instead")
    ap.add_argument("--size", choices=["tiny", "0.5b", "1.5b", "7b"], help="one device's speed (see above) instead")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="with --size")
    ap.add_argument("--deepspeed", help="with --size: the DeepSpeed JSON (default: by size)")
    ap.add_argument("--peak-tflops", type=float, help="with --size: the chip's bf16 dense peak, if not in the table")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=150)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--micro-batch", type=int, default=16, help="The quickstart's trainer.micro_batch_size.")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write-docs", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--shared", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        paths_child(args) if args.paths else child(args)
        return
    if args.paths:
        compare_paths(args)
        return
    if args.size:
        given = {a.split("=")[0] for a in sys.argv[1:] if a.startswith("--")}
        shape = SIZE_SHAPES.get(args.size, (64, 8, 256, 1024, 8))
        for name, value in zip(("prompts", "n", "prompt_tokens", "max_tokens", "micro_batch"), shape, strict=True):
            if f"--{name.replace('_', '-')}" not in given:
                setattr(args, name, value)
        size_bench(args)
        return
    argv = [a for a in sys.argv[1:] if a != "--write-docs"]
    if "--threads" not in argv:
        argv += ["--threads", str(args.threads)]
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        sha = extract(args.before, Path(tmp))
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], check=True,
                              capture_output=True, text=True).stdout.strip()  # fmt: skip
        runs: dict[str, list[dict]] = {"before": [], "after": []}
        for i in range(args.repeats):
            for side, code in (("before", Path(tmp)), ("after", ROOT)):
                out = run_side(code, argv)
                runs[side].append(out)
                wall, cpu = (", ".join(f"{t:.2f}" for t in out[k]) for k in ("times", "cpu"))
                print(f"repeat {i + 1} {side:6}: ZeRO-{out['zero_stage']} steps {wall} s (CPU {cpu} s), peak RSS "
                      f"{out['peak_rss_mb']:.0f} MB, first loss {out['first_loss']:.6f}", flush=True)  # fmt: skip

    def summary(side: str) -> tuple[float, float, float, float, int, float, float, float]:
        times = [t for r in runs[side] for t in r["times"]]
        cpu = [t for r in runs[side] for t in r["cpu"]]
        peaks = [r["peak_rss_mb"] for r in runs[side]]
        return (statistics.median(times), min(times), max(times), statistics.median(peaks), runs[side][0]["zero_stage"],
                statistics.median(cpu), min(cpu), max(cpu))  # fmt: skip

    tokens = runs["after"][0]["completion_tokens"]
    b, a = summary("before"), summary("after")
    affinity = sorted(os.sched_getaffinity(0))
    lines = [
        f"Model `{args.model}` ({args.dtype}); {args.prompts} groups x {args.n} completions, prompts of "
        f"{args.prompt_tokens} tokens, completions 1-{args.max_tokens} tokens ({tokens} completion tokens), "
        f"micro-batch {args.micro_batch}, {args.threads} threads on CPUs {affinity}; each side the quickstart's "
        f"trainer settings in its own code (default DeepSpeed JSON, prompt sharing on). Before: `{sha}`; after: "
        f"`{head}` (plus uncommitted changes, if any). {args.repeats} interleaved repeats of a fresh process x "
        f"{args.steps} steps after a warm-up; median [min-max] of all steps, median of the processes' peak RSS.",
        "",
        "| code | ZeRO | step (s) | step CPU time (s) | completion tokens/s | peak RSS (MB) |",
        "|---|---|---|---|---|---|",
        f"| before | {b[4]} | {b[0]:.2f} [{b[1]:.2f}-{b[2]:.2f}] | {b[5]:.2f} [{b[6]:.2f}-{b[7]:.2f}] | "
        f"{tokens / b[0]:.0f} | {b[3]:.0f} |",
        f"| after | {a[4]} | {a[0]:.2f} [{a[1]:.2f}-{a[2]:.2f}] | {a[5]:.2f} [{a[6]:.2f}-{a[7]:.2f}] | "
        f"{tokens / a[0]:.0f} | {a[3]:.0f} |",
        "",
        f"After vs before: {b[0] / a[0]:.2f}x faster per step ({b[5] / a[5]:.2f}x less CPU time), "
        f"peak RSS {a[3] - b[3]:+.0f} MB. First-step loss: "
        f"before {runs['before'][0]['first_loss']:.6f}, after {runs['after'][0]['first_loss']:.6f}.",
        "",
        f"1-minute load average of the machine ({os.cpu_count()} CPUs): {load_before:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after (the benchmark itself keeps {args.threads} threads busy); above that, other "
        "work shared the CPUs, which the interleaving spreads over both sides and the spread shows.",
    ]
    body = "\n".join(lines)
    print("\n" + body)
    if args.write_docs:
        sys.path.insert(0, str(ROOT / "scripts"))
        from bench_docs import replace_section

        replace_section("Trainer step", "scripts/bench_trainer.py", body)


PATHS = {"two forwards": False, "shared forward": True}
"""`--paths`: each side's `trust.shared_forward`."""


def compare_paths(args: argparse.Namespace) -> None:
    """`--paths`: two forwards vs the shared forward, alternating steps of one trainer of this tree."""
    argv = [a for a in sys.argv[1:] if a != "--write-docs"]
    if "--threads" not in argv:
        argv += ["--threads", str(args.threads)]
    load_before = os.getloadavg()[0]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads)}
    res = subprocess.run([sys.executable, __file__, "--child", *argv], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                         text=True)  # fmt: skip
    if res.returncode != 0:
        raise SystemExit("bench child failed (its stderr is above)")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    runs = out["runs"]

    def med(side: str, key: str) -> tuple[float, float, float]:
        return statistics.median(runs[side][key]), min(runs[side][key]), max(runs[side][key])

    def phase(side: str, name: str) -> float:
        return statistics.median([b.get(name, 0.0) for b in runs[side]["breakdown"]])

    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], check=True, capture_output=True,
                          text=True).stdout.strip()  # fmt: skip
    lines = [
        f"Model `{args.model}` ({args.dtype}), the quickstart's trainer config (ZeRO-{out['zero_stage']}, dapo); "
        f"{args.prompts} groups x {args.n} completions, prompts of {args.prompt_tokens} tokens, completions "
        f"1-{args.max_tokens} tokens ({out['completion_tokens']} completion tokens), micro-batch {args.micro_batch}, "
        f"{args.threads} thread(s) on CPUs {sorted(os.sched_getaffinity(0))}; code `{head}`. One process, one "
        f"trainer, the two paths alternating step by step (ABBA), {args.repeats} steps each after one warm-up step "
        "each; median [min-max] of the steps; phases: medians, seconds.",
        "",
        "| path | step (s) | step CPU time (s) | checks' forward | training forward | backward | optimizer |",
        "|---|---|---|---|---|---|---|",
    ]
    for side in PATHS:
        (m, lo, hi), (c, clo, chi) = med(side, "times"), med(side, "cpu")
        lines.append(f"| {side} | {m:.2f} [{lo:.2f}-{hi:.2f}] | {c:.2f} [{clo:.2f}-{chi:.2f}] | "
                     f"{phase(side, 'checks_forward'):.2f} | {phase(side, 'forward'):.2f} | "
                     f"{phase(side, 'backward'):.2f} | {phase(side, 'optimizer'):.2f} |")  # fmt: skip
    two, one = med("two forwards", "times")[0], med("shared forward", "times")[0]
    cpu_ratio = med("shared forward", "cpu")[0] / med("two forwards", "cpu")[0]
    pairs = zip(runs["shared forward"]["times"], runs["two forwards"]["times"], strict=True)
    lines += [
        "",
        f"Shared / two forwards: {one / two:.2f}x the step time ({(one / two - 1) * 100:+.0f}%; the i-th steps' "
        f"ratios {', '.join(f'{a / b:.2f}x' for a, b in pairs)}); CPU time {cpu_ratio:.2f}x. Sequences masked: "
        f"{sum(r['masked'] for r in runs.values()):.0f} (an honest batch). Peak RSS {out['peak_rss_mb']:.0f} MB. "
        f"1-minute load average ({os.cpu_count()} CPUs): {load_before:.1f} before, {os.getloadavg()[0]:.1f} after.",
    ]  # fmt: skip
    body = "\n".join(lines)
    print("\n" + body)
    if args.write_docs:
        sys.path.insert(0, str(ROOT / "scripts"))
        from bench_docs import replace_section

        replace_section("Trainer step: provenance from the training forward", "scripts/bench_trainer.py --paths", body)


PEAK_BF16_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "A10G": 70.0}
"""Dense bf16 tensor-core peaks (datasheets, no sparsity), matched against the device name in this order."""
SIZE_SHAPES = {"tiny": (2, 4, 16, 16, 8), "7b": (8, 8, 256, 1024, 8)}
"""--size: its (prompts, n, prompt tokens, max tokens, micro-batch) unless given; others: (64, 8, 256, 1024, 8)."""


def step_flops(config, ids, mask, plen, n: int) -> float:
    """Model FLOPs of one training step (forward + backward, 3x the forward's matmuls), as the packed
    forward runs it: each group's prompt once, the lm_head on the completion tokens only, causal
    attention over each token's context; activation recomputation is not counted (MFU's convention)."""
    h, layers, inter = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    per_token = 2 * layers * (h * h * 2 + 2 * h * kv + 3 * h * inter)  # q, o; k, v; gate, up, down
    lengths, prompts = mask.sum(-1).tolist(), plen.tolist()
    groups = range(0, len(lengths), n)
    completions = [length - p for length, p in zip(lengths, prompts, strict=True)]
    tokens = sum(prompts[g] for g in groups) + sum(completions)
    contexts = sum(sum(range(1, prompts[g] + 1)) for g in groups)  # each token attends to itself and before
    contexts += sum(sum(range(p + 1, length + 1)) for length, p in zip(lengths, prompts, strict=True))
    forward = per_token * tokens + 2 * h * config.vocab_size * sum(completions) + 4 * layers * h * contexts
    return 3.0 * forward


def size_bench(args: argparse.Namespace) -> None:
    """`--size`: one device, realistic shapes, a random Qwen2: tokens/s, MFU, peak memory vs `rl plan`."""
    if args.device == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"
    import torch

    from rl.config import load_config
    from rl.models import prepare_model
    from rl.plan.estimate import make_plan
    from rl.plan.inputs import Hardware
    from rl.trainer.strategy import DeepSpeedStrategy

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA GPU (--device cpu --size tiny is a dry run)")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model_dir = prepare_model(f"random-qwen2-{args.size}")
    ready = time.perf_counter() - start
    big = args.size == "7b"
    deepspeed = args.deepspeed or ("configs/deepspeed/zero3_offload.json" if big else "configs/deepspeed/zero2.json")
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    cfg = load_config(None, [f"model.name={model_dir}", f"model.dtype={dtype}", f"sampling.n={args.n}",
                             f"sampling.max_tokens={args.max_tokens}", f"data.max_prompt_tokens={args.prompt_tokens}",
                             f"model.max_model_len={args.prompt_tokens + args.max_tokens}",
                             f"trainer.prompts_per_step={args.prompts}", f"trainer.micro_batch_size={args.micro_batch}",
                             f"trainer.deepspeed={deepspeed}", f"trainer.gradient_checkpointing={big}",
                             f"trainer.threads={args.threads}", "trainer.lr=1e-6"])  # fmt: skip
    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    total_gib = torch.cuda.get_device_properties(0).total_memory / 2**30 if args.device == "cuda" else 80.0
    plan = make_plan(cfg, Hardware(gpus=1, gpu_mem_gib=total_gib, trainer_gpus=1, gpus_per_node=1))
    strategy = DeepSpeedStrategy(cfg.model, cfg.trainer)
    config = strategy.module.config
    ids, mask, plen, completion = make_batch(args, config.vocab_size)
    flops = step_flops(config, ids, mask, plen, args.n)
    weight = torch.linspace(-1.0, 1.0, ids.shape[0])
    times = []
    for _ in range(args.steps + 1):
        if args.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for part in torch.arange(ids.shape[0]).split(args.micro_batch):
            logp, _ = strategy.token_logprobs(ids[part], mask[part], prompt_lengths=plen[part])
            c = completion[part].to(logp.device)
            strategy.backward(-((logp * c).sum(-1) * weight[part].to(logp.device)).sum() / completion.sum())
        strategy.step()
        if args.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    step = statistics.median(times[1:])
    tokens = int(mask.sum())
    peak_name = next((k for k in PEAK_BF16_TFLOPS if k in device_name), None)
    peak = args.peak_tflops or (PEAK_BF16_TFLOPS[peak_name] if peak_name and args.device == "cuda" else None)
    achieved = flops / step / 1e12
    mfu = f"{achieved / peak:.1%} of {peak:.0f} TFLOP/s" if peak else "n/a (unknown peak: --peak-tflops)"
    estimate = plan.trainer.gpu_total / 2**30
    params = sum(p.numel() for p in strategy.module.parameters()) / 1e9
    print(
        f"device: {device_name}; model random-qwen2-{args.size} ({params:.2f}B"
        f" parameters on this rank, ready in {ready:.0f} s), {dtype}, ZeRO-{strategy.zero_stage}"
        f"{', gradient checkpointing' if big else ''}, {deepspeed}"
    )
    print(
        f"batch: {args.prompts} prompts x {args.n} completions, prompts {args.prompt_tokens} tokens, completions "
        f"1-{args.max_tokens} ({tokens:,} tokens, {int(completion.sum()):,} completion), micro-batch {args.micro_batch}"
    )
    print(f"step: {step:.2f} s (median of {args.steps} after a warm-up; {', '.join(f'{t:.2f}' for t in times)})")
    print(
        f"trainer: {tokens / step:,.0f} tokens/s (prompt + completion per sequence, as perf/trainer_tokens_per_s), "
        f"{int(completion.sum()) / step:,.0f} "
        f"completion tokens/s; {achieved:.1f} model TFLOP/s, MFU {mfu}"
    )
    if args.device == "cuda":
        used = torch.cuda.max_memory_allocated() / 2**30
        print(
            f"peak allocated: {used:.1f} GiB; rl plan's estimate {estimate:.1f} GiB (ratio {used / estimate:.2f}; "
            f"the GPU has {total_gib:.0f} GiB)"
        )
    else:
        print(f"rl plan's estimate for one GPU: {estimate:.1f} GiB (not measured on a CPU)")


if __name__ == "__main__":
    main()
