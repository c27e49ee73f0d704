"""Padding-free (tree-packed, chunked-head) forwards against a per-row forward with no padding at all.

The reference for every check is the plain HF model run on one unpadded row at a time; the packed
path (rl/trainer/packing.py through `DeepSpeedStrategy.token_logprobs`) must give the same log-probs,
entropy, loss and parameter gradients in fp32, for a Qwen2 and a Llama (SmolLM2's architecture),
with groups of different prompt lengths, completions of length 1, a row with no completion,
groups split over micro-batches, a temperature and logits chunks of a few positions.
"""

from __future__ import annotations

import pytest
import torch

import rl.trainer.packing
from rl.config import AlgorithmConfig, LoraConfig, ModelConfig, TrainerConfig
from rl.deepspeed_config import build_deepspeed_config
from rl.trainer.loss import LossNorm, policy_loss
from rl.trainer.packing import pack
from rl.trainer.strategy import DeepSpeedStrategy

pytestmark = pytest.mark.filterwarnings("ignore:`torch.distributed.*is deprecated:FutureWarning")

TEMPERATURE = 0.7


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    """A tiny random Llama (SmolLM2's architecture: tied embeddings, GQA, RoPE)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(vocab_size=300, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, torch_dtype="float32")  # fmt: skip
    torch.manual_seed(1)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(params=["qwen2", "llama"])
def model_dir(request, tiny_model_dir, tiny_llama_dir):
    return tiny_model_dir if request.param == "qwen2" else tiny_llama_dir


@pytest.fixture
def small_chunks(monkeypatch):
    """Logits chunks of 3 positions, so every batch here spans several chunks."""
    monkeypatch.setattr(rl.trainer.packing, "chunk_rows", lambda vocab: 3)


def groups_batch(vocab: int, seed: int = 0):
    """Groups with prompts of 1, 5 and 9 tokens, completions of 0-6 tokens (several of 1), interleaved
    so that micro-batches split groups. Returns ids, mask (right-padded), prompt lengths, completion mask."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for p, lengths in ((5, [1, 4, 6]), (1, [3, 1]), (9, [2, 0, 6, 1])):
        prompt = torch.randint(3, vocab, (p,), generator=g).tolist()
        rows += [(prompt, torch.randint(3, vocab, (n,), generator=g).tolist()) for n in lengths]
    rows = rows[::2] + rows[1::2]
    width = max(len(p) + len(c) for p, c in rows) + 2  # spare padding columns
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, (p, c) in enumerate(rows):
        ids[r, : len(p) + len(c)] = torch.tensor(p + c)
        mask[r, : len(p) + len(c)] = 1
    plen = torch.tensor([len(p) for p, _ in rows])
    completion = ((torch.arange(width)[None] >= plen[:, None]) & mask.bool()).float()
    return ids, mask, plen, completion


def per_row(model, ids, mask, temperature=TEMPERATURE):
    """The reference: one unpadded row at a time, full logits -> log-probs and entropy [B, T]."""
    logps, ents = [], []
    for i in range(ids.shape[0]):
        n = int(mask[i].sum())
        logits = model(input_ids=ids[i : i + 1, :n]).logits[0, :-1].float() / temperature
        lsm = logits.log_softmax(-1)
        pad = (1, ids.shape[1] - n)
        logps.append(torch.nn.functional.pad(lsm.gather(-1, ids[i, 1:n, None]).squeeze(-1), pad))
        ents.append(torch.nn.functional.pad(-(lsm.exp() * lsm).sum(-1).detach(), pad))
    return torch.stack(logps), torch.stack(ents)


def make_strategy(model_dir, stage=0, with_reference=False, **trainer) -> DeepSpeedStrategy:
    defaults = dict(zero_stage=stage, lr=1e-3, threads=1, micro_batch_size=4, grad_clip=1e6)
    return DeepSpeedStrategy(ModelConfig(name=str(model_dir)), TrainerConfig(**{**defaults, **trainer}),
                             with_reference=with_reference)  # fmt: skip


