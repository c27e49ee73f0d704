"""Equivalence with TRL 1.16: advantages, importance weights and losses against TRL's own code.

One `GRPOTrainer` is built around the tiny test model; its generation, reward and log-prob
hooks are replaced so that TRL's real `_generate_and_score_completions` (advantages, vLLM
importance-sampling ratios) and `_compute_loss` (every loss type) run on tensors we control.
Nothing here re-types TRL's formulas.
"""

from __future__ import annotations

import pytest
import torch

from rl.config import AlgorithmConfig
from rl.trainer.advantages import group_advantages
from rl.trainer.loss import LossNorm, behaviour_importance_weights, policy_loss, reduce_metrics

pytestmark = pytest.mark.slow  # importing TRL and building the trainer take ~10 s

GROUP, BATCH, T = 4, 8, 12
LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "gspo", "cispo"]
IS_MODES = ["none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]


def _zero_reward(completions, **kwargs):
    return [0.0] * len(completions)


@pytest.fixture(scope="module")
def trl_trainer(tiny_model_dir, tmp_path_factory):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(
        output_dir=str(tmp_path_factory.mktemp("trl-out")),
        use_cpu=True,
        use_vllm=False,
        per_device_train_batch_size=BATCH,
        num_generations=GROUP,
        max_completion_length=T,
        beta=0.0,
        report_to="none",
        logging_strategy="no",
        save_strategy="no",
    )
    trainer = GRPOTrainer(
        model=str(tiny_model_dir),
        reward_funcs=_zero_reward,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": ["p"] * BATCH}),
    )
    trainer.model.train()  # TRL's loss reads train/eval mode from the model
    return trainer


def _configure(trainer, cfg: AlgorithmConfig, *, accumulation: int = 1) -> None:
    """Set TRL's attributes to the meaning of our config (its cispo cap is epsilon_high itself)."""
    trainer.loss_type = "grpo" if cfg.loss == "gspo" else cfg.loss
    trainer.importance_sampling_level = "sequence" if cfg.loss == "gspo" else "token"
    trainer.epsilon_low = cfg.epsilon_low
    trainer.epsilon_high = 1 + cfg.epsilon_high if cfg.loss == "cispo" else cfg.epsilon_high
    trainer.args.delta = cfg.dual_clip
    trainer.args.use_bias_correction_kl = True  # TRL's default, and our KL term
    trainer.beta = cfg.beta
    trainer.max_completion_length = T
    trainer.use_vllm = cfg.is_mode != "none"
    trainer.vllm_importance_sampling_correction = True
    trainer.vllm_importance_sampling_mode = cfg.is_mode
    trainer.vllm_importance_sampling_clip_max = cfg.is_cap
    trainer.vllm_importance_sampling_clip_min = None
    trainer.current_gradient_accumulation_steps = accumulation
    trainer.args.steps_per_generation = accumulation


def _batch(seed: int) -> dict[str, torch.Tensor]:
    """Ragged right-padded completions (every row non-empty, one of full length), garbage in padding."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (BATCH,), generator=g)
    lengths[0] = T
    mask = (torch.arange(T) < lengths.unsqueeze(1)).long()
    old = -torch.rand(BATCH, T, generator=g) * 4
    # Wide, per-sequence-shifted log-ratios, so low/high/dual-clip and IS caps all occur.
    shift = 0.6 * torch.randn(BATCH, 1, generator=g)
    logprobs = old + shift + 0.6 * torch.randn(BATCH, T, generator=g)
    behaviour = old + 0.5 * torch.randn(BATCH, T, generator=g)
    ref = old + 0.3 * torch.randn(BATCH, T, generator=g)
    rewards = torch.randint(0, 3, (BATCH,), generator=g).float() / 2
    rewards[GROUP : 2 * GROUP] = torch.rand(GROUP, generator=g)
    return {
        "mask": mask,
        "lengths": lengths,
        "old": old,
        "logprobs": logprobs,
        "behaviour": behaviour,
        "ref": ref,
        "entropy": torch.rand(BATCH, T, generator=g) * 3,
        "rewards": rewards,
    }


def _trl_score(trainer, b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """TRL's `_generate_and_score_completions` with our completions, behaviour log-probs and rewards."""
    lengths = b["lengths"].tolist()
    completion_ids = [[5] * n for n in lengths]
    sampling = [b["behaviour"][i, :n].tolist() for i, n in enumerate(lengths)]
    trainer._generate = lambda prompts: (
        [[1, 2, 3]] * BATCH,
        completion_ids,
        None,
        ["x"] * BATCH,
        sampling,
        {},
        None,
        [],
    )
    trainer._calculate_rewards = lambda *args: b["rewards"].view(-1, 1).clone()
    trainer._get_per_token_logps_and_entropies = lambda *args, **kwargs: (b["old"].clone(), None, None)
    saved_beta, trainer.beta = trainer.beta, 0.0  # the reference log-probs are ours, added below
    try:
        return trainer._generate_and_score_completions([{"prompt": "p"}] * BATCH)
    finally:
        trainer.beta = saved_beta


def _trl_loss(trainer, inputs: dict, logprobs: torch.Tensor, entropy: torch.Tensor):
    leaf = logprobs.clone().requires_grad_()
    trainer._get_per_token_logps_and_entropies = lambda *args, **kwargs: (leaf, entropy, None)
    rows = logprobs.shape[0]
    full = {
        "prompt_ids": torch.ones(rows, 3, dtype=torch.long),
        "prompt_mask": torch.ones(rows, 3, dtype=torch.long),
        "completion_ids": torch.full((rows, T), 5, dtype=torch.long),
        **inputs,
    }
    loss = trainer._compute_loss(trainer.model, full)
    (grad,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), grad


def _ours(cfg, b, advantages, rows=slice(None), norm=None):
    leaf = b["logprobs"][rows].clone().requires_grad_()
    norm = norm or LossNorm.from_batch(b["mask"], max_tokens=T)
    loss, metrics = policy_loss(
        leaf,
        b["old"][rows],
        advantages[rows],
        b["mask"][rows],
        cfg,
        behaviour_logprobs=b["behaviour"][rows] if cfg.is_mode != "none" else None,
        ref_logprobs=b["ref"][rows],
        entropy=b["entropy"][rows],
        loss_norm=norm,
    )
    (grad,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), grad, metrics


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_match_trl(trl_trainer, scale):
    b = _batch(0)
    _configure(trl_trainer, AlgorithmConfig(is_mode="none"))
    trl_trainer.scale_rewards = scale
    try:
        expected = _trl_score(trl_trainer, b)["advantages"]
    finally:
        trl_trainer.scale_rewards = "group"
    ours, stats = group_advantages(b["rewards"], GROUP, "grpo", scale)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
    if scale == "none":  # Dr. GRPO's advantage is TRL's scale_rewards="none"
        dr, _ = group_advantages(b["rewards"], GROUP, "dr_grpo", "group")
        torch.testing.assert_close(dr, expected, rtol=0, atol=1e-6)
    assert stats["groups"] == BATCH / GROUP


@pytest.mark.parametrize("mode", IS_MODES[1:])
def test_importance_weights_match_trl(trl_trainer, mode):
    b = _batch(2)
    cfg = AlgorithmConfig(is_mode=mode, is_cap=2.0)
    _configure(trl_trainer, cfg)
    out = _trl_score(trl_trainer, b)
    ours, _ = behaviour_importance_weights(b["old"], b["behaviour"], b["mask"].float(), mode, cfg.is_cap)
    torch.testing.assert_close(ours, out["importance_sampling_ratio"], rtol=0, atol=1e-6)
    assert (ours == (0.0 if mode.endswith("mask") else cfg.is_cap)).any()  # the cap is exercised
    assert ((ours > 0) & (ours < 1)).any()


@pytest.mark.parametrize("mode", IS_MODES)
@pytest.mark.parametrize("loss", LOSS_TYPES)
def test_loss_and_gradients_match_trl(trl_trainer, loss, mode):
    b = _batch(2)
    cfg = AlgorithmConfig(loss=loss, is_mode=mode, is_cap=2.0, dual_clip=3.0, beta=0.04)
    _configure(trl_trainer, cfg)
    scored = _trl_score(trl_trainer, b)
    scored["ref_per_token_logps"] = b["ref"]
    # Without IS correction TRL skips old log-probs when on-policy; ours are off-policy, so give it them.
    scored.setdefault("old_per_token_logps", b["old"])
    trl_loss, trl_grad = _trl_loss(trl_trainer, scored, b["logprobs"], b["entropy"])

    advantages, _ = group_advantages(b["rewards"], GROUP, cfg.advantage, cfg.scale_rewards)
    loss_value, grad, metrics = _ours(cfg, b, advantages)
    torch.testing.assert_close(loss_value, trl_loss, rtol=0, atol=1e-6)
    torch.testing.assert_close(grad, trl_grad, rtol=0, atol=1e-6)
    assert grad.abs().sum() > 0

    logged = {k: v[-1] for k, v in trl_trainer._metrics["train"].items() if v}
    reduced = reduce_metrics([metrics])
    assert reduced["ref_kl"] == pytest.approx(logged["kl"], abs=1e-6)
    assert reduced["entropy"] == pytest.approx(logged["entropy"], abs=1e-6)
    if loss == "cispo":
        assert reduced["clip_ratio/high"] == pytest.approx(logged["cispo_clip_ratio"], abs=1e-6)
    else:
        assert reduced["clip_ratio/low"] == pytest.approx(logged["clip_ratio/low_mean"], abs=1e-6)
        assert reduced["clip_ratio/high"] == pytest.approx(logged["clip_ratio/high_mean"], abs=1e-6)
    if mode != "none":
        assert reduced["is_weight"] == pytest.approx(logged["sampling/importance_sampling_ratio/mean"], abs=1e-6)
        assert reduced["is_weight/max"] == pytest.approx(logged["sampling/importance_sampling_ratio/max"], abs=1e-6)


def test_inputs_exercise_every_clip_region():
    """The TRL comparison is only as good as its inputs: clipping on both sides and dual-clip occur."""
    b = _batch(2)
    advantages, _ = group_advantages(b["rewards"], GROUP)
    ratio = torch.exp(b["logprobs"] - b["old"])[b["mask"].bool()]
    adv = advantages.unsqueeze(1).expand(BATCH, T)[b["mask"].bool()]
    assert ((ratio < 0.8) & (adv < 0)).any()
    assert ((ratio > 1.28) & (adv > 0)).any()
    assert ((ratio > 3.0) & (adv < 0)).any()


@pytest.mark.parametrize("loss", LOSS_TYPES)
def test_micro_batches_match_trl_gradient_accumulation(trl_trainer, loss):
    """Two micro-batches: our per-micro-batch losses sum like TRL's gradient accumulation."""
    b = _batch(3)
    cfg = AlgorithmConfig(loss=loss, is_mode="token_truncate", is_cap=2.0, beta=0.04)
    _configure(trl_trainer, cfg, accumulation=2)
    scored = _trl_score(trl_trainer, b)
    scored["ref_per_token_logps"] = b["ref"]
    advantages, _ = group_advantages(b["rewards"], GROUP)
    norm = LossNorm.from_batch(b["mask"], micro_batch_size=BATCH // 2, max_tokens=T)
    total_trl, total_ours = 0.0, 0.0
    for half in (slice(0, BATCH // 2), slice(BATCH // 2, BATCH)):
        part = {k: (v[half] if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in scored.items()}
        trl_loss, trl_grad = _trl_loss(trl_trainer, part, b["logprobs"][half], b["entropy"][half])
        ours, grad, _ = _ours(cfg, b, advantages, half, norm)
        torch.testing.assert_close(grad, trl_grad, rtol=0, atol=1e-6)
        total_trl, total_ours = total_trl + trl_loss, total_ours + ours
    torch.testing.assert_close(total_ours, total_trl, rtol=0, atol=1e-6)
