"""The measuring half of scripts/gpu_check.sh: a few real `rl train` steps of a random Qwen2 on one GPU.

Builds `random-qwen2-<size>` (random weights in the shapes of Qwen2.5-0.5B/1.5B, rl/models.py)
into the model cache, writes a run config (arithmetic prompts from a JSONL file, a length reward
so that random completions get different rewards, the HF engine as the local worker, bf16,
DeepSpeed ZeRO-2 on NCCL), runs `python -m rl.cli train` for `--steps` steps and then resumes it
from its checkpoint for one more, while sampling the GPU's memory with nvidia-smi. Prints step
time, trainer tokens/s, the trainer's peak allocated GPU memory against an estimate, and PASS or
FAIL per check; exits 0 only when every check passed.

`--cpu` runs the same on the CPU (gloo, the `tiny` shape): a dry run of the script itself.
Run it through scripts/gpu_check.sh, which installs what the image lacks and sets PYTHONPATH.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
REDUCE_BUCKET = 5e8
"""DeepSpeed's default `reduce_bucket_size` (elements): ZeRO-1/2's gradient bucket, in the training dtype."""


def write_data(path: Path, rows: int = 512) -> None:
    """Arithmetic questions with answers; the check's reward looks only at length, so any prompts do."""
    with open(path, "w") as f:
        for i in range(rows):
            a, b = i % 97, (i * 7) % 89
            f.write(json.dumps({"prompt": f"What is {a} + {b}? Think, then answer.", "answer": str(a + b)}) + "\n")


def run_config(work: Path, model: str, args: argparse.Namespace) -> dict:
    # Completions of a random model are random tokens (`<w123>` strings): a length penalty that ramps
    # over the whole range up to the longest possible text gives every completion its own reward.
    longest = args.max_tokens * len(f"<w{151935}>")
    return {
        "run_name": "gpu-check",
        "run_dir": str(work / "run"),
        "model": {"name": model, "dtype": "bfloat16", "max_model_len": 256 + args.max_tokens},
        "data": {"source": {"type": "jsonl", "path": str(work / "data.jsonl")}, "eval_size": 0,
                 "max_prompt_tokens": 256},
        "sampling": {"n": args.n, "max_tokens": args.max_tokens},
        "rollout": {"engine": "hf", "local_workers": 1, "prompts_per_lease": args.prompts_per_step},
        "rewards": {"workers": 2, "terms": [{"name": "length", "params": {"unit": "chars", "max_length": longest,
                                                                          "buffer": longest}}]},
        "trainer": {"max_steps": args.steps, "prompts_per_step": args.prompts_per_step,
                    "micro_batch_size": args.micro_batch_size, "lr": 1e-5, "threads": 4,
                    "deepspeed": "configs/deepspeed/zero2.json"},
        "hub": {"port": 0},
        "checkpoint": {"every": 0, "keep": 1},
        "eval": {"every": 0, "num_prompts": 0},
        "logging": {"wandb": {"mode": "disabled"}},
    }  # fmt: skip


