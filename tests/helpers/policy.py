"""Policy stores for tests: real published versions (rl/weights.py) of the tiny model, and HF reference logprobs.

`make_policy_store` writes single-file fp32 versions; `make_sharded_store` writes given states as bf16
shards, in the `full` or the `delta` format, e.g. the RL-like `sparse_steps` of a checkpoint.
"""

from __future__ import annotations

from pathlib import Path


def make_policy_store(model_dir: Path, policy_dir: Path, versions: int = 1, scale: float = 0.05) -> None:
    """Publish v0 = the model's weights and v1..v(versions-1) = perturbed copies."""
    from safetensors.torch import load_file

    from rl.weights.store import write_base, write_version

    write_base(policy_dir, model_dir)
    state = load_file(str(model_dir / "model.safetensors"))
    write_version(policy_dir, 0, state, "float32")
    for v in range(1, versions):
        write_version(policy_dir, v, perturbed(state, seed=v, scale=scale), "float32")


def sparse_steps(state: dict, steps: int, fraction: float = 0.02, scale: float = 0.01) -> list[dict]:
    """`state` then `steps` updates, each changing about `fraction` of the elements (an RL step in bf16)."""
    import torch

    out = [state]
    for seed in range(1, steps + 1):
        g = torch.Generator().manual_seed(seed)
        out.append(
            {
                k: t + scale * torch.randn(t.shape, generator=g) * (torch.rand(t.shape, generator=g) < fraction)
                for k, t in out[-1].items()
            }
        )
    return out


def make_sharded_store(
    model_dir: Path, policy_dir: Path, states: list[dict], *, fmt: str, shard_bytes: int, keyframe_every: int = 100
) -> None:
    """Publish `states` as v0, v1, ... in format `fmt` (bf16 shards of at most `shard_bytes`)."""
    import torch

    from rl.weights.files import TensorSpec
    from rl.weights.store import PolicyWriter, write_base

    write_base(policy_dir, model_dir)
    layout = [TensorSpec(k, tuple(t.shape), torch.bfloat16) for k, t in states[0].items()]
    writer = PolicyWriter(policy_dir, layout, shard_bytes=shard_bytes, fmt=fmt, keyframe_every=keyframe_every)
    for version, state in enumerate(states):
        writer.write(version, state.items())


def perturbed(state: dict, seed: int, scale: float = 0.05) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    return {k: t + scale * torch.randn(t.shape, generator=g, dtype=t.dtype) for k, t in state.items()}


def hf_logprobs(model_dir: Path, state: dict | None, prompt: list[int], tokens: list[int]) -> list[float]:
    """Reference: log_softmax of an fp32 HF forward, at the sampled tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if state is not None:
        model.load_state_dict(state, strict=False)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0].float()
    lp = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
    return lp.gather(-1, torch.tensor(tokens)[:, None])[:, 0].tolist()
