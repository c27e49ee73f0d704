"""Benchmark a rollout worker's generation throughput against bare `vllm.LLM.generate` given all prompts at once.

The prompts and sampling are a run config's (default: the quickstart: SmolLM2-135M-Instruct,
bf16 workers, its reasoning-gym data with system prompt and few-shot, n=8, max_tokens=48,
temperature 1.0), cut to `--prompts` prompts.

- Worker: a real hub (loopback) serves the prompts; one `rl rollout --engine vllm` process
  leases them (`rollout.prompts_per_lease` at a time, continuous batching), generates and
  submits. Timed from the hub's side: from the first task leased to the last submission
  accepted (polled every 25 ms), so engine start-up is outside and submitting is inside.
- Bare: a fresh process with a plain `vllm.LLM` built like the worker's engine (dtype,
  max_model_len, eager on CPU, engine seed 0, same KV cache) and the same `SamplingParams`
  (n, temperature, top_p, top_k, max_tokens, `logprobs=0`), timing one `LLM.generate` of all
  the prompts, right after start-up like the worker's first lease.

Both sides run pinned with `taskset -c CORES` (the hub too), with the same thread settings
(`OMP_NUM_THREADS=--threads`, `OMP_WAIT_POLICY=PASSIVE` as `rl` sets it), fresh processes each
time; `--repeats` rounds interleave them (alternating which goes first). Reported: tokens/s and
samples/s of each side (median, min-max) and the worker/bare ratio of each round (median,
min-max). The hub scores with the cheap `format` term so scoring hardly competes for the CPU.

    .venv/bin/python scripts/bench_worker.py [--model smollm2-135m-instruct|tiny|20m|DIR]
        [--config configs/quickstart.yaml] [--prompts 32] [--repeats 3] [--cores 0,1] [--threads 2]
        [--write-docs]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from helpers.hub import ADMIN, WORKER, publish_initial_policy, start_hub, stop_process, write_yaml_config  # noqa: E402

POLL_S = 0.025
"""Status polls of the hub during a worker run: the start and end of the window are each found to within this.
Each poll costs the shared cores a little (hub and poller): charged to the worker's side."""


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


def prepare_model(spec: str, out: Path) -> Path:
    if spec == "tiny":
        from rl.models import build_tiny_model

        build_tiny_model(out)
        return out
    if spec == "20m":
        build_20m_model(out)
        return out
    from rl.models import resolve_model

    return Path(resolve_model(spec))


def write_run_config(model: Path, run_dir: Path, args) -> Path:
    """The benchmark's config: `--config` with its data cut to `--prompts`, cheap scoring and no staleness limit."""
    base = yaml.safe_load(args.config.read_text())
    data = base.get("data", {})
    data["source"]["size"] = args.prompts
    data["eval_size"] = 0
    base.update(run_name="bench-worker", run_dir=str(run_dir), data=data)
    base.pop("eval", None)
    return write_yaml_config(
        run_dir / "config.yaml", base,
        {"model": {"name": str(model)},
         "hub": {"buffer_size": args.prompts, "max_body_mb": 32, "heartbeat_interval_s": 5.0},
         "rewards": {"terms": [{"name": "format"}], "workers": 1},
         "async": {"max_staleness": 100_000},
         "logging": {"wandb": {"mode": "disabled"}}},
    )  # fmt: skip


