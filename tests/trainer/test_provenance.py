"""Provenance checks (rl/trainer/provenance.py): honest samples pass, forged and injected ones are masked.

Pure-function tests on random logits (CPU, fast), then the real trainer (DeepSpeed, tiny model)
checking a batch that mixes honest samples of the model with forged and injected sequences.
"""

from __future__ import annotations

import pytest
import torch
from helpers.seeded import seeded_completion

from rl.config import TrustConfig, load_config
from rl.trainer.loss import LossNorm, policy_loss
from rl.trainer.provenance import (
    DRAW,
    NUM_STATS,
    OUTSIDE,
    REASONS,
    RECOMPUTED,
    check_sequences,
    draw_tolerance,
    mask_rejected,
    off_seeded_draw,
    special_token_rows,
    token_statistics,
)

CFG = TrustConfig()


def sample(logits: torch.Tensor, temperature: float, gen: torch.Generator) -> torch.Tensor:
    """Honest sampling at `temperature` from logits [B, T, V] -> tokens [B, T]."""
    probs = (logits / temperature).softmax(-1)
    return torch.multinomial(probs.view(-1, probs.shape[-1]), 1, generator=gen).view(probs.shape[:2])


def random_logits(batch=64, length=24, vocab=300, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Peaked and flat positions mixed, like a real model's.
    return torch.randn(batch, length, vocab, generator=g) * torch.rand(batch, length, 1, generator=g) * 6


def verdict(logits, tokens, claimed=None, temperature=1.0, top_p=1.0, top_k=-1, cfg=CFG):
    stats = token_statistics(logits, tokens, temperature, top_p, top_k)
    claimed = stats[..., RECOMPUTED] if claimed is None else claimed
    return check_sequences(stats, claimed, torch.ones_like(tokens, dtype=torch.float32), cfg), stats


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_honest_samples_pass(temperature):
    logits = random_logits()
    tokens = sample(logits, temperature, torch.Generator().manual_seed(1))
    v, _ = verdict(logits, tokens, temperature=temperature)
    assert v.accepted.all(), v.counts()
    assert abs(float(v.z.mean())) < 0.5 and 0.5 < float(v.z.std()) < 1.5  # about standard normal


def test_small_logprob_noise_passes_and_forged_logprobs_fail():
    logits = random_logits()
    tokens = sample(logits, 1.0, torch.Generator().manual_seed(2))
    stats = token_statistics(logits, tokens, 1.0)
    bf16_like = stats[..., RECOMPUTED] + 0.05 * torch.randn(tokens.shape, generator=torch.Generator().manual_seed(3))
    ones = torch.ones_like(tokens, dtype=torch.float32)
    assert check_sequences(stats, bf16_like, ones, CFG).accepted.all()
    forged = torch.full_like(bf16_like, -20.0)  # very negative: the largest importance weight
    v = check_sequences(stats, forged, ones, CFG)
    assert (v.codes == REASONS.index("logprob_mismatch") + 1).all()
    one_token = stats[..., RECOMPUTED].clone()
    one_token[:, 3] -= 15.0  # a single forged position
    assert not check_sequences(stats, one_token, ones, CFG).accepted.any()


def test_injected_and_greedy_sequences_are_atypical():
    logits = random_logits(length=16)
    unlikely = logits.argmin(-1)  # text the policy would not write (an injected answer), true logprobs claimed
    v, _ = verdict(logits, unlikely)
    assert (v.codes == REASONS.index("atypical_unlikely") + 1).all()
    logits = random_logits(length=96)  # the evidence against greedy decoding grows with length (~sqrt)
    greedy = logits.argmax(-1)  # decoding passed off as sampling at temperature 1
    v, _ = verdict(logits, greedy)
    assert (v.codes == REASONS.index("atypical_likely") + 1).float().mean() > 0.9


def test_top_p_support():
    logits = torch.tensor([[[5.0, 4.0, 0.0, -2.0]] * 10])
    inside = torch.zeros(1, 10, dtype=torch.long)
    outside = torch.full((1, 10), 3)
    stats = token_statistics(logits, outside, 1.0, top_p=0.9)
    assert stats[..., OUTSIDE].sum() == 10
    assert token_statistics(logits, inside, 1.0, top_p=0.9)[..., OUTSIDE].sum() == 0
    v, _ = verdict(logits, outside, top_p=0.9)
    assert v.codes.tolist() == [REASONS.index("outside_sampling_support") + 1]
    assert token_statistics(logits, outside, 1.0, top_k=2)[..., OUTSIDE].sum() == 10


def test_special_tokens_only_as_the_final_stop():
    ids = torch.tensor([[9, 9, 5, 6, 2], [9, 9, 5, 1, 6], [9, 9, 2, 5, 0], [9, 9, 5, 6, 0]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 1, 1, 0]])
    assert special_token_rows(ids, mask, [0, 1, 2], [2]).tolist() == [False, True, True, False]
    drawn = torch.zeros_like(mask, dtype=torch.bool)
    drawn[1, 3] = drawn[2, 2] = drawn[2, 4] = True  # the policy's own seeded draws: not a special token to mask
    assert special_token_rows(ids, mask, [0, 1, 2], [2], drawn).tolist() == [False, False, False, False]
    drawn[1, 3] = False
    assert special_token_rows(ids, mask, [0, 1, 2], [2], drawn).tolist() == [False, True, False, False]


