"""Policy losses: hand-computed cases, micro-batch additivity, padding, IS bounds, golden values."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rl.config import AlgorithmConfig
from rl.trainer.loss import LOSSES, LossNorm, behaviour_importance_weights, merge_metrics, policy_loss, reduce_metrics

LOSS_TYPES = sorted(LOSSES)
IS_MODES = ["none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]
MAX_TOKENS = 16


def _loss(cfg, logprobs, old, adv, mask, norm=None, **kw):
    norm = norm or LossNorm.from_batch(mask, max_tokens=MAX_TOKENS)
    return policy_loss(logprobs, old, adv, mask, cfg, loss_norm=norm, **kw)


def _random_batch(seed: int, rows: int = 8, cols: int = 10, empty_row: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, cols + 1, (rows,), generator=g)
    if empty_row:
        lengths[-1] = 0
    mask = (torch.arange(cols) < lengths.unsqueeze(1)).float()
    old = -torch.rand(rows, cols, generator=g) * 4
    logprobs = old + 0.4 * torch.randn(rows, 1, generator=g) + 0.5 * torch.randn(rows, cols, generator=g)
    return {
        "logprobs": logprobs,
        "old": old,
        "behaviour": old + 0.5 * torch.randn(rows, cols, generator=g),
        "ref": old + 0.3 * torch.randn(rows, cols, generator=g),
        "entropy": torch.rand(rows, cols, generator=g),
        "adv": torch.randn(rows, generator=g),
        "mask": mask,
    }


def _run(cfg, b, rows=slice(None), norm=None):
    leaf = b["logprobs"][rows].clone().requires_grad_()
    loss, metrics = _loss(
        cfg,
        leaf,
        b["old"][rows],
        b["adv"][rows],
        b["mask"][rows],
        norm or LossNorm.from_batch(b["mask"], max_tokens=MAX_TOKENS),
        behaviour_logprobs=b["behaviour"][rows],
        ref_logprobs=b["ref"][rows],
        entropy=b["entropy"][rows],
    )
    loss.backward()
    return loss.detach(), leaf.grad, metrics


# --------------------------------------------------------------------------- hand-computed cases


@pytest.mark.parametrize(
    ("loss", "expected"),
    [("grpo", 1.0), ("gspo", 1.0), ("dapo", 1 / 3), ("bnpo", 1 / 3), ("dr_grpo", 1 / (2 * MAX_TOKENS))],
)
def test_aggregation_by_hand(loss, expected):
    # On-policy (ratio 1): per-token loss is -A. Sequence 0 has 2 tokens of A=1, sequence 1 one token of A=-3.
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    logprobs = torch.full((2, 3), -1.0)
    value, _ = _loss(AlgorithmConfig(loss=loss), logprobs, logprobs, torch.tensor([1.0, -3.0]), mask)
    # grpo: (-1 + 3) / 2 sequences; dapo/bnpo: (-1 - 1 + 3) / 3 tokens; dr_grpo: 1 / (2 * 16).
    assert value.item() == pytest.approx(expected)


@pytest.mark.parametrize(
    ("log_ratio", "adv", "dual_clip", "loss", "grad"),
    [
        (0.5, 1.0, None, -1.28, 0.0),  # above 1 + eps_high with A > 0: clipped, no gradient
        (-0.5, -1.0, None, 0.8, 0.0),  # below 1 - eps_low with A < 0: clipped
        (0.5, -1.0, None, math.exp(0.5), math.exp(0.5)),  # A < 0, large ratio: unclipped
        (1.5, -1.0, None, math.exp(1.5), math.exp(1.5)),
        (1.5, -1.0, 3.0, 3.0, 0.0),  # dual-clip caps it at -c A
        (0.1, 1.0, None, -math.exp(0.1), -math.exp(0.1)),  # inside the trust region
    ],
)
def test_ppo_clip_by_hand(log_ratio, adv, dual_clip, loss, grad):
    cfg = AlgorithmConfig(loss="dapo", epsilon_low=0.2, epsilon_high=0.28, dual_clip=dual_clip)
    logprobs = torch.tensor([[-1.0 + log_ratio]], requires_grad=True)
    value, _ = _loss(cfg, logprobs, torch.tensor([[-1.0]]), torch.tensor([adv]), torch.ones(1, 1))
    value.backward()
    assert value.item() == pytest.approx(loss, rel=1e-6)
    assert logprobs.grad.item() == pytest.approx(grad, rel=1e-6, abs=1e-9)


def test_cispo_by_hand():
    # ratio e^0.5 > 1.28 is capped, the weight carries no gradient: d/dlogp = -1.28 * A.
    logprobs = torch.tensor([[-0.5, -2.0]], requires_grad=True)
    old = torch.tensor([[-1.0, -2.0]])
    value, metrics = _loss(AlgorithmConfig(loss="cispo"), logprobs, old, torch.tensor([2.0]), torch.ones(1, 2))
    value.backward()
    assert value.item() == pytest.approx((-1.28 * 2 * -0.5 - 1.0 * 2 * -2.0) / 2)
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-1.28, -1.0]]))
    assert reduce_metrics([metrics])["clip_ratio/high"] == 0.5


def test_gspo_uses_one_ratio_per_sequence():
    # Log-ratios 0.1 and 0.3: sequence ratio e^0.2 = 1.221 < 1.28, so unclipped; every token shares it.
    logprobs = torch.tensor([[-0.9, -0.7]], requires_grad=True)
    value, _ = _loss(AlgorithmConfig(loss="gspo"), logprobs, torch.full((1, 2), -1.0), torch.ones(1), torch.ones(1, 2))
    value.backward()
    assert value.item() == pytest.approx(-math.exp(0.2))
    torch.testing.assert_close(logprobs.grad, torch.full((1, 2), -math.exp(0.2) / 2))


def test_kl_term_by_hand():
    # On-policy, ref 0.5 below: beta * k3 = 0.1 * (e^-0.5 + 0.5 - 1); A = 0 so only the KL remains.
    logprobs = torch.tensor([[-1.0]])
    cfg = AlgorithmConfig(loss="dapo", beta=0.1)
    value, metrics = _loss(cfg, logprobs, logprobs, torch.zeros(1), torch.ones(1, 1), ref_logprobs=logprobs - 0.5)
    k3 = math.exp(-0.5) + 0.5 - 1
    assert value.item() == pytest.approx(0.1 * k3)
    assert metrics["loss/kl"].item() == pytest.approx(0.1 * k3)
    assert reduce_metrics([metrics])["ref_kl"] == pytest.approx(k3)
    with pytest.raises(ValueError, match="ref_logprobs"):
        _loss(cfg, logprobs, logprobs, torch.zeros(1), torch.ones(1, 1))


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("token_truncate", [[2.0, 1.5]]),
        ("token_mask", [[0.0, 1.5]]),
        ("sequence_truncate", [[2.0]]),  # 3 * 1.5 = 4.5 > 2
        ("sequence_mask", [[0.0]]),
        ("none", [[1.0, 1.0]]),
    ],
)
def test_importance_weights_by_hand(mode, expected):
    old = torch.log(torch.tensor([[3.0, 1.5, 7.0]]))
    behaviour = torch.zeros(1, 3)
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # the third token is padding and must not count
    weights, _ = behaviour_importance_weights(old, behaviour, mask, mode, cap=2.0)
    torch.testing.assert_close(weights[:, : len(expected[0])], torch.tensor(expected))


def test_importance_weight_multiplies_the_token_loss():
    # Token ratio to the old policy is 1, weight min(e^1, 2) = 2: loss = -2 A per token.
    logprobs = torch.tensor([[-1.0]])
    cfg = AlgorithmConfig(loss="dapo", is_mode="token_truncate", is_cap=2.0)
    value, metrics = _loss(cfg, logprobs, None, torch.ones(1), torch.ones(1, 1), behaviour_logprobs=logprobs - 1.0)
    assert value.item() == pytest.approx(-2.0)
    reduced = reduce_metrics([metrics])
    assert reduced["is_weight"] == 2.0 and reduced["is_weight/max"] == 2.0 and reduced["is_over_cap"] == 1.0
    # KL(behaviour || current), k3 with log r = logp - logp_behaviour = 1.
    assert reduced["mismatch_kl"] == pytest.approx(math.e - 2)


def test_old_logprobs_none_means_on_policy():
    b = _random_batch(0)
    cfg = AlgorithmConfig(loss="grpo")
    explicit, _ = _loss(cfg, b["logprobs"], b["logprobs"], b["adv"], b["mask"])
    implicit, _ = _loss(cfg, b["logprobs"], None, b["adv"], b["mask"])
    torch.testing.assert_close(explicit, implicit)


def test_bad_inputs_are_rejected():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        _loss(AlgorithmConfig(), x, x, torch.zeros(3), torch.ones(2, 3))
    with pytest.raises(ValueError, match="max_tokens"):
        policy_loss(x, x, torch.zeros(2), torch.ones(2, 3), AlgorithmConfig(loss="dr_grpo"), loss_norm=LossNorm(6, 2))


# --------------------------------------------------------------------------- micro-batching


@pytest.mark.parametrize("mode", ["token_truncate", "sequence_mask"])
@pytest.mark.parametrize("loss", [name for name in LOSS_TYPES if name != "bnpo"])
def test_micro_batch_losses_sum_to_the_batch_loss(loss, mode):
    b = _random_batch(1)
    cfg = AlgorithmConfig(loss=loss, is_mode=mode, beta=0.05, dual_clip=3.0)
    full_loss, full_grad, full_metrics = _run(cfg, b)
    parts = [_run(cfg, b, rows) for rows in (slice(0, 3), slice(3, 6), slice(6, 8))]  # uneven on purpose
    torch.testing.assert_close(sum(p[0] for p in parts), full_loss, rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.cat([p[1] for p in parts]), full_grad, rtol=0, atol=1e-7)
    reduced, expected = reduce_metrics([p[2] for p in parts]), reduce_metrics([full_metrics])
    assert reduced.keys() == expected.keys()
    for key, value in expected.items():
        assert reduced[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_bnpo_is_the_mean_of_micro_batch_token_means():
    b = _random_batch(2)
    cfg = AlgorithmConfig(loss="bnpo")
    norm = LossNorm.from_batch(b["mask"], micro_batch_size=3)
    assert norm.num_micro_batches == 3
    splits = (slice(0, 3), slice(3, 6), slice(6, 8))
    total = sum(_run(cfg, b, rows, norm)[0] for rows in splits)
    dapo = AlgorithmConfig(loss="dapo")
    means = [_run(dapo, b, rows, LossNorm.from_batch(b["mask"][rows]))[0] for rows in splits]
    torch.testing.assert_close(total, sum(means) / 3)
    # One micro-batch: bnpo is dapo.
    torch.testing.assert_close(_run(cfg, b)[0], _run(dapo, b)[0])


def test_world_size_undoes_gradient_averaging():
    b = _random_batch(3)
    norm = LossNorm.from_batch(b["mask"], max_tokens=MAX_TOKENS)
    one = _run(AlgorithmConfig(beta=0.1), b, norm=norm)[0]
    two = _run(AlgorithmConfig(beta=0.1), b, norm=LossNorm(norm.total_tokens, norm.total_sequences, world_size=2))[0]
    torch.testing.assert_close(two, 2 * one)


# --------------------------------------------------------------------------- properties

_GARBAGE = st.sampled_from([math.nan, math.inf, -math.inf, 1e30, -1e30, 0.0, 7.0])


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    rows=st.integers(1, 4),
    cols=st.integers(1, 6),
    extra=st.integers(1, 4),
    loss=st.sampled_from(LOSS_TYPES),
    mode=st.sampled_from(IS_MODES),
    garbage=_GARBAGE,
)
def test_padding_never_contributes(seed, rows, cols, extra, loss, mode, garbage):
    b = _random_batch(seed, rows, cols, empty_row=False)
    cfg = AlgorithmConfig(loss=loss, is_mode=mode, beta=0.05, dual_clip=2.5)
    norm = LossNorm.from_batch(b["mask"], max_tokens=MAX_TOKENS)
    base_loss, base_grad, base_metrics = _run(cfg, b, norm=norm)
    # Append padding columns, and put garbage (NaN, inf, huge) on every padded position.
    mask = torch.cat([b["mask"], torch.zeros(rows, extra)], dim=1)
    padded = {"mask": mask, "adv": b["adv"]}
    for key in ("logprobs", "old", "behaviour", "ref", "entropy"):
        padded[key] = torch.cat([b[key], torch.zeros(rows, extra)], dim=1).masked_fill(mask == 0, garbage)
    loss_value, grad, metrics = _run(cfg, padded, norm=norm)
    torch.testing.assert_close(loss_value, base_loss, rtol=0, atol=1e-6)
    torch.testing.assert_close(grad[:, :cols], base_grad, rtol=0, atol=1e-7)
    assert torch.all(grad[:, cols:] == 0) and torch.isfinite(grad).all()
    reduced, expected = reduce_metrics([metrics]), reduce_metrics([base_metrics])
    assert reduced == pytest.approx(expected, rel=1e-6, abs=1e-7)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    mode=st.sampled_from(IS_MODES[1:]),
    cap=st.floats(1.0, 10.0),
    spread=st.floats(0.0, 5.0),
)
def test_importance_weight_bounds(seed, mode, cap, spread):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(4, 7, generator=g) * 5
    behaviour = old + spread * torch.randn(4, 7, generator=g)
    mask = (torch.rand(4, 7, generator=g) > 0.3).float()
    weights, over = behaviour_importance_weights(old, behaviour, mask, mode, cap)
    assert torch.isfinite(weights).all() and (weights >= 0).all() and (weights <= cap).all()
    if mode.endswith("mask"):
        assert torch.all(weights[over] == 0) and torch.all(weights[~over] > 0)
    else:
        assert torch.all(weights[over] == cap)
    if mode.startswith("token"):
        assert torch.all(weights[mask == 0] == 1)


# --------------------------------------------------------------------------- golden values

GOLDEN = {
    "bnpo": -0.47731488943099976,
    "cispo": 1.4311660528182983,
    "dapo": -0.47731488943099976,
    "dr_grpo": -0.13424481451511383,
    "grpo": -0.3478847146034241,
    "gspo": -0.3922814428806305,
}


@pytest.mark.parametrize("loss", LOSS_TYPES)
def test_golden_loss(loss):
    """Fixed-seed batch, every feature on; a refactor must keep these values."""
    cfg = AlgorithmConfig(loss=loss, is_mode="token_truncate", is_cap=2.0, beta=0.04, dual_clip=3.0)
    value = _run(cfg, _random_batch(1234))[0]
    assert value.item() == pytest.approx(GOLDEN[loss], rel=1e-6, abs=1e-7)


def test_reduce_metrics():
    parts = [
        {
            "x/sum": torch.tensor(3.0),
            "x/count": torch.tensor(2.0),
            "w/max": torch.tensor(1.5),
            "tokens": torch.tensor(2.0),
        },
        {
            "x/sum": torch.tensor(1.0),
            "x/count": torch.tensor(2.0),
            "w/max": torch.tensor(0.5),
            "tokens": torch.tensor(2.0),
        },
        {"y/sum": torch.tensor(0.0), "y/count": torch.tensor(0.0)},
    ]
    reduced = reduce_metrics(parts)
    assert reduced["x"] == 1.0 and reduced["w/max"] == 1.5 and reduced["tokens"] == 4.0
    assert math.isnan(reduced["y"]) and "x/sum" not in reduced and "x/count" not in reduced
    # Merging is associative: per-rank merges can be gathered and merged again.
    regrouped = reduce_metrics([merge_metrics(parts[:2]), merge_metrics(parts[2:])])
    assert regrouped.keys() == reduced.keys() and regrouped["x"] == 1.0 and regrouped["w/max"] == 1.5
