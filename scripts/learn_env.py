"""Does an environment run learn? Held-out success before and after `rl train`, per training seed (issue 18).

    python scripts/learn_env.py configs/guess-number.yaml --seeds 0 1
    python scripts/learn_env.py configs/arithmetic-tool.yaml --seeds 0 1 --set trainer.max_steps=12

For each seed: `rl train` the config as a user runs it (its run directory keeps metrics.jsonl and
curves.png), then play the held-out episodes with the final model. The base model is evaluated once.
Held-out episodes: `--heldout` rows the run's data never trains on as rows (the environment's
`rows(size, data.seed + EVAL_SEED_OFFSET)`, as `data.eval_size` would draw them), played on the trusted side
by rl/envs/play.py with vLLM fp32 (the same engine and rules for every model): one greedy episode per row,
and `--samples` episodes per row at the run's sampling temperature (vLLM seeded).
Success is the grade's `correct` term. Prints a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def child_env(threads: int) -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                TOKENIZERS_PARALLELISM="false", WANDB_MODE="offline")  # fmt: skip


def tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# --------------------------------------------------------------------------- the held-out episodes (a child)


def eval_child(config_path: Path, model_dir: str, heldout: int, samples: int, out: Path) -> None:
    """Child process: play the held-out episodes with `model_dir` (vLLM fp32) and write their summaries."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from rl.config import load_config
    from rl.envs import make
    from rl.envs.play import play, summarise
    from rl.envs.render import ObservationRenderer
    from rl.hub.data import PromptSet, load_rows
    from rl.hub.texts import TextDecoder

    cfg = load_config(config_path, [f"data.eval_size={heldout}"])
    src = cfg.data.source
    env = make(src.name, src.params)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    _, rows = load_rows(cfg.data)
    prompts = PromptSet.build(rows, cfg.data, tokenizer)
    renderer = ObservationRenderer(tokenizer)
    llm = LLM(model=model_dir, dtype="float32", max_model_len=cfg.model.max_model_len, enforce_eager=True, seed=0)
    stop = sorted(renderer.end_ids)

    decode = TextDecoder(tokenizer)  # the hub's decode: the environment sees the text it would

    def generator(params):
        def generate(batch: list[list[int]]) -> list[list[int]]:
            outs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in batch], params, use_tqdm=False)
            return [list(o.outputs[0].token_ids) for o in outs]

        return generate

    s = cfg.sampling
    result = {"model": model_dir, "rows": len(prompts.rows)}
    t0 = time.perf_counter()
    greedy = generator(SamplingParams(temperature=0.0, max_tokens=s.max_tokens, stop_token_ids=stop))
    played = play(env, prompts.rows, prompts.prompt_ids, greedy, decode, renderer, cfg.model.max_model_len,
                  s.max_tokens)  # fmt: skip
    result["greedy"] = summarise(played)
    result["examples"] = [{"answer": r.get("answer"), "turns": p.texts, "grade": p.grade.value}
                          for r, p in zip(prompts.rows[:4], played, strict=False)]  # fmt: skip
    if samples:
        rows_k = [r for r in prompts.rows for _ in range(samples)]
        ids_k = [ids for ids in prompts.prompt_ids for _ in range(samples)]
        # vLLM-CPU has no per-request seeds: the engine's seed (0) and the fixed order of calls make it repeatable.
        sampled = generator(SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                                           max_tokens=s.max_tokens, stop_token_ids=stop))  # fmt: skip
        result["sampled"] = summarise(play(env, rows_k, ids_k, sampled, decode, renderer, cfg.model.max_model_len,
                                           s.max_tokens))  # fmt: skip
    result["eval_s"] = time.perf_counter() - t0
    out.write_text(json.dumps(result, indent=1))


def evaluate(args: argparse.Namespace, config: Path, model_dir: str, tag: str) -> dict:
    out, log = args.out / f"eval-{tag}.json", args.out / f"eval-{tag}.log"
    cmd = [sys.executable, __file__, str(config), "--eval-child", model_dir, "--heldout", str(args.heldout),
           "--samples", str(args.samples), "--child-out", str(out)]  # fmt: skip
    with open(log, "w") as f:
        code = subprocess.run(cmd, cwd=ROOT, env=child_env(args.threads), stdout=f, stderr=subprocess.STDOUT).returncode
    if code != 0:
        sys.exit(f"held-out episodes of {model_dir} failed ({code}); last lines of {log}:\n{tail(log)}")
    result = json.loads(out.read_text())
    print(f"[{tag}] greedy success {result['greedy']['success']:.3f}"
          + (f", sampled {result['sampled']['success']:.3f}" if "sampled" in result else "")
          + f" ({result['eval_s']:.0f} s)", flush=True)  # fmt: skip
    return result


