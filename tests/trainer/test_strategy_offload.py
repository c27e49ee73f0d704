"""ZeRO-Offload through DeepSpeedStrategy: ZeRO-3 with the optimizer on the CPU (DeepSpeed's CPU Adam).

DeepSpeed accepts only its own CPU Adam under `offload_optimizer`, so the strategy builds one
(a C++ op JIT-compiled on first use, ~1 min, cached in TORCH_EXTENSIONS_DIR) instead of torch's
fused AdamW. The steps must equal plain torch AdamW with clipping and warm-up, and a
checkpoint (DeepSpeed's offloaded optimizer state) must resume exactly. On this CPU-only
machine "offload to cpu" moves nothing, but it runs DeepSpeed's offload code path and optimizer.
"""

from __future__ import annotations

import pytest
import torch

from rl.config import ModelConfig, TrainerConfig
from rl.deepspeed_config import offloads_optimizer, warmup_then_constant
from rl.trainer.strategy import DeepSpeedStrategy

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:`torch.distributed.*is deprecated:FutureWarning")]

OFFLOAD = "configs/deepspeed/zero3_offload.json"


def make_strategy(model_dir, deepspeed=OFFLOAD, dtype="float32", **trainer) -> DeepSpeedStrategy:
    hyper = dict(deepspeed=deepspeed, lr=1e-2, threads=1, micro_batch_size=2, grad_clip=0.5, warmup_steps=2)
    return DeepSpeedStrategy(ModelConfig(name=str(model_dir), dtype=dtype), TrainerConfig(**{**hyper, **trainer}))


def make_batch(rows=4, length=10):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 400, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1:, length - 3 :] = 0
    return ids * mask, mask


def train(strategy, ids, mask, steps):
    """`steps` optimizer steps, each over two micro-batches of a signed per-sequence loss."""
    weight = torch.linspace(-1.0, 1.0, ids.shape[0])
    metrics = []
    for _ in range(steps):
        for part in torch.arange(ids.shape[0]).tensor_split(2):
            logp, _ = strategy.token_logprobs(ids[part], mask[part])
            strategy.backward(-(logp.sum(-1) * weight[part]).sum() / float(mask.sum()))
        metrics.append(strategy.step())
    return strategy.gather_state_dict(), metrics


def plain_adamw(model_dir, ids, mask, steps):
    """Reference: the same loss in one backward per step, torch AdamW, clipping at 0.5, 2 warm-up steps."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_then_constant(2))
    weight = torch.linspace(-1.0, 1.0, ids.shape[0])
    norms = []
    for _ in range(steps):
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        logp = logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1) * mask[:, 1:]
        (-(logp.sum(-1) * weight).sum() / float(mask.sum())).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)))
        opt.step()
        opt.zero_grad()
        sched.step()
    return {k: v.detach() for k, v in model.state_dict().items() if k != "lm_head.weight"}, norms


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_offloads_optimizer_reads_the_zero_section():
    assert offloads_optimizer({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}})
    assert offloads_optimizer({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme"}}})
    assert not offloads_optimizer({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "none"}}})
    assert not offloads_optimizer({"zero_optimization": {"stage": 2}})


def test_offload_trains_like_plain_adamw(tiny_model_dir):
    from deepspeed.ops.adam import DeepSpeedCPUAdam
    from safetensors.torch import load_file

    ids, mask = make_batch()
    strategy = make_strategy(tiny_model_dir)
    assert strategy.zero_stage == 3 and isinstance(strategy.engine.basic_optimizer, DeepSpeedCPUAdam)
    state, metrics = train(strategy, ids, mask, 3)
    expected, norms = plain_adamw(tiny_model_dir, ids, mask, 3)

    initial = load_file(tiny_model_dir / "model.safetensors")
    assert min(float((state[k] - initial[k]).abs().max()) for k in initial) > 0  # every tensor moved
    # DeepSpeed's CPU Adam (AdamW mode) == torch AdamW, to fp32 rounding of ~1e-2 updates.
    assert max_diff(state, expected) < 2e-5
    assert [m["grad_norm"] for m in metrics] == pytest.approx(norms, rel=1e-5)
    assert [m["lr"] for m in metrics] == pytest.approx([5e-3, 1e-2, 1e-2])


def test_offload_checkpoint_resumes_exactly(tiny_model_dir, tmp_path):
    ids, mask = make_batch()
    first = make_strategy(tiny_model_dir, warmup_steps=4)
    train(first, ids, mask, 2)
    first.save_checkpoint(tmp_path / "ckpt", {"step": 2})
    after_save, next_metrics = train(first, ids, mask, 1)

    second = make_strategy(tiny_model_dir, warmup_steps=4, seed=1)
    assert second.load_checkpoint(tmp_path / "ckpt") == {"step": 2}
    resumed, resumed_metrics = train(second, ids, mask, 1)
    assert resumed_metrics == next_metrics  # same weights going in: the same gradients
    # Weights and the offloaded Adam moments are restored; the CPU Adam op alone differs by an ulp:
    # it advances beta^t by multiplication in a running process but recomputes it with pow() in a
    # fresh one (csrc/includes/cpu_adam.h, IncrementStep).
    assert max_diff(after_save, resumed) < 1e-6
    assert next_metrics[0]["lr"] == pytest.approx(1e-2 * 3 / 4)


def test_offload_bfloat16_steps(tiny_model_dir):
    strategy = make_strategy(tiny_model_dir, dtype="bfloat16")
    ids, mask = make_batch()
    state, metrics = train(strategy, ids, mask, 2)
    assert all(v.dtype == torch.bfloat16 for v in state.values())
    assert all(0 < m["grad_norm"] < float("inf") for m in metrics)


def test_without_offload_the_optimizer_is_torch_fused_adamw(tiny_model_dir):
    strategy = make_strategy(tiny_model_dir, deepspeed="configs/deepspeed/zero3.json")
    optimizer = strategy.engine.basic_optimizer
    assert type(optimizer) is torch.optim.AdamW and optimizer.defaults["fused"]