def test_mask_rejected_zeroes_rows_and_keeps_the_baseline_honest():
    mask = torch.ones(6, 5)
    rewards = torch.tensor([0.0, 1.0, 1.0, 0.0, 0.0, 0.0])  # groups of 3
    accepted = torch.tensor([True, True, False, False, False, False])
    new_mask, new_rewards = mask_rejected(mask, rewards, accepted, group_size=3)
    assert new_mask.sum(-1).tolist() == [5, 5, 0, 0, 0, 0]
    assert new_rewards.tolist() == [0.0, 1.0, 0.5, 0.0, 0.0, 0.0]  # forged 1.0 -> the accepted ones' mean


def test_masked_sequence_contributes_no_gradient():
    cfg = load_config(None, ["algorithm.is_mode=token_truncate"]).algorithm
    logp = torch.randn(2, 4, requires_grad=True)
    behaviour = torch.tensor([[-30.0] * 4, [-1.0] * 4])  # row 0: fabricated, masked
    mask = torch.tensor([[0.0] * 4, [1.0] * 4])
    norm = LossNorm.from_batch(mask)
    loss, metrics = policy_loss(logp, None, torch.tensor([5.0, 1.0]), mask, cfg, behaviour_logprobs=behaviour,
                                loss_norm=norm)  # fmt: skip
    loss.backward()
    assert torch.all(logp.grad[0] == 0) and torch.any(logp.grad[1] != 0)
    assert float(metrics["tokens"]) == 4


@pytest.mark.slow
def test_trainer_masks_forged_and_injected_sequences(tmp_path, tiny_model_dir):
    """Real trainer: honest samples of the tiny model pass; forged logprobs and injected text are masked."""
    from transformers import AutoModelForCausalLM

    from rl.trainer.batch import build_batch
    from rl.trainer.loop import Trainer
    from rl.wire.protocol import ScoredCompletion, ScoredGroup

    cfg = load_config(None, [f"model.name={tiny_model_dir}", f"run_dir={tmp_path}", "logging.wandb.mode=disabled",
                             "sampling.n=4", "trainer.prompts_per_step=4", "trainer.micro_batch_size=4",
                             "trainer.threads=1", "sampling.max_tokens=16"])  # fmt: skip
    trainer = Trainer(cfg, hub=None)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    torch.manual_seed(0)
    groups = []
    for t in range(4):
        prompt = torch.tensor([[1, 40 + t, 50 + t, 60 + t]])
        out = model.generate(prompt, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=16,
                             min_new_tokens=16, num_return_sequences=4, pad_token_id=0,
                             suppress_tokens=[0, 1])  # fmt: skip
        with torch.no_grad():
            logp = model(out).logits[:, :-1].log_softmax(-1).gather(-1, out[:, 1:, None]).squeeze(-1)
        comps = []
        for j in range(4):
            ids, lps = out[j, 4:].tolist(), logp[j, 3:].tolist()
            comps.append(ScoredCompletion(token_ids=ids, logprobs=lps, finish_reason="length", reward=0.0,
                                          components={}))  # fmt: skip
        groups.append(ScoredGroup(task_id=t, row_index=t, prompt_token_ids=prompt[0].tolist(), policy_version=0,
                                  worker_id=f"w{t}", worker_name="test", completions=comps))  # fmt: skip
    # Group 1, sequence 0: fabricated logprobs. Group 2, sequence 0: the least likely tokens, with their true
    # logprobs and a reward of 1 (an injected "correct answer").
    forged = groups[1].completions[0]
    groups[1].completions[0] = forged.model_copy(update={"logprobs": [-25.0] * len(forged.token_ids)})
    with torch.no_grad():
        ids = [1, 42, 52, 62]
        for _ in range(16):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmin()))
        full = torch.tensor([ids])
        lp = model(full).logits[:, :-1].log_softmax(-1).gather(-1, full[:, 1:, None]).squeeze(-1)[0, 3:].tolist()
    groups[2].completions[0] = ScoredCompletion(token_ids=ids[4:], logprobs=lp, finish_reason="length", reward=1.0,
                                                components={})  # fmt: skip
    batch, metrics = trainer.verify(build_batch(groups, trainer.pad_id), groups)
    masked = [i for i in range(batch.num_sequences) if batch.completion_mask[i].sum() == 0]
    assert masked == [4, 8], metrics
    assert metrics["trust/rejected/logprob_mismatch"] == 1 and metrics["trust/rejected/atypical_unlikely"] == 1
    assert batch.rewards[8] == 0.0  # the injected reward no longer moves its group's baseline
    step = trainer.train_step(batch)
    assert step["tokens"] == 14 * 16


