"""Benchmark a rollout worker's generation throughput against bare `vllm.LLM.generate` on the same prompts.

A real hub (loopback) serves P prompts; one `rl rollout --engine vllm` process leases
them `--per-lease` at a time, generates n completions each and submits them. The
baseline is a plain `vllm.LLM` with the same settings (dtype, max_model_len, eager
on CPU, seed, `logprobs=0`) in a fresh process, before and after the worker run,
generating the same prompts `--per-lease` at a time back to back (the worker's
batches: what the worker's overhead is measured against), then all in one call
(an upper bound). Tokens/s is counted over a steady window, from the end of the
first batch to the end of the last, so engine start-up and the first batch's
warm-up are left out on both sides. The hub scores with the cheap `format` term
so scoring hardly competes for CPU.

Models: `20m`, a random ~20M-parameter Qwen2 where generation dominates (as with
any real model), and `tiny`, the test model, where a lease takes ~0.3 s on CPU and
the per-lease cost shows: two HTTP calls, building the submission, and the hub's
own CPU use when it shares the machine.

    .venv/bin/python scripts/bench_worker.py [--model 20m tiny DIR...] [--prompts 32] [--n 8]
        [--max-tokens 64] [--per-lease 4] [--write-docs]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from helpers.hub import ADMIN, publish_initial_policy, start_hub, start_worker, stop_process, write_config  # noqa: E402

MAX_MODEL_LEN = 256


def build_20m_model(out: Path) -> None:
    """A random ~20M-parameter Qwen2 (tiny tokenizer): big enough that generation dominates."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rl.models import build_tiny_tokenizer

    tok = build_tiny_tokenizer(out)
    config = Qwen2Config(
        vocab_size=len(tok), hidden_size=512, intermediate_size=2048, num_hidden_layers=5,
        num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=2048,
        tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        bos_token_id=None, torch_dtype="float32",
    )  # fmt: skip
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out, safe_serialization=True)
    print(f"built a {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M-parameter Qwen2", flush=True)


def prepare_model(spec: str, out: Path) -> Path:
    if spec == "tiny":
        from rl.models import build_tiny_model

        build_tiny_model(out)
        return out
    if spec == "20m":
        build_20m_model(out)
        return out
    return Path(spec)


def write_run_config(model: Path, run_dir: Path, args) -> Path:
    return write_config(
        run_dir, model,
        model={"max_model_len": MAX_MODEL_LEN},
        data={"source": {"type": "reasoning_gym", "dataset": "basic_arithmetic", "size": args.prompts}},
        sampling={"n": args.n, "max_tokens": args.max_tokens},
        hub={"buffer_size": args.prompts, "max_body_mb": 32, "heartbeat_interval_s": 5.0},
        rewards={"terms": [{"name": "format"}], "workers": 1},
        **{"async": {"max_staleness": 100_000}},
    )  # fmt: skip


def run_worker(model: Path, run_dir: Path, config: Path, args) -> dict:
    """Hub + one worker process; tokens/s from the hub's counters between first and last submission."""
    publish_initial_policy(run_dir, model)
    hub = start_hub(config, run_dir / "hub.log")
    extra = ["--max-prompts", str(args.prompts), "--prompts-per-lease", str(args.per_lease)]
    worker = start_worker(hub.url, run_dir / "worker.log", run_dir / "cache", name="bench", extra=extra)
    first = last = None  # (time, tokens) at the first and the last change of the submission count
    try:
        with httpx.Client(base_url=hub.url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30) as c:
            seen = 0
            while worker.poll() is None:
                st = c.get("/v1/status").json()
                now = time.perf_counter()
                if st["submissions"] != seen:
                    seen = st["submissions"]
                    first = first or (now, st["tokens_generated"], seen)
                    last = (now, st["tokens_generated"], seen)
                time.sleep(0.05)
            st = c.get("/v1/status").json()
            if st["submissions"] != seen:  # the last one landed after the final poll
                last = (time.perf_counter(), st["tokens_generated"], st["submissions"])
    finally:
        code = stop_process(worker)
        hub.stop()
    if code != 0 or first is None or last[2] == first[2]:
        raise SystemExit(f"worker failed (exit {code}):\n{(run_dir / 'worker.log').read_text()[-3000:]}")
    return {"tokens": last[1] - first[1], "seconds": last[0] - first[0]}


