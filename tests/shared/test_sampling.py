"""The pure functions of verifiable sampling (rl/sampling.py): the seeded uniform, the processed distribution,
the inverse-CDF draw and the trainer's batched check."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rl.sampling import SamplingRule, check_draws, draw, draws, processed_probs, seed_tensor, uniform, uniforms

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


@settings(max_examples=300, deadline=None)
@given(logits=LOGITS, rule=RULES, data=st.data())
def test_the_draw_lies_inside_its_interval(logits, rule, data):
    x = torch.tensor(logits, dtype=torch.float32)
    u = torch.tensor(data.draw(st.lists(st.floats(0.0, 1.0, exclude_max=True), min_size=len(logits),
                                        max_size=len(logits))), dtype=torch.float64)  # fmt: skip
    tokens = draws(x, rule, u)
    probs = processed_probs(x, rule)
    assert (probs.gather(-1, tokens[:, None]) > 0).all()  # never a token the rule removed
    accepted, distance = check_draws(x, tokens, u, rule, tol=0.0, chunk_rows=2)
    assert accepted.all() and (distance == 0).all()
    assert [draw(x[i], rule, float(u[i])) for i in range(len(logits))] == tokens.tolist()


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


def test_draws_follow_the_distribution_in_token_id_order():
    """Inverse CDF: a grid of u gives each token the share of the grid its probability says, in id order."""
    logits = torch.tensor([[0.3, -1.0, 2.0, 0.0, 1.0]])
    rule = SamplingRule(temperature=0.8, top_k=4)
    probs = processed_probs(logits, rule)[0]
    grid = (torch.arange(10_000, dtype=torch.float64) + 0.5) / 10_000
    tokens = draws(logits.expand(len(grid), -1), rule, grid)
    assert (tokens[1:] >= tokens[:-1]).all()  # id order
    share = torch.bincount(tokens, minlength=5).double() / len(grid)
    assert torch.allclose(share, probs, atol=2e-4)


def test_check_measures_the_distance_outside_the_interval():
    logits = torch.log(torch.tensor([[0.25, 0.25, 0.5]] * 3))
    rule = SamplingRule(temperature=1.0)
    u = torch.tensor([0.1, 0.49, 0.9], dtype=torch.float64)
    accepted, distance = check_draws(logits, torch.tensor([1, 1, 1]), u, rule, tol=0.02)
    assert distance.tolist() == pytest.approx([0.15, 0.0, 0.4])
    assert accepted.tolist() == [False, True, False]
    distance = check_draws(logits, torch.tensor([0, 2, 1]), u, rule, tol=0.0)[1]
    assert distance.tolist() == pytest.approx([0.0, 0.01, 0.4])


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
    assert not check_draws(logits, other, u, rule, tol=1e-3)[0].all()