def estimate_gib(config: dict, params: int, micro_batch: int, seq_len: int) -> dict[str, float]:
    """Rough peak GPU memory of one ZeRO-2 bf16 trainer rank (no offload, no activation checkpointing).

    - model states, 16 bytes/param: bf16 weights (2), bf16 gradient partition (2), fp32 master
      weights (4), Adam moments (8);
    - the larger of two transients: during backward, DeepSpeed's gradient bucket
      (`reduce_bucket_size` bf16 elements), the activations kept for backward (per token and layer
      ~2 bytes x (6 hidden + 4 intermediate + 2 kv): norms, q/k/v/o inputs, MLP gate/up/act/product;
      SDPA keeps no T x T scores) and the logits (bf16 logits, their per-row fp32 log-softmax and
      its gradient: ~10 bytes per token and vocabulary entry); or at the optimizer step, the fp32
      copy of the gradients (4 bytes/param).
    Uncalibrated until measured on a GPU: the check prints the ratio rather than trusting it.
    """
    h, inter = config["hidden_size"], config["intermediate_size"]
    kv = config["num_key_value_heads"] * (h // config["num_attention_heads"])
    tokens = micro_batch * seq_len
    backward = {
        "gradient bucket": 2 * REDUCE_BUCKET,
        "activations": tokens * config["num_hidden_layers"] * 2 * (6 * h + 4 * inter + 2 * kv),
        "logits": tokens * config["vocab_size"] * 10,
    }
    parts = {"model states": 16 * params}
    if sum(backward.values()) >= 4 * params:
        parts |= backward
    else:
        parts["fp32 gradients at the step"] = 4 * params
    return {k: v / GIB for k, v in parts.items()}


class GpuSampler:
    """Highest `memory.used` nvidia-smi reports for GPU 0 (all processes: trainer, worker, contexts)."""

    def __init__(self, period_s: float = 1.0):
        self.peak_mib = 0
        self.total_mib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period_s,), daemon=True)
        self._thread.start()

    def _run(self, period_s: float) -> None:
        cmd = ["nvidia-smi", "--id=0", "--query-gpu=memory.used,memory.total", "--format=csv,noheader,nounits"]
        while not self._stop.wait(period_s):
            try:
                used, total = (int(x) for x in subprocess.check_output(cmd, text=True).split(","))
            except (OSError, subprocess.CalledProcessError, ValueError):
                return
            self.peak_mib, self.total_mib = max(self.peak_mib, used), total

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def train(config_path: Path, log: Path, *extra: str, timeout: float) -> tuple[int, float]:
    cmd = [sys.executable, "-m", "rl.cli", "train", str(config_path), *extra]
    start = time.perf_counter()
    with open(log, "ab") as out:
        try:
            code = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = 124
    return code, time.perf_counter() - start


def tail(path: Path, lines: int = 25) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else "(no log)"