def run_baseline(model: Path, config: Path, args) -> dict:
    """Bare vLLM on the hub's prompts in a fresh process (as clean as the worker's), parsed from its JSON line."""
    cmd = [sys.executable, __file__, "--baseline-of", str(config), "--model", str(model), "--n", str(args.n),
           "--max-tokens", str(args.max_tokens), "--per-lease", str(args.per_lease)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"baseline failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def baseline(model: Path, config: Path, args) -> dict:
    """Bare vLLM on the hub's prompts: per-lease batches back to back, then all prompts in one call."""
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = os.environ.get("VLLM_CPU_KVCACHE_SPACE") or "1"
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # as the worker's engine does on CPU
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.platforms import current_platform

    from rl.config import load_config
    from rl.data import PromptSet, load_rows

    cfg = load_config(config, [])
    prompts = PromptSet.build(load_rows(cfg.data)[0], cfg.data, AutoTokenizer.from_pretrained(model)).prompt_ids
    llm = LLM(model=str(model), dtype=cfg.model.dtype, max_model_len=MAX_MODEL_LEN, seed=0,
              enforce_eager=current_platform.is_cpu())  # fmt: skip
    params = SamplingParams(n=args.n, temperature=1.0, max_tokens=args.max_tokens, logprobs=0)

    def generate(batch: list[list[int]]) -> int:
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in batch], params, use_tqdm=False)
        return sum(len(c.token_ids) for o in outs for c in o.outputs)

    batches = [prompts[i : i + args.per_lease] for i in range(0, len(prompts), args.per_lease)]
    generate(batches[0])  # warm-up, like the worker's first lease: outside the window
    start, tokens = time.perf_counter(), 0
    for batch in batches[1:]:
        tokens += generate(batch)
    per_lease = {"tokens": tokens, "seconds": time.perf_counter() - start}
    start = time.perf_counter()
    tokens = generate(prompts)
    return {"per_lease": per_lease, "one_call": {"tokens": tokens, "seconds": time.perf_counter() - start}}


def rate(r: dict) -> float:
    return r["tokens"] / r["seconds"]


def measure(spec: str, tmp: Path, args) -> dict:
    """Bare vLLM, the worker, bare vLLM again: one model's row."""
    model = prepare_model(spec, tmp / "model")
    config = write_run_config(model, tmp / "run", args)
    before = run_baseline(model, config, args)
    print(f"{spec}: bare vLLM {before}", flush=True)
    worker = run_worker(model, tmp / "run", config, args)
    print(f"{spec}: worker {worker}", flush=True)
    after = run_baseline(model, config, args)
    print(f"{spec}: bare vLLM {after}", flush=True)
    return {"model": spec, "worker": worker, "baselines": [before, after]}


def table(args, rows: list[dict]) -> str:
    lines = [
        f"{args.prompts} prompts x n={args.n}, max_tokens={args.max_tokens}, {args.per_lease} prompts per lease "
        f"(and per bare call), fp32, temperature 1, `logprobs=0` on both sides, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}, hub on the same machine (loopback). "
        "Bare vLLM ran before and after the worker, each time in a fresh process; the ratio uses their mean. "
        "Single runs: on a small shared machine expect a few percent of noise between runs.",
        "",
        f"| model | bare, {args.per_lease} prompts per call: tokens/s (before / after) | worker tokens/s "
        "| worker vs bare | bare, all prompts in one call, vs bare |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        per_lease = [rate(b["per_lease"]) for b in row["baselines"]]
        one_call = [rate(b["one_call"]) for b in row["baselines"]]
        bare = sum(per_lease) / len(per_lease)
        lines.append(
            f"| `{row['model']}` | {per_lease[0]:.0f} / {per_lease[-1]:.0f} | {rate(row['worker']):.0f} | "
            f"{rate(row['worker']) / bare:.2f}x | {sum(one_call) / len(one_call) / bare:.2f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="+", default=["20m", "tiny"],
                    help="20m (random ~20M Qwen2), tiny (the test model), or HF model directories.")  # fmt: skip
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--per-lease", type=int, default=4, help="Prompts per lease (= per bare generate call).")
    ap.add_argument("--write-docs", action="store_true", help="Replace the worker section of docs/benchmarks.md.")
    ap.add_argument("--baseline-of", type=Path, help=argparse.SUPPRESS)  # internal: run the bare side only
    args = ap.parse_args()
    if args.baseline_of:
        print(json.dumps(baseline(Path(args.model[0]), args.baseline_of, args)))
        return
    rows = []
    for spec in args.model:
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(measure(spec, Path(tmp), args))
    text = table(args, rows)
    print(text)
    if args.write_docs:
        from bench_docs import replace_section

        replace_section("Rollout worker", "scripts/bench_worker.py", text)


if __name__ == "__main__":
    main()
