"""Benchmark publishing policy versions: rank 0's memory, the training loop's wait, delta sizes.

Two parts, each on the real code path (DeepSpeedStrategy, PolicyWriter, Publisher):

memory  A random Llama of `--params-m` million parameters under ZeRO-3 (one process). Peak
        extra anonymous RSS (sampled every 2 ms) of publishing a bf16 version, twice (the
        first gather also allocates DeepSpeed's own buffers), each method in a fresh child
        process:
          whole:    the code before sharding: gather the whole state dict, cast it, save_file
          streamed: iter_state_dict -> PolicyWriter, `--shard-mb` shards, gathered a shard at a time
publish SmolLM2-135M-Instruct (the quickstart model, ZeRO-0, one process): the loop's blocking
        time per version, streamed vs background, full vs delta (bf16, keyframe first), and the
        change density and delta size between versions after real AdamW steps at the quickstart's
        lr (5e-6) on a surrogate policy-gradient loss (random tokens, +-1 advantages).

    .venv/bin/python scripts/bench_weights.py memory [--params-m 300] [--shard-mb 64]
    .venv/bin/python scripts/bench_weights.py publish [--steps 3] [--lr 5e-6]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rl.config import ModelConfig, TrainerConfig  # noqa: E402
from rl.trainer.publisher import Publisher  # noqa: E402
from rl.weights.files import TensorSpec  # noqa: E402
from rl.weights.store import PolicyWriter  # noqa: E402


def anon_mb() -> float:
    """Anonymous resident memory (tensors, buffers): file-backed pages (mmapped weights) vary with
    the page cache and are left out."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class PeakSampler:
    """Highest `anon_mb()` seen while the block runs (sampled every 2 ms in a thread)."""

    def __enter__(self) -> PeakSampler:
        self.peak, self._stop = anon_mb(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, anon_mb())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, anon_mb())


def strategy_for(model_dir: Path, stage: int, lr: float = 5e-6):
    from rl.trainer.strategy import DeepSpeedStrategy

    for var, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(var, value)
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    trainer = TrainerConfig(deepspeed=f"configs/deepspeed/zero{max(stage, 2)}.json", zero_stage=stage, lr=lr,
                            micro_batch_size=4, threads=2, grad_clip=1.0)  # fmt: skip
    return DeepSpeedStrategy(ModelConfig(name=str(model_dir), dtype="float32"), trainer)


# --------------------------------------------------------------------------- memory


def build_random_llama(out: Path, params_m: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, vocab = 1024, 32000
    per_layer = 4 * hidden * hidden + 3 * hidden * 2816
    layers = max(1, round((params_m * 1e6 - vocab * hidden) / per_layer))
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2816, num_hidden_layers=layers,
                         num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=True)  # fmt: skip
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    build_tokenizer(out)


def build_tokenizer(out: Path) -> None:
    from rl.models import build_tiny_tokenizer

    build_tiny_tokenizer(out)


def memory_child(model_dir: Path, method: str, shard_mb: float) -> dict:
    from safetensors.torch import save_file

    strategy = strategy_for(model_dir, stage=3)
    params = sum(getattr(p, "ds_numel", p.numel()) for p in strategy.module.parameters())
    out = Path(tempfile.mkdtemp(prefix="bench-weights-"))
    torch.set_num_threads(2)

    peaks, seconds = [], []
    for attempt in range(2):  # the first gather also allocates DeepSpeed's own buffers (once)
        gc.collect()
        before = anon_mb()
        start = time.perf_counter()
        with PeakSampler() as sampler:
            if method == "whole":
                state = strategy.gather_state_dict()
                tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in state.items()}
                save_file(tensors, str(out / "model.safetensors"))
                del state, tensors
            else:
                shard_bytes = int(shard_mb * 2**20)
                layout = [TensorSpec(n, s, torch.bfloat16) for n, s in strategy.weight_layout()]
                writer = PolicyWriter(out, layout, shard_bytes=shard_bytes, fmt="full")
                writer.write(attempt, strategy.iter_state_dict(shard_bytes))
        seconds.append(time.perf_counter() - start)
        peaks.append(sampler.peak - before)
    bf16_mb = params * 2 / 2**20
    return {"method": method, "params_m": params / 1e6, "bf16_mb": bf16_mb, "first_mb": peaks[0],
            "peak_extra_mb": peaks[1], "seconds": seconds[1]}  # fmt: skip


