"""DeepSpeedStrategy in one process (ZeRO 0-3 on CPU/gloo) against plain transformers + torch.

The strongest check is `test_steps_match_plain_torch`: micro-batched backward()
calls (a different count every step) then step() must equal one plain-PyTorch
AdamW step on the whole batch's loss, with clipping and warm-up, under every ZeRO stage.
"""

from __future__ import annotations

import json

import pytest
import torch

from rl.config import ModelConfig, TrainerConfig
from rl.deepspeed_config import build_deepspeed_config, warmup_then_constant
from rl.trainer.strategy import DeepSpeedStrategy, selected_logprobs

pytestmark = pytest.mark.filterwarnings("ignore:`torch.distributed.*is deprecated:FutureWarning")

VOCAB = 400


def make_strategy(model_dir, stage=0, with_reference=False, **trainer) -> DeepSpeedStrategy:
    defaults = dict(zero_stage=stage, lr=1e-3, threads=1, micro_batch_size=4, grad_clip=1e6)
    return DeepSpeedStrategy(
        ModelConfig(name=str(model_dir)), TrainerConfig(**{**defaults, **trainer}), with_reference=with_reference
    )


def make_batch(rows=6, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (rows, length), generator=g)
    lengths = torch.randint(length // 2, length + 1, (rows,), generator=g)
    lengths[0] = length
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    return ids * mask, mask


def plain_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def plain_logprobs(model, ids, mask, temperature=1.0):
    """Per-row, unpadded HF forward: log_softmax gather of the next token; also the entropy."""
    logp = torch.zeros(ids.shape)
    ent = torch.zeros(ids.shape)
    for i in range(ids.shape[0]):
        n = int(mask[i].sum())
        logits = model(input_ids=ids[i : i + 1, :n]).logits[0, :-1].float() / temperature
        lsm = logits.log_softmax(-1)
        logp[i, 1:n] = lsm.gather(-1, ids[i, 1:n, None]).squeeze(-1)
        ent[i, 1:n] = -(lsm.exp() * lsm).sum(-1)
    return logp, ent


def loss_of(logp, mask, normaliser):
    """A signed per-sequence weighting, like an advantage, normalised by the batch's token count."""
    weight = torch.linspace(-1.0, 1.0, logp.shape[0])
    return -(logp.sum(-1) * weight[: logp.shape[0]]).sum() / normaliser


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


# --------------------------------------------------------------------------- config


def test_deepspeed_config_overrides_and_sources(tmp_path):
    trainer = TrainerConfig(
        deepspeed={"zero_optimization": {"stage": 1}, "optimizer": {"type": "Adam"}, "train_batch_size": 99},
        zero_stage=2,
        grad_clip=0.5,
        micro_batch_size=3,
    )
    cfg = build_deepspeed_config(ModelConfig(dtype="bfloat16"), trainer)
    assert cfg["zero_optimization"]["stage"] == 2
    assert "optimizer" not in cfg and "train_batch_size" not in cfg
    assert cfg["gradient_clipping"] == 0.5
    assert cfg["train_micro_batch_size_per_gpu"] == 3 and cfg["gradient_accumulation_steps"] == 1
    assert cfg["managed_gradient_accumulation"] is False
    assert cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]

    # Repo-relative paths work from any cwd; the JSON's stage is kept without an override.
    cfg = build_deepspeed_config(ModelConfig(), TrainerConfig(deepspeed="configs/deepspeed/zero3.json"))
    assert cfg["zero_optimization"]["stage"] == 3 and not cfg["bf16"]["enabled"]
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 0}}))
    assert build_deepspeed_config(ModelConfig(), TrainerConfig(deepspeed=str(path)))["zero_optimization"] == {
        "stage": 0
    }
    with pytest.raises(FileNotFoundError, match="trainer.deepspeed"):
        build_deepspeed_config(ModelConfig(), TrainerConfig(deepspeed=str(tmp_path / "missing.json")))


def test_warmup_then_constant():
    f = warmup_then_constant(3)
    assert [f(s) for s in range(5)] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0, 1.0])
    assert warmup_then_constant(0)(0) == 1.0


# --------------------------------------------------------------------------- log-probs


