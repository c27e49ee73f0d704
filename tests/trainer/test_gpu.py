"""GPU checks (skipped without CUDA; scripts/gpu_check.sh runs them on a bare GPU image).

vLLM on the GPU with in-place reload (skipped without vLLM); DeepSpeed bf16 on the GPU at
ZeRO-2 and ZeRO-3 (NCCL one-rank group, weights on the device, exported weights equal to
what the trainer computes with); ZeRO-Offload with DeepSpeed's CPU Adam (JIT-compiled, skipped
without a C++ compiler); CUDA RNG states through a checkpoint file; the HF engine's log-probs
on the GPU against the trainer's recomputation.
"""

from __future__ import annotations

import shutil

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def test_vllm_cuda_reload_matches_hf(tiny_model_dir, tmp_path):
    pytest.importorskip("vllm")
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from rl.wire.protocol import SamplingParamsWire
    from rollout_workers.engines import EngineSpec, make_engine

    state = load_file(tiny_model_dir / "model.safetensors")
    g = torch.Generator().manual_seed(1)
    perturbed = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in state.items()}
    v1 = tmp_path / "v1.safetensors"
    save_file(perturbed, str(v1))
    spec = EngineSpec(gpu_memory_utilization=0.3, enforce_eager=True)  # rollout.* settings reach vLLM on GPUs
    engine = make_engine(spec, tiny_model_dir, max_model_len=128, dtype="float32")
    try:
        engine.load_weights([v1])
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
    from rl.trainer.strategy import DeepSpeedStrategy

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
    from rl.trainer.checkpoint import rng_state, set_rng_state

    torch.cuda.manual_seed_all(5)
    state = rng_state()
    assert len(state["cuda"]) == torch.cuda.device_count()
    torch.save(state, tmp_path / "rng.pt")
    first = torch.rand(8, device="cuda")
    assert not torch.equal(torch.rand(8, device="cuda"), first)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=False))
    assert torch.equal(torch.rand(8, device="cuda"), first)


def test_zero3_bfloat16_on_cuda_exports_what_it_trains(tiny_model_dir):
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from rl.config import ModelConfig, TrainerConfig
    from rl.trainer.strategy import DeepSpeedStrategy

    strategy = DeepSpeedStrategy(
        ModelConfig(name=str(tiny_model_dir), dtype="bfloat16"),
        TrainerConfig(deepspeed="configs/deepspeed/zero3.json", micro_batch_size=2, lr=1e-2, threads=2),
    )
    assert strategy.device.type == "cuda" and dist.get_backend() == "nccl"
    assert all(p.device.type == "cuda" for p in strategy.module.parameters())
    before = strategy.gather_state_dict()
    ids = torch.randint(3, 300, (4, 16))
    mask = torch.ones_like(ids)
    for _ in range(2):
        logp, _ = strategy.token_logprobs(ids, mask)
        strategy.backward(-logp.sum() / mask.sum())
        assert 0 < strategy.step()["grad_norm"] < float("inf")
    after = strategy.gather_state_dict()
    assert all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in after.values())
    assert any((after[k] != before[k]).any() for k in after)

    # A plain HF model with the gathered weights computes the trainer's log-probs (bf16 rounding).
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).cuda()
    model.load_state_dict(after, strict=False)
    model.tie_weights()
    with torch.no_grad():
        got, _ = strategy.token_logprobs(ids, mask)
        logits = model(input_ids=ids.cuda()).logits[:, :-1].float()
    want = logits.log_softmax(-1).gather(-1, ids[:, 1:, None].cuda()).squeeze(-1)
    assert (got[:, 1:] - want).abs().mean() < 0.02


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="CPU Adam needs a C++ compiler")
def test_zero3_offload_steps_on_cuda(tiny_model_dir, tmp_path):
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    from rl.config import ModelConfig, TrainerConfig
    from rl.trainer.strategy import DeepSpeedStrategy

    def make():
        return DeepSpeedStrategy(
            ModelConfig(name=str(tiny_model_dir), dtype="bfloat16"),
            TrainerConfig(deepspeed="configs/deepspeed/zero3_offload.json", micro_batch_size=2, lr=1e-2, threads=2),
        )

    def step(strategy):
        logp, _ = strategy.token_logprobs(ids, torch.ones_like(ids))
        strategy.backward(-logp.sum() / ids.numel())
        return strategy.step()

    strategy = make()
    assert isinstance(strategy.engine.basic_optimizer, DeepSpeedCPUAdam)
    master = strategy.engine.optimizer.fp32_partitioned_groups_flat  # the offloaded fp32 weights
    assert master and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in master)
    assert all(p.device.type == "cuda" for p in strategy.module.parameters())
    ids = torch.randint(3, 300, (4, 12))
    before = strategy.gather_state_dict()
    step(strategy)
    strategy.save_checkpoint(tmp_path / "ckpt", {"step": 1})
    expected = step(strategy)
    after = strategy.gather_state_dict()
    assert any((after[k] != before[k]).any() for k in after)

    resumed = make()
    assert resumed.load_checkpoint(tmp_path / "ckpt") == {"step": 1}
    got = step(resumed)  # same weights and moments going in: the same step (CUDA's atomics aside)
    assert got["lr"] == expected["lr"] and got["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-3)
    restored = resumed.gather_state_dict()
    assert max(float((restored[k].float() - after[k].float()).abs().max()) for k in after) < 1e-2


def test_hf_engine_logprobs_match_the_trainer_on_cuda(tiny_model_dir):
    from rl.config import ModelConfig, TrainerConfig
    from rl.trainer.strategy import DeepSpeedStrategy
    from rl.wire.protocol import SamplingParamsWire
    from rollout_workers.engines import EngineSpec, make_engine

    prompt = [1, 20, 30, 40, 50]
    params = SamplingParamsWire(n=4, temperature=1.0, top_p=1.0, top_k=-1, max_tokens=12)
    engine = make_engine(EngineSpec(kind="hf"), tiny_model_dir, max_model_len=64, dtype="float32")
    try:
        assert engine.device.type == "cuda"
        completions = engine.generate([prompt], params)[0]
    finally:
        engine.close()
    strategy = DeepSpeedStrategy(ModelConfig(name=str(tiny_model_dir)), TrainerConfig(zero_stage=0, threads=2))
    for c in completions:
        ids = torch.tensor([prompt + c.token_ids])
        with torch.no_grad():
            logp, _ = strategy.token_logprobs(ids, torch.ones_like(ids))
        recomputed = logp[0, len(prompt) :].cpu()
        torch.testing.assert_close(recomputed, torch.tensor(c.logprobs), atol=2e-3, rtol=0)