def test_tokens_that_are_not_the_seeded_draw_are_masked():
    """Verifiable sampling in the trainer's check: seeded draws pass; another completion under the same seeds
    (best-of-N, another temperature) fails `not_seeded_draw`."""
    from rl.config import TrustConfig
    from rl.sampling import SamplingRule, draws, uniforms

    torch.manual_seed(0)
    b, t, v = 6, 12, 40
    logits = torch.randn(b, t, v) * 2
    seeds = torch.arange(b, dtype=torch.long) * 7919 + 3
    u = uniforms(seeds[:, None].expand(b, t), torch.arange(t).expand(b, t))
    honest = draws(logits.reshape(-1, v), SamplingRule(1.0), u.reshape(-1)).reshape(b, t)
    other = draws(logits.reshape(-1, v), SamplingRule(1.0), uniforms(seeds[:, None].expand(b, t) + 1,
                  torch.arange(t).expand(b, t)).reshape(-1)).reshape(b, t)  # fmt: skip
    cfg = TrustConfig(typicality_z=1e9, max_mean_logprob_diff=1e9, max_token_logprob_diff=1e9)
    mask = torch.ones(b, t)
    for tokens, want in ((honest, 0), (other, REASONS.index("not_seeded_draw") + 1)):
        stats = token_statistics(logits, tokens, 1.0, u=u)
        claimed = stats[..., RECOMPUTED]
        codes = check_sequences(stats, claimed, mask, cfg).codes
        assert (codes == want).all(), (codes, stats[..., DRAW].amax(-1))
    assert float(token_statistics(logits, honest, 1.0, u=u)[..., DRAW].max()) == 0.0


def test_one_token_per_sequence_may_lose_the_race_by_more():
    """bf16 workers: every token within `draw_tolerance` (0.75), one per sequence within `draw_tolerance_once`
    (2.5): an honest close race tipped by rounding passes, two such tokens or one far-off token do not."""
    assert draw_tolerance(TrustConfig(), "bfloat16", "float32") == (0.75, 2.5)
    assert draw_tolerance(TrustConfig(), "float32", "float32") == (0.01, 0.01)
    assert draw_tolerance(TrustConfig(draw_tolerance=1.0, draw_tolerance_once=0.5), "bfloat16", "float32") == (1, 1)
    distance = torch.zeros(5, 8)
    distance[1, 3] = 0.7  # within tol
    distance[2, 3] = 1.5  # one token within once
    distance[3, [2, 5]] = 1.0  # two tokens beyond tol
    distance[4, 6] = 2.6  # one token beyond once
    assert off_seeded_draw(distance, 0.75, 2.5).tolist() == [False, False, False, True, True]
    assert off_seeded_draw(distance, 0.75, 0.75).tolist() == [False, False, True, True, True]
    stats = torch.zeros(5, 8, NUM_STATS)
    stats[..., DRAW] = distance
    codes = check_sequences(stats, stats[..., RECOMPUTED], torch.ones(5, 8), CFG).codes.tolist()
    assert codes == [0, 0, 0] + [REASONS.index("not_seeded_draw") + 1] * 2


