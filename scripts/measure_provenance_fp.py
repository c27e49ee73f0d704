"""False-positive rate of the provenance checks (rl/trainer/provenance.py) on honest samples.

The honest worker's engine (rollout_workers/engines/vllm_engine.py) samples in bf16 with a
config's sampling settings; the trainer side, one optimizer step later (staleness 1: one fp32
AdamW step at the config's lr on a GRPO-style loss over some of the samples), recomputes every
token in `--trainer-dtype` (bfloat16: the fp32 weights cast for the forward, as DeepSpeed's bf16
mode does) and runs the same checks `Trainer.verify` runs. Prints how many honest sequences would be
masked, by reason, and the statistics behind the thresholds (docs/security.md has the numbers).

    python scripts/measure_provenance_fp.py configs/quickstart.yaml --prompts 40
    python scripts/measure_provenance_fp.py configs/humaneval-code.yaml --prompts 8
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--prompts", type=int, default=40)
    parser.add_argument("--sampler-dtype", default="bfloat16")
    parser.add_argument("--trainer-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--update-sequences", type=int, default=16, help="sequences in the one optimizer step")
    parser.add_argument("--output", default=None, help="write the summary as JSON here")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rl.config import load_config
    from rl.hub.data import PromptSet, load_rows
    from rl.models import resolve_model
    from rl.trainer.provenance import NUM_STATS, REASONS, check_sequences, special_token_rows, token_statistics
    from rl.wire.protocol import SamplingParamsWire
    from rollout_workers.engines import EngineSpec
    from rollout_workers.engines.vllm_engine import VLLMEngine

    cfg = load_config(args.config)
    model_dir = resolve_model(cfg.model.name)
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = load_rows(cfg.data)[0][: args.prompts]
    prompts = PromptSet.build(rows, cfg.data, tok).prompt_ids
    sampling = SamplingParamsWire.of(cfg.sampling)
    start = time.perf_counter()
    engine = VLLMEngine(EngineSpec(kind="vllm", seed=0), model_dir, max_model_len=cfg.model.max_model_len,
                        dtype=args.sampler_dtype)  # fmt: skip
    groups = engine.generate(prompts, sampling)
    engine.close()
    gen_s = time.perf_counter() - start
    seqs = [(p, c) for p, group in zip(prompts, groups, strict=True) for c in group]

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)

    def batch(items):
        length = max(len(p) + len(c.token_ids) for p, c in items)
        ids = torch.full((len(items), length), tok.pad_token_id or 0)
        attn, mask, claimed = torch.zeros_like(ids), torch.zeros(ids.shape), torch.zeros(ids.shape)
        for i, (p, c) in enumerate(items):
            n = len(p) + len(c.token_ids)
            ids[i, :n] = torch.tensor(p + c.token_ids)
            attn[i, :n] = 1
            mask[i, len(p) : n] = 1
            claimed[i, len(p) : n] = torch.tensor(c.logprobs)
        return ids, attn, mask, claimed

    # Staleness 1: the trainer holds the weights one optimizer step after the sampler's.
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.trainer.lr, weight_decay=cfg.trainer.weight_decay)
    step_items = seqs[: args.update_sequences]
    ids, attn, mask, _ = batch(step_items)
    advantages = torch.tensor([1.0 if i % 2 else -1.0 for i in range(len(step_items))])
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
    logp = logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    loss = -(advantages[:, None] * logp * mask[:, 1:]).sum() / mask.sum()
    loss.backward()
    opt.step()
    model.eval()
    model.to(getattr(torch, args.trainer_dtype))

    fn = functools.partial(token_statistics, temperature=sampling.temperature, top_p=sampling.top_p,
                           top_k=sampling.top_k)  # fmt: skip
    stop_ids = [tok.eos_token_id]
    codes, diffs, maxdiffs, zs, tokens = [], [], [], [], []
    with torch.no_grad():
        for i in range(0, len(seqs), 8):
            ids, attn, mask, claimed = batch(seqs[i : i + 8])
            stats = torch.zeros(*ids.shape, NUM_STATS)
            stats[:, 1:] = fn(model(input_ids=ids, attention_mask=attn).logits[:, :-1].float(), ids[:, 1:])
            stats = stats * attn[..., None]
            special = special_token_rows(ids, mask, tok.all_special_ids, stop_ids)
            v = check_sequences(stats, claimed, mask, cfg.trust, special)
            codes += v.codes.tolist()
            diffs += (v.abs_diff_sum / v.tokens.clamp(min=1)).tolist()
            maxdiffs += v.max_abs_diff.tolist()
            zs += v.z.tolist()
            tokens += v.tokens.tolist()
    masked = sum(c != 0 for c in codes)
    zs_sorted = sorted(zs)
    summary = {
        "config": args.config,
        "sampler_dtype": args.sampler_dtype,
        "trainer_dtype": args.trainer_dtype,
        "sequences": len(codes),
        "tokens": int(sum(tokens)),
        "masked": masked,
        "false_positive_rate": masked / len(codes),
        "by_reason": {r: sum(c == i + 1 for c in codes) for i, r in enumerate(REASONS)},
        "mean_abs_logprob_diff": sum(d * t for d, t in zip(diffs, tokens, strict=True)) / max(sum(tokens), 1),
        "max_seq_mean_abs_diff": max(diffs),
        "max_token_abs_diff": max(maxdiffs),
        "z_p01_p50_p99": [zs_sorted[int(q * (len(zs) - 1))] for q in (0.01, 0.5, 0.99)],
        "z_max_abs": max(abs(z) for z in zs),
        "generate_s": round(gen_s, 1),
        "thresholds": cfg.trust.model_dump(),
    }
    print(json.dumps(summary, indent=2))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