def plain_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def test_pack_layout():
    """Each distinct prompt once, then its rows' completions; nothing padded; a completion sees its
    prompt and its own earlier tokens only; positions restart at the prompt length."""
    ids = torch.tensor([[1, 2, 3, 7, 8, 0], [1, 2, 3, 9, 0, 0], [4, 5, 6, 6, 6, 6]])
    mask = (ids != 0).long()
    p = pack(ids, mask, torch.tensor([3, 3, 2]))
    assert p.input_ids.tolist() == [[1, 2, 3, 7, 8, 9, 4, 5, 6, 6, 6, 6]]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 0, 1, 2, 3, 4, 5]]
    assert p.attend[5].tolist() == [True, True, True, False, False, True] + [False] * 6  # 9: prompt + itself
    assert p.attend[4, :5].all() and not p.attend[4, 5:].any()
    assert not p.attend[6, :6].any()  # the second group sees nothing of the first
    # Targets: completion tokens, each predicted by the token before it in its own branch.
    assert p.targets.tolist() == [7, 8, 9, 6, 6, 6, 6]
    assert p.source.tolist() == [2, 3, 2, 7, 8, 9, 10]
    assert list(zip(p.rows.tolist(), p.cols.tolist(), strict=True)) == [(0, 3), (0, 4), (1, 3), (2, 2), (2, 3),
                                                                       (2, 4), (2, 5)]  # fmt: skip


