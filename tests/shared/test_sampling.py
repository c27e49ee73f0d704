"""The pure functions of verifiable sampling (rl/sampling.py): the seeded uniform, the per-token Gumbel noise,
the processed distribution, the Gumbel-max draw and the trainer's batched check, including its tolerance for a
worker whose logits differ a little from the trainer's (bf16 against fp32)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rl.sampling import (
    SamplingRule,
    check_draws,
    draw,
    draws,
    gumbels,
    processed_probs,
    seed_tensor,
    token_gumbel,
    uniform,
    uniforms,
)

SEEDS = st.integers(min_value=0, max_value=2**64 - 1)
POSITIONS = st.integers(min_value=0, max_value=2**40)
RULES = st.builds(
    SamplingRule,
    temperature=st.sampled_from([0.0, 0.3, 0.7, 1.0, 1.5]),
    top_k=st.sampled_from([-1, 0, 1, 2, 5, 100]),
    top_p=st.sampled_from([1.0, 0.99, 0.9, 0.5, 0.1]),
)
# Small integer logits: many exact ties, to pin down the tie rules.
LOGITS = st.integers(min_value=1, max_value=5).flatmap(
    lambda rows: st.integers(min_value=1, max_value=40).flatmap(
        lambda vocab: st.lists(
            st.lists(st.integers(min_value=-6, max_value=6), min_size=vocab, max_size=vocab),
            min_size=rows,
            max_size=rows,
        )
    )
)


def test_uniform_known_values():
    """Golden values: changing the hash changes what every worker and the trainer must agree on."""
    assert uniform(0, 0) == 0.6524484863740322
    assert uniform(1, 5) == 0.7743991716672016
    assert uniform(2**64 - 1, 3) == 0.9269618291063265
    assert uniform(-1, 3) == uniform(2**64 - 1, 3)  # seeds are taken mod 2**64


@settings(max_examples=300, deadline=None)
@given(seeds=st.lists(SEEDS, min_size=1, max_size=20), position=POSITIONS)
def test_vectorised_uniform_is_bit_identical(seeds, position):
    positions = torch.arange(len(seeds), dtype=torch.int64) + position
    vector = uniforms(seed_tensor(seeds), positions).tolist()
    assert vector == [uniform(s, position + i) for i, s in enumerate(seeds)]
    assert all(0.0 <= u < 1.0 for u in vector)
    # one int seed for a whole completion, as the trainer calls it
    assert uniforms(seeds[0], positions).tolist() == [uniform(seeds[0], position + i) for i in range(len(seeds))]


def test_uniforms_look_uniform():
    u = uniforms(12345, torch.arange(100_000))
    counts = torch.histc(u.float(), bins=10, min=0.0, max=1.0)
    assert counts.min() > 9_600 and counts.max() < 10_400
    assert abs(float(u.mean()) - 0.5) < 0.005


def test_token_gumbel_known_values():
    """Golden values of the per-token noise (the engines' float32 copy must stay within rounding of them)."""
    assert token_gumbel(0.5, 0) == pytest.approx(0.0238020164, abs=1e-9)
    assert token_gumbel(0.5, 49151) == pytest.approx(0.2500596751, abs=1e-9)
    assert token_gumbel(uniform(7, 3), 12) == pytest.approx(-0.1338826203, abs=1e-9)


@settings(max_examples=100, deadline=None)
@given(u=st.lists(st.floats(0.0, 1.0, exclude_max=True), min_size=1, max_size=4), vocab=st.integers(1, 70_000))
def test_vectorised_gumbels_match_the_reference(u, vocab):
    noise = gumbels(torch.tensor(u, dtype=torch.float64), vocab)
    assert noise.shape == (len(u), vocab) and noise.dtype == torch.float32 and torch.isfinite(noise).all()
    tokens = sorted({0, vocab - 1, vocab // 2, vocab // 3})
    want = torch.tensor([[token_gumbel(x, t) for t in tokens] for x in u], dtype=torch.float64)
    # float32 logs: g = -log(-log1p(-w)) is ill-conditioned as w -> 1 (e^-g = -log1p(-w) -> inf), where a
    # float32 rounding of w (relative 2^-24) moves g by about 2^-24 w / ((1 - w) |log1p(-w)|).
    w = 1.0 - torch.exp(-torch.exp(-want))
    bound = 2e-5 + 1e-5 * want.abs() + 4 * 2.0**-24 * w / ((1 - w) * torch.log1p(-w).abs())
    got = noise[:, tokens].double()
    assert ((got - want).abs() <= bound).all(), (got, want, bound)


def test_gumbels_look_gumbel():
    noise = gumbels(uniforms(3, torch.arange(20)), 10_000).double()
    assert abs(float(noise.mean()) - 0.5772) < 0.01  # Euler-Mascheroni
    assert abs(float(noise.var()) - torch.pi**2 / 6) < 0.03
    assert float((noise[:10] - noise[10:]).mean()).__abs__() < 0.02  # positions are independent


@settings(max_examples=300, deadline=None)
@given(logits=LOGITS, rule=RULES, data=st.data())
def test_the_draw_is_accepted_at_distance_zero(logits, rule, data):
    x = torch.tensor(logits, dtype=torch.float32)
    u = torch.tensor(data.draw(st.lists(st.floats(0.0, 1.0, exclude_max=True), min_size=len(logits),
                                        max_size=len(logits))), dtype=torch.float64)  # fmt: skip
    tokens = draws(x, rule, u)
    probs = processed_probs(x, rule)
    assert (probs.gather(-1, tokens[:, None]) > 0).all()  # never a token the rule removed
    accepted, distance = check_draws(x, tokens, u, rule, tol=0.0, chunk_rows=2)
    assert accepted.all() and (distance == 0).all()
    assert [draw(x[i], rule, float(u[i])) for i in range(len(logits))] == tokens.tolist()


@settings(max_examples=300, deadline=None)
@given(logits=LOGITS, rule=RULES, eps=st.sampled_from([1e-3, 0.01, 0.1, 0.5]), data=st.data())
def test_a_worker_within_eps_of_the_trainer_is_within_two_eps(logits, rule, eps, data):
    """The tolerance's guarantee: logits off by at most eps each (bf16 rounding, other kernels) move a draw's
    distance by at most 2 eps, however near the race or the top-k edge (top-p: mass, so only about)."""
    trainer = torch.tensor(logits, dtype=torch.float64) + 0.37 * torch.arange(len(logits[0])) % 1.0
    noise = torch.tensor(data.draw(st.lists(st.lists(st.floats(-eps, eps), min_size=len(logits[0]),
                                                     max_size=len(logits[0])), min_size=len(logits),
                                            max_size=len(logits))), dtype=torch.float64)  # fmt: skip
    u = uniforms(data.draw(SEEDS), torch.arange(len(logits)))
    worker = draws(trainer + noise, rule, u)
    distance = check_draws(trainer, worker, u, rule, tol=0.0)[1]
    bound = 2 * eps * (1.0 if rule.top_p >= 1.0 else 1.5) + 1e-5  # float32 noise and scores
    assert (distance <= bound).all(), (distance.tolist(), bound)


def test_a_near_tie_flipped_by_bf16_rounding_passes_and_a_clear_loser_does_not():
    """The case that masked honest sequences: the worker's bf16 logits flip a close race. Trainer logits are
    fp32; the worker's are the same rounded to bf16; token 2 loses the race to token 1 by a few thousandths
    of a nat for the trainer and wins it for the worker."""
    u = torch.tensor([uniform(11, 0)], dtype=torch.float64)
    g = gumbels(u, 6)[0].double()
    trainer = (torch.tensor([1.0, 3.0, 2.0, -1.0, 0.0, 0.5], dtype=torch.float64) - g).unsqueeze(0)
    trainer[0, 1] = 3.5 + 0.007  # bf16 steps are 1/64 here: the worker's logit rounds down by 0.007
    flips = []
    for lead in (i / 1000 for i in range(1, 16)):
        trainer[0, 2] = trainer[0, 1] + g[1] - g[2] - lead  # scores: token 2 = token 1 - lead
        worker_logits = trainer.float().bfloat16().double()
        if draws(worker_logits, SamplingRule(1.0), u).item() == 2:
            flips.append((lead, trainer.clone(), float((worker_logits - trainer).abs().max())))
    assert flips, "bf16 rounding flips the race for some lead under 0.015 nats"
    for lead, logits, error in flips:
        assert draws(logits, SamplingRule(1.0), u).item() == 1  # the trainer's own draw
        accepted, distance = check_draws(logits, torch.tensor([2]), u, SamplingRule(1.0), tol=0.05)
        assert accepted.item() and distance.item() == pytest.approx(lead, abs=1e-6) and lead <= 2 * error, error
        for loser in (0, 3, 4, 5):  # every other token is a nat or more behind: rejected
            assert not check_draws(logits, torch.tensor([loser]), u, SamplingRule(1.0), tol=0.5)[0].item()


def test_a_tolerance_bounds_what_an_operator_can_choose():
    """With tolerance tol, an operator may submit any accepted token: P(accepted) <= exp(tol / T) x its
    probability (the race's guarantee), measured over many positions for a rare and a likely token."""
    logits = torch.log(torch.tensor([[0.02, 0.6, 0.08, 0.3]], dtype=torch.float64))
    u = uniforms(5, torch.arange(40_000))
    for tol in (0.1, 0.5):
        for token, p in ((0, 0.02), (1, 0.6), (2, 0.08)):
            accepted = check_draws(logits.expand(len(u), -1), torch.full((len(u),), token), u, SamplingRule(1.0),
                                   tol=tol, chunk_rows=4096)[0]  # fmt: skip
            share = float(accepted.double().mean())
            assert p * 0.95 < share < min(1.0, p * 1.05 * torch.e**tol), (tol, token, share)


@settings(max_examples=200, deadline=None)
@given(logits=LOGITS, rule=RULES)
def test_processed_probs_is_a_distribution_that_respects_top_k(logits, rule):
    probs = processed_probs(torch.tensor(logits, dtype=torch.float32), rule)
    assert probs.dtype == torch.float64
    assert torch.allclose(probs.sum(-1), torch.ones(len(logits), dtype=torch.float64))
    kept = (probs > 0).sum(-1)
    if rule.greedy:
        assert (kept == 1).all()
    elif rule.top_k > 0:
        assert (kept <= rule.top_k).all()


def test_ties_go_to_the_lowest_token_id():
    flat = torch.zeros(1, 8)
    assert draws(flat, SamplingRule(temperature=0.0), torch.tensor([0.99])).item() == 0
    probs = processed_probs(flat, SamplingRule(temperature=1.0, top_k=3))
    assert probs[0].tolist() == pytest.approx([1 / 3] * 3 + [0.0] * 5)
    top_p = processed_probs(flat, SamplingRule(temperature=1.0, top_p=0.3))  # 3 tokens of 1/8 reach 0.3
    assert (top_p[0] > 0).tolist() == [True] * 3 + [False] * 5


def test_top_p_keeps_the_tokens_whose_preceding_mass_is_below_p():
    logits = torch.log(torch.tensor([[0.2, 0.5, 0.3]]))
    probs = processed_probs(logits, SamplingRule(temperature=1.0, top_p=0.75))[0].tolist()
    assert probs == pytest.approx([0.0, 0.625, 0.375])  # 0.2 comes after 0.8 of mass
    probs = processed_probs(logits, SamplingRule(temperature=1.0, top_p=0.1))[0].tolist()
    assert probs == pytest.approx([0.0, 1.0, 0.0])  # the first always stays


def test_temperature_scales_the_logits():
    logits = torch.tensor([[1.0, 2.0, 0.5]])
    probs = processed_probs(logits, SamplingRule(temperature=0.5))
    assert torch.allclose(probs, torch.softmax(logits.double() * 2, dim=-1))


def test_draws_follow_the_distribution():
    """Gumbel-max: over many seeded positions each token's share is its processed probability."""
    logits = torch.tensor([[0.3, -1.0, 2.0, 0.0, 1.0]])
    for rule in (SamplingRule(temperature=0.8, top_k=4), SamplingRule(temperature=1.3, top_p=0.8)):
        probs = processed_probs(logits, rule)[0]
        u = uniforms(2, torch.arange(100_000))
        share = torch.bincount(draws(logits.expand(len(u), -1), rule, u), minlength=5).double() / len(u)
        assert torch.allclose(share, probs, atol=5e-3), (share, probs)


def test_check_measures_how_far_the_token_loses_the_race():
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]] * 2, dtype=torch.float64)
    u = uniforms(9, torch.arange(2))
    for temperature in (1.0, 0.5):
        rule = SamplingRule(temperature)
        scores = logits / temperature + gumbels(u, 4).double()
        for token in range(4):
            want = temperature * (scores.amax(-1) - scores[:, token])  # raw-logit nats
            got = check_draws(logits, torch.full((2,), token), u, rule, tol=0.0)[1]
            assert torch.allclose(got, want, atol=1e-9)
    greedy = check_draws(logits, torch.tensor([2, 0]), u, SamplingRule(0.0), tol=0.5)
    assert greedy[1].tolist() == [0.0, 2.0] and greedy[0].tolist() == [True, False]