def changed_fraction(before: Path, after: Path) -> float:
    """Fraction of weight elements that differ between two safetensors files (same keys)."""
    from safetensors import safe_open

    changed = total = 0
    with safe_open(before, "pt") as a, safe_open(after, "pt") as b:
        for key in a.keys():  # noqa: SIM118 - safe_open is not a dict
            x, y = a.get_tensor(key), b.get_tensor(key)
            changed += int((x != y).sum())
            total += x.numel()
    return changed / max(total, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="0.5b", choices=["tiny", "0.5b", "1.5b"])
    parser.add_argument("--steps", type=int, default=4, help="steps of the first run (then one more on resume)")
    parser.add_argument("--n", type=int, default=8, help="completions per prompt")
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--work", type=Path, default=ROOT / ".gpu-check")
    parser.add_argument("--cpu", action="store_true", help="dry run on the CPU (gloo)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per rl train run")
    args = parser.parse_args()

    import torch

    from rl.models import QWEN2_SHAPES, prepare_model

    if not args.cpu and not torch.cuda.is_available():
        print("FAIL: no CUDA GPU visible to torch (use --cpu for a dry run)")
        return 1
    work = args.work.resolve()
    shutil.rmtree(work / "run", ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.cpu else torch.cuda.get_device_name(0)
    print(f"device: {device}; torch {torch.__version__}, CUDA {torch.version.cuda}; python {sys.version.split()[0]}")

    alias = f"random-qwen2-{args.size}"
    start = time.perf_counter()
    model_dir = prepare_model(alias)
    model_config = json.loads((model_dir / "config.json").read_text())
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):  # shapes only: tied embeddings counted once
        params = sum(
            p.numel() for p in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir)).parameters()
        )
    assert model_config["hidden_size"] == QWEN2_SHAPES[args.size]["hidden_size"]
    print(f"model: {alias}, {params / 1e9:.3f}B parameters, ready in {time.perf_counter() - start:.0f} s ({model_dir})")

    write_data(work / "data.jsonl")
    config = run_config(work, str(model_dir), args)
    config_path = work / "gpu-check.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    run_dir = Path(config["run_dir"])
    log = work / "train.log"
    log.unlink(missing_ok=True)

    sampler = None if args.cpu else GpuSampler()
    code, seconds = train(config_path, log, timeout=args.timeout)
    resume_code, resume_seconds = (None, 0.0)
    if code == 0:
        resume_code, resume_seconds = train(config_path, log, "--resume", f"trainer.max_steps={args.steps + 1}",
                                            timeout=args.timeout)  # fmt: skip
    if sampler is not None:
        sampler.stop()

    metrics_path = run_dir / "metrics.jsonl"
    metrics = (
        [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()] if metrics_path.is_file() else []
    )
    by_step = {m["step"]: m for m in metrics}
    checks: list[tuple[str, bool, str]] = []
    checks.append(("rl train exits 0", code == 0, f"code {code}, {seconds:.0f} s"))
    checks.append(("every step logged", sorted(by_step)[: args.steps] == list(range(1, args.steps + 1)),
                   f"steps {sorted(by_step)}"))  # fmt: skip
    norms = [by_step[s]["grad_norm"] for s in sorted(by_step)]
    finite = bool(norms) and all(n is not None and math.isfinite(n) and n > 0 for n in norms)
    checks.append(("gradient norms finite and > 0", finite, ", ".join(f"{n:.3g}" for n in norms if n is not None)))
    published = run_dir / "policy" / f"v{args.steps}" / "model.safetensors"
    if published.is_file():
        frac = changed_fraction(model_dir / "model.safetensors", published)
        checks.append(("published weights moved", frac > 0, f"{frac:.2%} of bf16 elements changed by v{args.steps}"))
    else:
        checks.append(("published weights moved", False, f"{published} missing"))
    checks.append(("--resume trains one more step", resume_code == 0 and args.steps + 1 in by_step,
                   f"code {resume_code}, {resume_seconds:.0f} s"))  # fmt: skip

    print()
    steady = [by_step[s] for s in sorted(by_step) if s > 1] or list(by_step.values())
    if steady:
        med = lambda key: statistics.median(m.get(key, math.nan) for m in steady)  # noqa: E731
        print(f"step time (median of steps 2+): {med('perf/step_s'):.2f} s, of which waiting for rollouts "
              f"{med('perf/wait_s'):.2f} s")  # fmt: skip
        print(f"trainer: {med('perf/trainer_tokens_per_s'):,.0f} tokens/s (forward+backward+step over prompt and "
              f"completion tokens); worker (HF engine): {med('perf/worker_tokens_per_s'):,.0f} tokens/s")  # fmt: skip
    if not args.cpu:
        seq_len = 32 + args.max_tokens  # ~30 prompt tokens with the tiny tokenizer
        est = estimate_gib(model_config, params, args.micro_batch_size, seq_len)
        total = sum(est.values())
        parts = ", ".join(f"{k} {v:.1f}" for k, v in est.items())
        print(f"estimate of the trainer's peak: {total:.1f} GiB ({parts})")
        peaks = [m["perf/gpu_memory_peak_gib"] for m in metrics if "perf/gpu_memory_peak_gib" in m]
        if peaks:
            peak = max(peaks)
            print(f"trainer peak allocated: {peak:.1f} GiB = {peak / total:.2f} x the estimate")
            checks.append(("trainer peak memory under 2x the estimate", peak < 2 * total, f"{peak:.1f} GiB"))
        else:
            checks.append(("trainer reported its peak GPU memory", False, "no perf/gpu_memory_peak_gib"))
        if sampler is not None and sampler.total_mib:
            print(f"GPU memory used, all processes (nvidia-smi peak): {sampler.peak_mib / 1024:.1f} of "
                  f"{sampler.total_mib / 1024:.1f} GiB")  # fmt: skip

    print()
    for name, ok, detail in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {name}  ({detail})")
    failed = not all(ok for _, ok, _ in checks)
    if failed:
        print(f"\nlast lines of {log}:\n{tail(log)}")
        for child in sorted((run_dir / "logs").glob("*.log")):
            print(f"\nlast lines of {child}:\n{tail(child, 15)}")
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
