"""How far an honest worker's seeded draws lose the trainer's seeded race (rl/sampling.py).

An honest bf16 vLLM worker samples seeded completions of the base weights; the fp32 trainer side
recomputes each token's logits with HF and measures, in raw-logit nats, how far the token loses
the race (`check_draws`); scripts/measure_draw_fp.py does the same on trained (rounded) weights.
Prints, per sampling rule, the distance quantiles and the token and
sequence rejection rates at several tolerances (docs/security.md has the numbers). Without
`--model`, the tiny random test model; `--sharpen K` multiplies its final norm by K (logits
x K: peaked distributions, nearer a trained model's entropy).

    python scripts/measure_seeded_tolerance.py --prompts 32 --n 8 --max-tokens 48 --sharpen 8
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

RULES = {"T1": dict(temperature=1.0, top_k=-1, top_p=1.0), "T0.7": dict(temperature=0.7, top_k=-1, top_p=1.0),
         "T1-k50-p0.95": dict(temperature=1.0, top_k=50, top_p=0.95)}  # fmt: skip
TOLERANCES = (0.0, 1e-5, 1e-4, 1e-3, 3e-3, 1e-2, 3e-2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="HF model directory (default: the tiny random model)")
    parser.add_argument("--sharpen", type=float, default=1.0, help="scale the tiny model's logits by this")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--dtype", default="bfloat16", help="the worker's dtype")
    parser.add_argument("--output", default=None, help="write the summary as JSON here")
    parser.add_argument("--config", default=None, help="take prompts from this run config's data (e.g. the quickstart)")
    parser.add_argument("--dump", default=None, help="save every sequence's per-token distances here (torch.save)")
    parser.add_argument("--rules", default=",".join(RULES), help=f"comma-separated subset of {', '.join(RULES)}")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

    import torch
    from transformers import AutoModelForCausalLM

    from rl.sampling import check_draws, uniforms
    from rl.wire.protocol import SamplingParamsWire
    from rollout_workers.engines import EngineSpec, make_engine, sampling_rule

    model_dir = Path(args.model) if args.model else tiny_model(Path(tempfile.mkdtemp()), args.sharpen)
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    vocab = reference.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, min(vocab, 30000), (int(torch.randint(4, 16, (1,), generator=g)),),
                             generator=g).tolist() for _ in range(args.prompts)]  # fmt: skip
    if args.config:  # the run's own chat-templated prompts
        from transformers import AutoTokenizer

        from rl.config import load_config
        from rl.hub.data import PromptSet, load_rows

        cfg = load_config(args.config, [])
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        prompts = PromptSet.build(load_rows(cfg.data)[0], cfg.data, tokenizer).prompt_ids[: args.prompts]
    max_len = max(len(p) for p in prompts) + args.max_tokens + 8
    engine = make_engine(EngineSpec(kind="vllm"), model_dir, max_model_len=max_len, dtype=args.dtype)
    summary = {}
    for name, rule_args in ((k, RULES[k]) for k in args.rules.split(",")):
        params = SamplingParamsWire(n=args.n, max_tokens=args.max_tokens, **rule_args)
        seeds = [[10_000 * i + j for j in range(args.n)] for i in range(len(prompts))]
        outputs = engine.generate(prompts, params, seeds)
        distances, entropy, lp_diff = [], [], []
        for prompt, completions, prompt_seeds in zip(prompts, outputs, seeds, strict=True):
            for c, seed in zip(completions, prompt_seeds, strict=True):
                with torch.no_grad():
                    logits = reference(torch.tensor([prompt + c.token_ids])).logits[0, len(prompt) - 1 : -1]
                u = uniforms(seed, torch.arange(len(c.token_ids)))
                distances.append(check_draws(logits, torch.tensor(c.token_ids), u, sampling_rule(params), tol=0)[1])
                lp = torch.log_softmax(logits.double(), -1)
                entropy.append(-(lp.exp() * lp).sum(-1))
                ref_lp = lp.gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
                lp_diff.append((ref_lp - torch.tensor(c.logprobs, dtype=torch.float64)).abs())
        tokens, lp_diff = torch.cat(distances), torch.cat(lp_diff)
        quantiles = torch.quantile(tokens, torch.tensor([0.99, 0.999], dtype=torch.float64)).tolist()
        summary[name] = {
            "sequences": len(distances), "tokens": len(tokens), "entropy_nats": float(torch.cat(entropy).mean()),
            "logprob_diff_mean": float(lp_diff.mean()), "logprob_diff_max": float(lp_diff.max()),
            "moved_tokens": float((tokens > 0).double().mean()), "p99": quantiles[0], "p999": quantiles[1],
            "max": float(tokens.max()),
            "rejected": {str(tol): {"tokens": float((tokens > tol).double().mean()),
                                    "sequences": sum(bool((d > tol).any()) for d in distances) / len(distances)}
                         for tol in TOLERANCES},
        }  # fmt: skip
        print(name, json.dumps(summary[name], indent=1))
        if args.dump:
            torch.save({**(torch.load(args.dump) if Path(args.dump).exists() else {}), name: distances}, args.dump)
    engine.close()
    if args.output:
        Path(args.output).write_text(json.dumps(summary, indent=1))


def tiny_model(out: Path, sharpen: float) -> Path:
    """The tests' tiny random Qwen2, its final norm (so its logits) scaled by `sharpen`."""
    from safetensors.torch import load_file, save_file

    from rl.models import build_tiny_model

    build_tiny_model(out)
    path = out / "model.safetensors"
    state = load_file(str(path))
    state["model.norm.weight"] = state["model.norm.weight"] * sharpen
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})
    return out


if __name__ == "__main__":
    main()
