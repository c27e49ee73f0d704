"""GPU checks (skipped without CUDA): vLLM on the GPU with in-place reload, DeepSpeed bf16 on the GPU."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def test_vllm_cuda_reload_matches_hf(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from rl.hub.protocol import SamplingParamsWire
    from rollout_workers.engines import make_engine

    state = load_file(tiny_model_dir / "model.safetensors")
    g = torch.Generator().manual_seed(1)
    perturbed = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in state.items()}
    v1 = tmp_path / "v1.safetensors"
    save_file(perturbed, str(v1))
    engine = make_engine("vllm", tiny_model_dir, max_model_len=128, dtype="float32")
    try:
        engine.load_weights(v1)
        prompt = [1, 20, 30, 40]
        params = SamplingParamsWire(n=2, temperature=1.0, top_p=1.0, top_k=-1, max_tokens=8)
        completions = engine.generate([prompt], params)[0]
    finally:
        engine.close()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.load_state_dict(perturbed, strict=False)
    model.tie_weights()
    for c in completions:
        ids = torch.tensor([prompt + c.token_ids])
        logp = torch.log_softmax(model(ids).logits[0, len(prompt) - 1 : -1].float(), -1)
        expected = logp.gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
        assert torch.allclose(expected, torch.tensor(c.logprobs), atol=5e-3)


def test_strategy_bf16_step_on_cuda(tiny_model_dir):
    from rl.config import ModelConfig, TrainerConfig
    from rl.strategy import DeepSpeedStrategy

    strategy = DeepSpeedStrategy(
        ModelConfig(name=str(tiny_model_dir), dtype="bfloat16"),
        TrainerConfig(deepspeed="configs/deepspeed/zero2.json", micro_batch_size=2, lr=1e-3),
    )
    assert strategy.device.type == "cuda"
    ids = torch.randint(3, 100, (2, 12))
    logp, _ = strategy.token_logprobs(ids, torch.ones_like(ids))
    strategy.backward(-logp.sum())
    stats = strategy.step()
    assert stats["grad_norm"] > 0


def test_cuda_rng_state_round_trips(tmp_path):
    from rl.checkpoint import rng_state, set_rng_state

    torch.cuda.manual_seed_all(5)
    state = rng_state()
    assert len(state["cuda"]) == torch.cuda.device_count()
    torch.save(state, tmp_path / "rng.pt")
    first = torch.rand(8, device="cuda")
    assert not torch.equal(torch.rand(8, device="cuda"), first)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=False))
    assert torch.equal(torch.rand(8, device="cuda"), first)