# --------------------------------------------------------------------------- training


def train(args: argparse.Namespace, config: Path, seed: int) -> dict:
    run_dir = args.out / f"seed{seed}"
    log = args.out / f"train-seed{seed}.log"
    cmd = [sys.executable, "-m", "rl.cli", "train", str(config), "--run-dir", str(run_dir),
           f"trainer.seed={seed}"]  # fmt: skip
    start = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.run(cmd, cwd=ROOT, env=child_env(args.threads), stdout=f, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - start
    if code != 0:
        sys.exit(f"rl train (seed {seed}) failed ({code}); last lines of {log}:\n{tail(log)}")
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in steps if "reward/mean" in r]
    correct = [r.get("reward/correct", float("nan")) for r in steps]
    print(f"[seed {seed}] {len(steps)} steps in {wall / 60:.1f} min; training reward/correct "
          f"{correct[0]:.3f} -> {correct[-1]:.3f}", flush=True)  # fmt: skip
    return {"seed": seed, "wall_s": wall, "steps": len(steps), "train_correct": correct, "run_dir": str(run_dir)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", type=Path)
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1], help="training seeds (none: the base model only)")
    p.add_argument("--heldout", type=int, default=64, help="held-out rows (one greedy episode each)")
    p.add_argument("--samples", type=int, default=4, help="sampled episodes per held-out row (0: none)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--set", dest="overrides", action="append", default=[], help="config override (key=value)")
    p.add_argument("--out", type=Path, default=None, help="where runs and results go (default: a new directory)")
    p.add_argument("--base-from", type=Path, default=None,
                   help="an earlier --out whose eval-base.json to reuse (same held-out rows and settings)")  # fmt: skip
    p.add_argument("--eval-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.eval_child:
        eval_child(args.config, args.eval_child, args.heldout, args.samples, args.child_out)
        return

    from rl.config import dump_config, load_config
    from rl.models import resolve_model

    cfg = load_config(args.config, args.overrides)
    args.out = args.out or Path(f"/tmp/learn-env-{cfg.run_name}-{int(time.time())}")
    args.out.mkdir(parents=True, exist_ok=True)
    frozen = args.out / "config.yaml"
    frozen.write_text(dump_config(cfg))
    print(f"{cfg.run_name}: results in {args.out}", flush=True)
    if args.base_from is not None:  # the base model's episodes of an earlier call (same rows, same settings)
        base = json.loads((args.base_from / "eval-base.json").read_text())
        (args.out / "eval-base.json").write_text(json.dumps(base, indent=1))
    else:
        base = evaluate(args, frozen, resolve_model(cfg.model.name), "base")
    runs = []
    for seed in args.seeds:
        run = train(args, frozen, seed)
        run["eval"] = evaluate(args, frozen, str(Path(run["run_dir"]) / "final"), f"seed{seed}")
        runs.append(run)
    (args.out / "results.json").write_text(json.dumps({"base": base, "runs": runs}, indent=1))
    report(cfg, base, runs)


def report(cfg, base: dict, runs: list[dict]) -> None:
    kinds = ["greedy"] + (["sampled"] if "sampled" in base else [])
    print(f"\n{cfg.run_name}: held-out success ({base['rows']} rows), base -> after training\n")
    print("| seed | steps | wall (min) | " + " | ".join(f"{k} success" for k in kinds) + " | turns (greedy) |")
    print("|---|---|---|" + "---|" * len(kinds) + "---|")
    for r in runs:
        cells = [f"{base[k]['success']:.3f} -> {r['eval'][k]['success']:.3f} "
                 f"({r['eval'][k]['success'] - base[k]['success']:+.3f})" for k in kinds]  # fmt: skip
        turns = f"{base['greedy']['turns']:.2f} -> {r['eval']['greedy']['turns']:.2f}"
        print(f"| {r['seed']} | {r['steps']} | {r['wall_s'] / 60:.1f} | " + " | ".join(cells) + f" | {turns} |")
    for k in kinds:
        if not runs:
            print(f"\n{k}: base success {base[k]['success']:.3f} (tool calls per episode "
                  f"{base[k].get('tool_calls', 0.0):.2f})")  # fmt: skip
            continue
        gains = [r["eval"][k]["success"] - base[k]["success"] for r in runs]
        print(f"\n{k}: mean change {statistics.mean(gains):+.3f} (min {min(gains):+.3f}, max {max(gains):+.3f})")


if __name__ == "__main__":
    main()