def test_top_k_and_top_p_edges():
    """A token just outside the top-k / top-p set is at distance = how far outside; far outside is rejected."""
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.99, -5.0]], dtype=torch.float64)
    u = torch.tensor([0.3], dtype=torch.float64)
    top3 = SamplingRule(1.0, top_k=3)
    assert check_draws(logits, torch.tensor([3]), u, top3, tol=0.0)[1].item() >= 0.01 - 1e-9
    assert not check_draws(logits, torch.tensor([4]), u, top3, tol=1.0)[0].item()
    assert not check_draws(logits, torch.tensor([4]), u, SamplingRule(1.0, top_p=0.9), tol=1.0)[0].item()


def test_check_takes_any_dtype_and_chunks_rows():
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(50, 300, generator=g)).to(torch.bfloat16)
    rule = SamplingRule(temperature=0.9, top_p=0.95)
    u = uniforms(7, torch.arange(50))
    tokens = draws(logits, rule, u)
    whole = check_draws(logits, tokens, u, rule, tol=0.0, chunk_rows=64)
    chunked = check_draws(logits, tokens, u, rule, tol=0.0, chunk_rows=7)
    assert whole[0].all() and torch.equal(whole[1], chunked[1])
    other = draws(logits, rule, uniforms(8, torch.arange(50)))
    assert not check_draws(logits, other, u, rule, tol=0.1)[0].all()
