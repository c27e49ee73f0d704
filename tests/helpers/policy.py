"""Policy stores for tests: real published versions (rl/weights.py) of the tiny model, and HF reference logprobs."""

from __future__ import annotations

from pathlib import Path


def make_policy_store(model_dir: Path, policy_dir: Path, versions: int = 1, scale: float = 0.05) -> None:
    """Publish v0 = the model's weights and v1..v(versions-1) = perturbed copies."""
    from safetensors.torch import load_file

    from rl.weights import write_base, write_version

    write_base(policy_dir, model_dir)
    state = load_file(str(model_dir / "model.safetensors"))
    write_version(policy_dir, 0, state, "float32")
    for v in range(1, versions):
        write_version(policy_dir, v, perturbed(state, seed=v, scale=scale), "float32")


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