@pytest.mark.parametrize("share", [True, False])
def test_logprobs_and_entropy_match_per_row(model_dir, small_chunks, share):
    ids, mask, plen, completion = groups_batch(vocab=300)
    strategy = make_strategy(model_dir, micro_batch_size=5)
    assert strategy.packing
    with torch.no_grad():
        want, want_ent = per_row(plain_model(model_dir), ids, mask)
        got, got_ent = strategy.token_logprobs(ids, mask, prompt_lengths=plen if share else None,
                                               with_entropy=True, temperature=TEMPERATURE)  # fmt: skip
    keep = completion if share else mask * (torch.arange(ids.shape[1]) > 0)  # share: completion positions only
    torch.testing.assert_close(got, want * keep, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_ent, want_ent * keep, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("loss", ["dapo", "gspo"])
def test_loss_and_gradients_match_per_row(model_dir, small_chunks, loss):
    """The policy loss over micro-batches and every parameter's gradient equal the per-row path's."""
    from deepspeed.utils import safe_get_full_grad

    ids, mask, plen, completion = groups_batch(vocab=300, seed=1)
    algo = AlgorithmConfig(loss=loss)
    advantages = torch.linspace(-1.0, 1.0, ids.shape[0])
    norm = LossNorm.from_batch(completion, micro_batch_size=4)
    parts = torch.arange(ids.shape[0]).split(4)
    behaviour = per_row(plain_model(model_dir), ids, mask)[0].detach() + 0.01  # a little off-policy

    def loss_of(logp, part):
        return policy_loss(logp, None, advantages[part], completion[part], algo, loss_norm=norm,
                           behaviour_logprobs=behaviour[part])[0]  # fmt: skip

    model = plain_model(model_dir)
    want_loss = 0.0
    for part in parts:
        logp, _ = per_row(model, ids[part], mask[part])
        value = loss_of(logp, part)
        value.backward()
        want_loss += float(value.detach())
    want = {n: p.grad for n, p in model.named_parameters()}

    strategy = make_strategy(model_dir)
    got_loss = 0.0
    for part in parts:
        logp, _ = strategy.token_logprobs(ids[part], mask[part], prompt_lengths=plen[part], temperature=TEMPERATURE)
        value = loss_of(logp, part)
        strategy.backward(value)
        got_loss += float(value.detach())
    assert got_loss == pytest.approx(want_loss, rel=1e-5, abs=1e-6)
    scale = max(float(g.abs().max()) for g in want.values())
    assert scale > 1e-3
    for name, p in strategy.module.named_parameters():
        torch.testing.assert_close(safe_get_full_grad(p), want[name], rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_reference_model_path(tiny_model_dir):
    ids, mask, plen, completion = groups_batch(vocab=300, seed=2)
    strategy = make_strategy(tiny_model_dir, with_reference=True)
    with torch.no_grad():
        want, _ = per_row(plain_model(tiny_model_dir), ids, mask, temperature=1.0)
    got, _ = strategy.token_logprobs(ids, mask, prompt_lengths=plen, reference=True)
    assert not got.requires_grad
    torch.testing.assert_close(got, want * completion, atol=1e-5, rtol=1e-5)


def test_lora_packed_matches_padded(tiny_model_dir, small_chunks):
    """With peft's wrapper around the model: packed log-probs and adapter gradients equal the padded
    fallback's (the decoder and lm_head are found through the wrapper)."""
    from deepspeed.utils import safe_get_full_grad

    ids, mask, plen, completion = groups_batch(vocab=300, seed=3)
    results = []
    for packing in (False, True):
        strategy = make_strategy(tiny_model_dir, lora=LoraConfig(r=4, alpha=8.0))
        for name, p in strategy.module.named_parameters():  # B = 0 at init: give the adapters a real effect
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(len(name)))
        strategy.packing = packing
        logp, _ = strategy.token_logprobs(ids, mask, prompt_lengths=plen, temperature=TEMPERATURE)
        strategy.backward(-((logp * completion).sum(-1) * torch.linspace(-1, 1, ids.shape[0])).sum())
        grads = {n: safe_get_full_grad(p).clone() for n, p in strategy.module.named_parameters() if p.requires_grad}
        results.append(((logp * completion).detach(), grads))
        strategy.close()
    (padded, padded_grads), (packed, packed_grads) = results
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-5)
    assert padded_grads and padded_grads.keys() == packed_grads.keys()
    for name, g in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_token_statistics_packed_matches_padded(tiny_model_dir, small_chunks):
    ids, mask, plen, _ = groups_batch(vocab=300, seed=4)

    def fn(logits, targets):  # the target's logprob and the max logit: needs the full logits rows
        lsm = logits.float().log_softmax(-1)
        return torch.stack([lsm.gather(-1, targets[..., None]).squeeze(-1), logits.float().amax(-1)], -1)

    strategy = make_strategy(tiny_model_dir)
    packed = strategy.token_statistics(ids, mask, fn, 2)
    strategy.packing = False
    padded = strategy.token_statistics(ids, mask, fn, 2)
    assert packed.abs().sum() > 0
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-5)
    strategy.packing = True  # prompts shared: the completion positions alone, the same values there
    shared = strategy.token_statistics(ids, mask, fn, 2, prompt_lengths=plen)
    completion = (torch.arange(ids.shape[1])[None] >= plen[:, None]) & mask.bool()
    torch.testing.assert_close(shared[completion], padded[completion], atol=1e-5, rtol=1e-5)
    assert shared[~completion].abs().sum() == 0 and completion.sum() < mask.sum() - ids.shape[0]


def test_one_rank_runs_zero0_unless_told():
    """ZeRO-1/2 partition over nothing on one rank: the default JSON (stage 2) runs as stage 0 there;
    an explicit trainer.zero_stage, an offloading config, stage 3 and several ranks keep their stage."""

    def stage(world_size, **trainer):
        cfg = build_deepspeed_config(ModelConfig(), TrainerConfig(**trainer), world_size=world_size)
        return cfg["zero_optimization"]["stage"]

    assert stage(1) == 0
    assert stage(2) == 2
    assert stage(None) == 2  # the planner's view: no rank count, the JSON as written
    assert stage(1, zero_stage=2) == 2
    assert stage(1, deepspeed="configs/deepspeed/zero3.json") == 3
    offload = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    assert stage(1, deepspeed=offload) == 2