def memory(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-weights-model-") as tmp:
        model_dir = args.model or Path(tmp)
        if args.model is None:
            build_random_llama(model_dir, args.params_m)
        rows = []
        for method in ("whole", "streamed"):
            cmd = [sys.executable, __file__, "memory-child", "--model", str(model_dir), "--method", method,
                   "--shard-mb", str(args.shard_mb)]  # fmt: skip
            res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
            line = next((ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(f"{method} failed:\n{res.stderr[-4000:]}")
            rows.append(json.loads(line[7:]))
    print(f"\nrandom Llama, {rows[0]['params_m']:.0f} M parameters, ZeRO-3 (1 process), "
          f"bf16 version {rows[0]['bf16_mb']:.0f} MB, shard {args.shard_mb:g} MB")  # fmt: skip
    print("| method | peak extra RSS of rank 0, first version (MB) | later versions (MB) | vs bf16 model | seconds |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        ratio = r["peak_extra_mb"] / r["bf16_mb"]
        print(f"| {r['method']} | {r['first_mb']:.0f} | {r['peak_extra_mb']:.0f} | {ratio:.2f}x | {r['seconds']:.1f} |")


# --------------------------------------------------------------------------- publish


def surrogate_step(strategy, vocab: int, seed: int) -> None:
    """One AdamW step on sum(advantage * logp) of random sequences (a policy-gradient-shaped update)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (8, 96), generator=g)
    mask = torch.ones_like(ids)
    advantages = torch.tensor([1.0, -1.0] * 4)
    logp, _ = strategy.token_logprobs(ids, mask)
    strategy.backward(-(logp.sum(-1) * advantages).sum() / mask.sum())
    strategy.step()


def publish(args: argparse.Namespace) -> None:
    from rl.models import prepare_model

    model_dir = prepare_model("smollm2-135m-instruct")
    strategy = strategy_for(model_dir, stage=0, lr=args.lr)
    vocab = strategy.module.config.vocab_size
    layout = [TensorSpec(n, s, torch.bfloat16) for n, s in strategy.weight_layout()]
    rows = []
    for fmt in ("full", "delta"):
        for background in (False, True):
            with tempfile.TemporaryDirectory(prefix="bench-policy-") as tmp:
                writer = PolicyWriter(Path(tmp), layout, shard_bytes=int(args.shard_mb * 2**20), fmt=fmt,
                                      keyframe_every=100)  # fmt: skip
                publisher = Publisher(writer, lambda v: None, torch.bfloat16, background=background)
                for version in range(args.steps + 1):
                    if version:
                        surrogate_step(strategy, vocab, seed=version)
                    start = time.perf_counter()
                    publisher.publish(version, strategy.iter_state_dict())
                    blocking = time.perf_counter() - start
                    publisher.wait()
                    m = publisher.take_metrics()
                    rows.append({**{k.split("/")[1]: v for k, v in m.items()}, "format": fmt,
                                 "background": background, "version": version, "blocking_s": blocking})  # fmt: skip
    print(f"\nSmolLM2-135M-Instruct, bf16 versions, lr {args.lr:g}, shard {args.shard_mb:g} MB")
    print(
        "| format | background | version | loop blocked (s) | publish (s) | full MB | shipped MB | shipped/full "
        "| changed elements |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        changed = f"{100 * r['changed_fraction']:.2f}%" if "changed_fraction" in r else "keyframe"
        print(f"| {r['format']} | {'yes' if r['background'] else 'no'} | {r['version']} | {r['blocking_s']:.2f} "
              f"| {r['publish_s']:.2f} | {r['bytes_full'] / 1e6:.1f} | {r['bytes_shipped'] / 1e6:.2f} "
              f"| {100 * r['bytes_shipped'] / r['bytes_full']:.2f}% | {changed} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["memory", "publish", "memory-child"])
    parser.add_argument("--params-m", type=int, default=300)
    parser.add_argument("--shard-mb", type=float, default=64.0)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--lr", type=float, default=5e-6)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--method", choices=["whole", "streamed"])
    args = parser.parse_args()
    if args.part == "memory":
        memory(args)
    elif args.part == "memory-child":
        print("RESULT " + json.dumps(memory_child(args.model, args.method, args.shard_mb)))
    else:
        publish(args)


if __name__ == "__main__":
    main()