def env_for(args) -> dict:
    """One environment for both sides: same threads, same vLLM-CPU settings. OMP_WAIT_POLICY=PASSIVE is what
    `rl` sets for itself (rl/cli/main.py); without it the bare side's idle OpenMP threads spin, a different setup."""
    return {**os.environ, "OMP_NUM_THREADS": str(args.threads), "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1",
            "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "PYTHONPATH": str(ROOT)}  # fmt: skip


def pinned(args) -> list[str]:
    return ["taskset", "-c", args.cores]


def run_worker(model: Path, run_dir: Path, config: Path, args) -> dict:
    """Hub + one worker process; the window is first task leased -> last submission accepted, from the hub."""
    from rl.config import load_config

    cfg = load_config(config, [])
    publish_initial_policy(run_dir, model)
    hub = start_hub(config, run_dir / "hub.log", prefix=pinned(args))
    cmd = [*pinned(args), sys.executable, "-m", "rl.cli", "rollout", "--hub", hub.url, "--token", WORKER,
           "--engine", "vllm", "--name", "bench", "--cache-dir", str(run_dir / "cache"),
           "--max-prompts", str(args.prompts), "--prompts-per-lease", str(cfg.rollout.prompts_per_lease)]  # fmt: skip
    with open(run_dir / "worker.log", "ab") as log:
        worker = subprocess.Popen(cmd, env=env_for(args), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    start = end = None
    try:
        with httpx.Client(base_url=hub.url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30) as c:
            while worker.poll() is None or end is None:
                st = c.get("/v1/status").json()
                now = time.perf_counter()
                accepted = st["scoring"] + st["buffered"] + st["consumed"]
                if start is None and st["leased"] + accepted > 0:
                    start = now
                if accepted >= args.prompts:
                    end, tokens = now, st["tokens_generated"]
                    break
                if worker.poll() is not None:
                    break
                time.sleep(POLL_S)
    finally:
        code = stop_process(worker)
        hub.stop()
    if code != 0 or start is None or end is None:
        raise SystemExit(f"worker failed (exit {code}):\n{(run_dir / 'worker.log').read_text()[-3000:]}")
    return {"tokens": tokens, "samples": args.prompts * cfg.sampling.n, "seconds": end - start}


def run_baseline(model: Path, config: Path, args, env: dict[str, str] | None = None) -> dict:
    """Bare vLLM in a fresh pinned process (as clean as the worker's), parsed from its last JSON line; `env`
    is added to the environment."""
    cmd = [*pinned(args), sys.executable, __file__, "--baseline-of", str(config), "--model", str(model)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**env_for(args), **(env or {})})
    if out.returncode != 0:
        raise SystemExit(f"baseline failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def baseline(model: Path, config: Path) -> dict:
    """Bare vLLM: the hub's prompts and sampling, all prompts in one `LLM.generate` call."""
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.platforms import current_platform

    from rl.config import load_config
    from rl.hub.data import PromptSet, load_rows

    cfg = load_config(config, [])
    prompts = PromptSet.build(load_rows(cfg.data)[0], cfg.data, AutoTokenizer.from_pretrained(model)).prompt_ids
    dtype = cfg.rollout.dtype or cfg.model.dtype  # what the hub tells its workers
    llm = LLM(model=str(model), dtype=dtype, max_model_len=cfg.model.max_model_len, seed=0,
              enforce_eager=current_platform.is_cpu())  # fmt: skip
    s = cfg.sampling
    params = SamplingParams(n=s.n, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, max_tokens=s.max_tokens,
                            stop=list(s.stop) or None, logprobs=0)  # fmt: skip
    start = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    return {"tokens": tokens, "samples": sum(len(o.outputs) for o in outs), "seconds": seconds}


def rate(r: dict, what: str = "tokens") -> float:
    return r[what] / r["seconds"]


def spread(values: list[float], fmt: str) -> str:
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def interleave(repeats: int, names: list[str], run) -> tuple[list[dict], dict[str, list[float]]]:
    """`repeats` rounds of `run(name)` for every name, alternating which goes first, each round printed as a
    JSON line; (the rounds, tokens/s of each name per round). `run` returns a dict with tokens and seconds."""
    rounds = []
    for r in range(repeats):
        order = names if r % 2 == 0 else names[::-1]
        rounds.append({n: run(n) for n in order})
        print(json.dumps({"round": r + 1, **rounds[-1]}), flush=True)
    return rounds, {n: [x[n]["tokens"] / x[n]["seconds"] for x in rounds] for n in names}


def ratio_table(rate: dict[str, list[float]], column: str, over: str, under: str, label: str) -> str:
    """Markdown: tokens/s of each name (median, min-max) and the per-round ratio of `over` to `under`."""
    ratio = [a / b for a, b in zip(rate[over], rate[under], strict=True)]
    rows = [f"| {name} | {spread(values, '.1f')} |" for name, values in rate.items()]
    return "\n".join([f"| {column} | tokens/s |", "| --- | ---: |", *rows,
                      f"| **{label}** (per round) | **{spread(ratio, '.2f')}** |"])  # fmt: skip


def table(args, model: str, cfg, rounds: list[dict]) -> str:
    tokens_s = {side: spread([rate(r[side]) for r in rounds], ".0f") for side in ("bare", "worker")}
    samples_s = {side: spread([rate(r[side], "samples") for r in rounds], ".1f") for side in ("bare", "worker")}
    ratios = [rate(r["worker"]) / rate(r["bare"]) for r in rounds]
    sample_ratios = [rate(r["worker"], "samples") / rate(r["bare"], "samples") for r in rounds]
    lines = [
        f"`{model}`, {args.prompts} prompts of `{args.config.name}` ({cfg.data.source.dataset}, its system prompt and "
        f"few-shot) x n={cfg.sampling.n}, max_tokens={cfg.sampling.max_tokens}, temperature "
        f"{cfg.sampling.temperature}, {cfg.rollout.dtype or cfg.model.dtype}, `logprobs=0` on both sides; the worker "
        f"leases {cfg.rollout.prompts_per_lease} prompts at a time (continuous batching), bare vLLM gets all "
        f"{args.prompts} prompts in one `LLM.generate`. Both pinned with `taskset -c {args.cores}` (the hub too), "
        f"OMP_NUM_THREADS={args.threads} and OMP_WAIT_POLICY=PASSIVE, fresh processes, {len(rounds)} interleaved "
        "rounds; median (min-max). "
        "Worker window: first task leased to last submission accepted (hub side); bare: the generate call.",
        "",
        "| | tokens/s | samples/s |",
        "| --- | ---: | ---: |",
        f"| bare `LLM.generate`, all prompts | {tokens_s['bare']} | {samples_s['bare']} |",
        f"| worker | {tokens_s['worker']} | {samples_s['worker']} |",
        f"| **worker ratio** (worker / bare, per round) | **{spread(ratios, '.2f')}** | "
        f"{spread(sample_ratios, '.2f')} |",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct",
                    help="An alias (rl models), a model dir, tiny (test model), 20m (random Qwen2).")  # fmt: skip
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "quickstart.yaml",
                    help="Run config whose data, sampling and rollout settings are used.")  # fmt: skip
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cores", default="0,1", help="CPU list for taskset (both sides and the hub).")
    ap.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of both sides.")
    ap.add_argument("--write-docs", action="store_true", help="Replace the worker section of docs/benchmarks.md.")
    ap.add_argument("--baseline-of", type=Path, help=argparse.SUPPRESS)  # internal: run the bare side only
    args = ap.parse_args()
    if args.baseline_of:
        print(json.dumps(baseline(Path(args.model), args.baseline_of)))
        return
    from rl.config import load_config

    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        model = prepare_model(args.model, Path(tmp) / "model")
        for i in range(args.repeats):
            run_dir = Path(tmp) / f"run{i}"
            config = write_run_config(model, run_dir, args)
            result = {}
            for side in ("bare", "worker") if i % 2 == 0 else ("worker", "bare"):
                if side == "bare":
                    result[side] = run_baseline(model, config, args)
                else:
                    result[side] = run_worker(model, run_dir, config, args)
                print(f"round {i + 1} {side}: {result[side]} -> {rate(result[side]):.0f} tokens/s", flush=True)
            rounds.append(result)
        cfg = load_config(config, [])
    text = table(args, args.model, cfg, rounds)
    print(text)
    if args.write_docs:
        from bench_docs import replace_section

        replace_section("Rollout worker", "scripts/bench_worker.py", text)


if __name__ == "__main__":
    main()