@pytest.mark.parametrize("stage", [0, 3])
def test_token_logprobs_match_plain_forward(tiny_model_dir, stage):
    strategy = make_strategy(tiny_model_dir, stage, micro_batch_size=4)
    ids, mask = make_batch(rows=6)
    with torch.no_grad():
        expected, expected_ent = plain_logprobs(plain_model(tiny_model_dir), ids, mask)
        hot, _ = plain_logprobs(plain_model(tiny_model_dir), ids, mask, temperature=0.7)
        logp, ent = strategy.token_logprobs(ids, mask, with_entropy=True)
        logp_t, _ = strategy.token_logprobs(ids, mask, temperature=0.7)
    assert logp.shape == ids.shape and logp.dtype == torch.float32
    torch.testing.assert_close(logp, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, expected_ent, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logp_t, hot, atol=1e-5, rtol=1e-5)
    assert (logp[:, 0] == 0).all() and (logp[mask == 0] == 0).all()


def test_padding_does_not_change_real_positions(tiny_model_dir):
    strategy = make_strategy(tiny_model_dir, 0, micro_batch_size=2)
    ids, mask = make_batch(rows=5)
    garbage = torch.randint(3, VOCAB, ids.shape, generator=torch.Generator().manual_seed(1))
    noisy = torch.where(mask.bool(), ids, garbage)  # padding positions hold other tokens
    wide_ids = torch.cat([noisy, garbage[:, :5]], dim=1)  # and 5 more padding columns
    wide_mask = torch.cat([mask, torch.zeros_like(mask[:, :5])], dim=1)
    with torch.no_grad():
        base, _ = strategy.token_logprobs(ids, mask)
        wide, _ = strategy.token_logprobs(wide_ids, wide_mask)
        alone = torch.cat([strategy.token_logprobs(ids[i : i + 1], mask[i : i + 1])[0] for i in range(5)])
    torch.testing.assert_close(wide[:, : ids.shape[1]], base, atol=1e-5, rtol=1e-5)
    assert (wide[:, ids.shape[1] :] == 0).all()
    torch.testing.assert_close(alone, base, atol=1e-5, rtol=1e-5)
    empty, empty_ent = strategy.token_logprobs(ids[:0], mask[:0], with_entropy=True)
    assert empty.shape == empty_ent.shape == (0, ids.shape[1])


def test_selected_logprobs_half_precision_rows():
    """bf16 logits are upcast row by row; same numbers as an fp32 log_softmax of the same values."""
    logits = torch.randn(3, 5, 50).to(torch.bfloat16)
    targets = torch.randint(0, 50, (3, 5))
    for temperature in (1.0, 0.6):
        logp, ent = selected_logprobs(logits, targets, temperature, with_entropy=True)
        lsm = (logits.float() / temperature).log_softmax(-1)
        assert logp.dtype == ent.dtype == torch.float32
        torch.testing.assert_close(logp, lsm.gather(-1, targets[..., None]).squeeze(-1))
        torch.testing.assert_close(ent, -(lsm.exp() * lsm).sum(-1))
        full, full_ent = selected_logprobs(logits.float(), targets, temperature, with_entropy=True)
        torch.testing.assert_close(full, logp)
        torch.testing.assert_close(full_ent, ent)


