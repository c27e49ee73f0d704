"""Benchmark one trainer step (forward + backward + AdamW), this checkout against an earlier commit.

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

    taskset -c 0,1 .venv/bin/python scripts/bench_trainer.py [--before main] [--model smollm2-135m-instruct]
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
    args = ap.parse_args()
    if args.child:
        child(args)
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


if __name__ == "__main__":
    main()