def test_trainer_masks_a_best_of_n_pick_among_seeded_samples(tmp_path, tiny_model_dir):
    """Real trainer, seeded groups: the hub's seeded draws pass; a completion drawn under other seeds and
    submitted under the hub's (best-of-N) is masked `not_seeded_draw`. The draw check is exact only for groups
    of the version the trainer holds: a group of an older version is not draw-checked (docs/security.md)."""
    from transformers import AutoModelForCausalLM

    from rl.sampling import completion_seeds
    from rl.trainer.batch import build_batch
    from rl.trainer.loop import Trainer
    from rl.wire.protocol import ScoredGroup

    cfg = load_config(None, [f"model.name={tiny_model_dir}", f"run_dir={tmp_path}", "logging.wandb.mode=disabled",
                             "sampling.n=4", "trainer.prompts_per_step=3", "trainer.micro_batch_size=4",
                             "trainer.threads=1", "sampling.max_tokens=12"])  # fmt: skip
    trainer = Trainer(cfg, hub=None)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()

    groups = []
    for t in range(3):
        prompt, seeds = [1, 40 + t, 50 + t, 60 + t], completion_seeds(7, t, 4)
        comps = [seeded_completion(model, prompt, s) for s in seeds]
        if t > 0:  # a best-of-N pick: completion 0 drawn under a seed the worker chose
            comps[0] = seeded_completion(model, prompt, seeds[0] + 12345)
        groups.append(ScoredGroup(task_id=t, row_index=t, prompt_token_ids=prompt, policy_version=0 if t < 2 else 5,
                                  worker_id=f"w{t}", worker_name="test", completions=comps, seeds=seeds))  # fmt: skip
    batch, metrics = trainer.verify(build_batch(groups, trainer.pad_id), groups)
    masked = [i for i in range(batch.num_sequences) if batch.completion_mask[i].sum() == 0]
    # group 1's pick is masked; group 2's pick is of another version, not draw-checked. Honest draws of the
    # tiny random model may contain a special token: masked for that only where the draws are not checked.
    assert metrics["trust/rejected/not_seeded_draw"] == 1 and 4 in masked
    assert [i for i in masked if i < 8] == [4], masked
    assert len(masked) == 1 + metrics["trust/rejected/special_token"], masked
    assert metrics["trust/draws_checked_fraction"] == pytest.approx(2 / 3)
    assert metrics["trust/draw_distance_max"] > 0.75  # the pick's


def test_groups_one_version_behind_are_checked_against_the_weights_that_made_them(tmp_path, tiny_model_dir):
    """After an optimizer step the trainer keeps the weights it replaced: seeded groups of that version pass the
    draw check against them (after a large step), and a pick among them fails."""
    from transformers import AutoModelForCausalLM

    from rl.sampling import completion_seeds
    from rl.trainer.batch import build_batch
    from rl.trainer.loop import Trainer
    from rl.wire.protocol import ScoredGroup

    cfg = load_config(None, [f"model.name={tiny_model_dir}", f"run_dir={tmp_path}", "logging.wandb.mode=disabled",
                             "sampling.n=4", "trainer.prompts_per_step=2", "trainer.micro_batch_size=4",
                             "trainer.threads=1", "sampling.max_tokens=12", "trainer.lr=0.05",
                             "trainer.warmup_steps=0"])  # fmt: skip
    trainer = Trainer(cfg, hub=None)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()  # version 0's weights

    def group(t: int, pick: bool = False) -> ScoredGroup:
        prompt, seeds = [1, 40 + t, 50 + t, 60 + t], completion_seeds(11, t, 4)
        comps = [seeded_completion(model, prompt, s, float(j)) for j, s in enumerate(seeds)]
        if pick:
            comps[0] = seeded_completion(model, prompt, seeds[0] + 999, 0.0)
        return ScoredGroup(task_id=t, row_index=t, prompt_token_ids=prompt, policy_version=0, worker_id="w",
                           worker_name="test", completions=comps, seeds=seeds)  # fmt: skip

    first = [group(0), group(1)]
    batch, _ = trainer.verify(build_batch(first, trainer.pad_id), first)
    trainer.train_step(batch)  # keeps version 0's weights, then steps
    trainer.step = 1
    assert list(trainer.strategy.kept) == [0]
    later = [group(2), group(3, pick=True)]
    batch, metrics = trainer.verify(build_batch(later, trainer.pad_id), later)
    masked = [i for i in range(batch.num_sequences) if batch.completion_mask[i].sum() == 0]
    assert metrics["trust/draws_checked_fraction"] == 1.0
    assert metrics["trust/rejected/not_seeded_draw"] == 1 and masked == [4], metrics  # every draw checked
    trainer.strategy.kept.clear()  # without the kept weights, version 0 groups are not draw-checked
    _, stale = trainer.verify(build_batch(later, trainer.pad_id), later)
    assert stale["trust/draws_checked_fraction"] == 0.0