def make_groups_batch(prompt_lengths=(5, 2, 9), group_size=3, seed=1):
    """GRPO-shaped rows: each prompt repeated with ragged completions, rows interleaved across groups
    (as a rank's strided share of a batch is), right-padded. Returns ids, mask, prompt lengths."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for p in prompt_lengths:
        prompt = torch.randint(3, VOCAB, (p,), generator=g).tolist()
        for _ in range(group_size):
            n = int(torch.randint(1, 7, (1,), generator=g))
            rows.append((prompt, torch.randint(3, VOCAB, (n,), generator=g).tolist()))
    rows = rows[::2] + rows[1::2]
    length = max(len(p) + len(c) for p, c in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, (p, c) in enumerate(rows):
        ids[r, : len(p) + len(c)] = torch.tensor(p + c)
        mask[r, : len(p) + len(c)] = 1
    return ids, mask, torch.tensor([len(p) for p, _ in rows])


@pytest.mark.parametrize("stage", [0, 3])
def test_shared_prompt_logprobs_match_unshared(tiny_model_dir, stage):
    """Prompt sharing gives the unshared log-probs and entropy on every completion token, 0 on prompts,
    with micro-batches that split groups and mix prompts of different lengths."""
    ids, mask, plen = make_groups_batch()
    completion = (torch.arange(ids.shape[1])[None] >= plen[:, None]) & mask.bool()
    strategy = make_strategy(tiny_model_dir, stage, micro_batch_size=4)
    with torch.no_grad():
        plain, plain_ent = strategy.token_logprobs(ids, mask, with_entropy=True, temperature=0.9)
        shared, shared_ent = strategy.token_logprobs(ids, mask, prompt_lengths=plen, with_entropy=True,
                                                     temperature=0.9)  # fmt: skip
    torch.testing.assert_close(shared, plain * completion, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(shared_ent, plain_ent * completion, atol=2e-5, rtol=1e-5)
    assert (shared[~completion] == 0).all()
    with pytest.raises(ValueError, match="at least 1 token"):
        strategy.token_logprobs(ids, mask, prompt_lengths=torch.zeros_like(plen))


def test_packing_probe(tiny_model_dir):
    """The start-up probe passes on a model that packs (gradient checkpointing included: no KV cache is
    involved) and names the problem where it cannot."""
    assert make_strategy(tiny_model_dir).packing_problem() is None
    assert make_strategy(tiny_model_dir, gradient_checkpointing=True).packing
    strategy = make_strategy(tiny_model_dir)
    strategy.module.config.layer_types = ["full_attention", "sliding_attention"]
    strategy.module.config.sliding_window = 8  # shorter than max_model_len: a long prompt would lose keys
    assert "sliding-window" in strategy.packing_problem()
    strategy.module.config.layer_types = None
    strategy.module.config.sliding_window = None
    strategy.module.config.final_logit_softcapping = 30.0  # applied by the forward, not by the lm_head
    assert "final_logit_softcapping" in strategy.packing_problem()


@pytest.mark.parametrize("stage", [0, 3])
def test_shared_prompt_gradients_match_unshared(tiny_model_dir, stage):
    """Gradients flow through the shared prompt's KV cache: the accumulated gradient of every parameter
    equals the unshared one up to fp32 rounding.

    Compared before the optimizer step, not as weights after Adam steps: Adam divides by sqrt(v), so
    a rounding-level gradient difference on an element with a tiny gradient becomes a full-size update
    (weights after two steps differed by 1e-3 of the update on AMD EPYC, not on Intel).
    """
    from deepspeed.utils import safe_get_full_grad

    ids, mask, plen = make_groups_batch()
    completion = ((torch.arange(ids.shape[1])[None] >= plen[:, None]) & mask.bool()).float()
    weight = torch.linspace(-1.0, 1.0, ids.shape[0])
    grads = []
    for share in (False, True):
        strategy = make_strategy(tiny_model_dir, stage, micro_batch_size=4, grad_clip=0.5)
        for part in torch.arange(ids.shape[0]).tensor_split(2):
            logp, _ = strategy.token_logprobs(ids[part], mask[part], prompt_lengths=plen[part] if share else None)
            strategy.backward(-((logp * completion[part]).sum(-1) * weight[part]).sum() / completion.sum())
        grads.append({n: safe_get_full_grad(p).detach().clone() for n, p in strategy.module.named_parameters()})
        strategy.step()
        strategy.close()
    plain, shared = grads
    scale = max(float(g.abs().max()) for g in plain.values())
    assert scale > 1e-3  # a real gradient, not zeros
    for name, g in plain.items():
        # fp32 sums over a few hundred terms: a few ulps of the largest gradient, never more.
        torch.testing.assert_close(shared[name], g, rtol=0, atol=1e-5 * scale, msg=name)


def test_token_logprobs_keep_the_graph(tiny_model_dir):
    strategy = make_strategy(tiny_model_dir, 2)
    ids, mask = make_batch(rows=2)
    logp, _ = strategy.token_logprobs(ids, mask)
    assert logp.requires_grad
    strategy.backward(logp.sum() * 0.0)
    assert strategy.step()["lr"] == pytest.approx(1e-3)
    with pytest.raises(RuntimeError, match="without a backward"):
        strategy.step()


# --------------------------------------------------------------------------- optimisation


def plain_torch_steps(model_dir, ids, mask, steps, lr, clip, warmup):
    """Reference: one backward per step on the full batch, torch AdamW, clipping, LambdaLR warm-up."""
    model = plain_model(model_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_then_constant(warmup))
    normaliser = float(mask.sum())
    norms, lrs = [], []
    for _ in range(steps):
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        logp = logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1) * mask[:, 1:]
        loss_of(logp, mask, normaliser).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        opt.zero_grad()
        sched.step()
    return {k: v.detach() for k, v in model.state_dict().items() if k != "lm_head.weight"}, norms, lrs


def strategy_steps(strategy, ids, mask, micro_batches):
    normaliser = float(mask.sum())
    metrics = []
    for k in micro_batches:
        for part in torch.arange(ids.shape[0]).tensor_split(k):
            logp, _ = strategy.token_logprobs(ids[part], mask[part])
            weight = torch.linspace(-1.0, 1.0, ids.shape[0])[part]
            strategy.backward(-(logp.sum(-1) * weight).sum() / normaliser)
        metrics.append(strategy.step())
    return strategy.gather_state_dict(), metrics


@pytest.mark.parametrize(("stage", "checkpointing"), [(0, False), (1, False), (2, False), (3, False), (3, True)])
def test_steps_match_plain_torch(tiny_model_dir, stage, checkpointing):
    """k micro-batch backward() + step() == one backward of the summed loss, k varying per step."""
    ids, mask = make_batch(rows=6)
    # Clipping active, so the gradient scale must be exact; gradient checkpointing must not change it.
    hyper = dict(lr=1e-3, grad_clip=0.5, warmup_steps=2, gradient_checkpointing=checkpointing)
    expected, norms, lrs = plain_torch_steps(tiny_model_dir, ids, mask, 3, 1e-3, 0.5, 2)

    strategy = make_strategy(tiny_model_dir, stage, **hyper)
    assert strategy.module.is_gradient_checkpointing == checkpointing
    micro, micro_metrics = strategy_steps(strategy, ids, mask, [3, 1, 4])
    whole, whole_metrics = strategy_steps(make_strategy(tiny_model_dir, stage, **hyper), ids, mask, [1, 1, 1])

    # Updates are ~3e-3; fp32 summation order differs by ~1e-6 after Adam's normalisation.
    assert max_diff(micro, whole) < 5e-6
    assert max_diff(micro, expected) < 5e-6
    assert [m["grad_norm"] for m in micro_metrics] == pytest.approx(norms, rel=1e-5)
    assert [m["grad_norm"] for m in whole_metrics] == pytest.approx(norms, rel=1e-5)
    assert [m["lr"] for m in micro_metrics] == pytest.approx(lrs) == [5e-4, 1e-3, 1e-3]


def test_bfloat16_steps(tiny_model_dir):
    strategy = DeepSpeedStrategy(
        ModelConfig(name=str(tiny_model_dir), dtype="bfloat16"),
        TrainerConfig(zero_stage=2, lr=1e-3, threads=1, micro_batch_size=4),
    )
    ids, mask = make_batch(rows=4)
    state, metrics = strategy_steps(strategy, ids, mask, [2, 1])
    assert all(v.dtype == torch.bfloat16 for v in state.values())
    assert all(0 < m["grad_norm"] < float("inf") for m in metrics)


# --------------------------------------------------------------------------- reference model


@pytest.mark.parametrize("stage", [0, 3])
def test_reference_model_stays_frozen(tiny_model_dir, stage):
    strategy = make_strategy(tiny_model_dir, stage, with_reference=True, lr=1e-2)
    ids, mask = make_batch(rows=4)
    with torch.no_grad():
        policy_before, _ = strategy.token_logprobs(ids, mask)
    ref_before, _ = strategy.token_logprobs(ids, mask, reference=True)
    assert not ref_before.requires_grad
    torch.testing.assert_close(ref_before, policy_before)
    strategy_steps(strategy, ids, mask, [2, 2])
    with torch.no_grad():
        policy_after, _ = strategy.token_logprobs(ids, mask)
    ref_after, _ = strategy.token_logprobs(ids, mask, reference=True)
    assert torch.equal(ref_after, ref_before)
    assert (policy_after - policy_before).abs().max() > 1e-3
    assert not any(p.requires_grad for p in strategy.ref_engine.parameters())


def test_reference_needs_with_reference(tiny_model_dir):
    strategy = make_strategy(tiny_model_dir, 0)
    with pytest.raises(RuntimeError, match="with_reference"):
        strategy.token_logprobs(*make_batch(rows=1), reference=True)


# --------------------------------------------------------------------------- weights and checkpoints


@pytest.mark.parametrize("stage", [0, 3])
def test_gathered_weights_load_into_plain_model(tiny_model_dir, tiny_tokenizer, tmp_path, stage):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    from transformers.integrations import is_deepspeed_zero3_enabled

    strategy = make_strategy(tiny_model_dir, stage, lr=1e-2)
    assert not is_deepspeed_zero3_enabled()  # the loading-time ZeRO-3 hook does not leak
    ids, mask = make_batch(rows=4)
    state, _ = strategy_steps(strategy, ids, mask, [2])
    saved_keys = set(load_file(tiny_model_dir / "model.safetensors"))
    assert set(state) == saved_keys  # the keys save_pretrained writes (tied lm_head once)
    assert max_diff(state, load_file(tiny_model_dir / "model.safetensors")) > 1e-3

    model = AutoModelForCausalLM.from_config(plain_model(tiny_model_dir).config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert missing == ["lm_head.weight"] and unexpected == []  # tied: restored by the tie
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        got, _ = strategy.token_logprobs(ids, mask)
        want, _ = plain_logprobs(model, ids, mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    strategy.save_hf(tmp_path / "hf", tiny_tokenizer)
    exported, info = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert max_diff(load_file(tmp_path / "hf" / "model.safetensors"), state) == 0.0
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    assert exported.lm_head.weight.data_ptr() == exported.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("stage", [0, 3])
def test_checkpoint_round_trip_resumes_exactly(tiny_model_dir, tmp_path, stage):
    ids, mask = make_batch(rows=4)
    hyper = dict(lr=1e-2, warmup_steps=4)  # the LR schedule position must survive too
    first = make_strategy(tiny_model_dir, stage, **hyper)
    strategy_steps(first, ids, mask, [2, 1])
    first.save_checkpoint(tmp_path / "ckpt", {"step": 2, "policy_version": 2})
    after_save, next_metrics = strategy_steps(first, ids, mask, [2])

    second = make_strategy(tiny_model_dir, stage, **{**hyper, "seed": 1})
    assert second.load_checkpoint(tmp_path / "ckpt") == {"step": 2, "policy_version": 2}
    resumed, resumed_metrics = strategy_steps(second, ids, mask, [2])
    assert max_diff(after_save, resumed) == 0.0  # weights and Adam moments restored
    assert resumed_metrics == next_metrics
    assert next_metrics[0]["lr"] == pytest.approx(1e-2 * 3 / 4)

    with pytest.raises(FileNotFoundError):
        second.load_checkpoint(tmp_path / "nothing")


def test_single_rank_communication(tiny_model_dir):
    strategy = make_strategy(tiny_model_dir, 0)
    assert (strategy.rank, strategy.world_size, strategy.is_main) == (0, 1, True)
    assert strategy.broadcast_object({"batch": [1, 2]}) == {"batch": [1, 2]}
    strategy.barrier()
    strategy.close()
    assert strategy.engine is None


def test_strategy_after_the_default_group_was_torn_down(tiny_model_dir):
    """An in-process vLLM engine destroys torch's default process group when it shuts down; a strategy
    built afterwards in the same process starts a fresh group instead of DeepSpeed's stale one."""
    import torch.distributed as dist

    make_strategy(tiny_model_dir, 2).close()
    dist.destroy_process_group()
    strategy = make_strategy(tiny_model_dir, 2)
    ids, mask = make_batch(rows=2)
    logp, _ = strategy.token_logprobs(ids, mask)
    strategy.backward(-logp.sum())
    assert strategy.step()["grad_norm"] > 0
