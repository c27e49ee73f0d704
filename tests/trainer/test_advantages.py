"""Group advantages: hand-computed cases, zero-sum groups, zero-variance groups. (TRL: test_loss_trl.py.)"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rl.trainer.advantages import STD_EPS, group_advantages, zero_variance_mask


def test_grpo_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    advantages, stats = group_advantages(rewards, 4, "grpo", "group")
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std().item()  # unbiased: sqrt(1/3)
    expected = torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]) / (std + STD_EPS)
    torch.testing.assert_close(advantages, expected)
    assert stats["zero_variance_groups"] == 1 and stats["groups"] == 2 and stats["zero_variance_fraction"] == 0.5
    assert stats["reward_mean"] == pytest.approx(0.75)


def test_batch_scale_and_none():
    rewards = torch.tensor([2.0, 0.0, 1.0, 1.0])
    centred = torch.tensor([1.0, -1.0, 0.0, 0.0])
    batch, _ = group_advantages(rewards, 2, "grpo", "batch")
    torch.testing.assert_close(batch, centred / (rewards.std() + STD_EPS))
    none, _ = group_advantages(rewards, 2, "grpo", "none")
    torch.testing.assert_close(none, centred)


def test_dr_grpo_is_mean_only_whatever_the_scale():
    rewards = torch.tensor([3.0, 1.0, 0.0, 0.0, 0.0, 1.0])
    for scale in ("group", "batch", "none"):
        advantages, _ = group_advantages(rewards, 3, "dr_grpo", scale)
        torch.testing.assert_close(advantages, torch.tensor([5 / 3, -1 / 3, -4 / 3, -1 / 3, -1 / 3, 2 / 3]))


def test_rloo_is_leave_one_out():
    rewards = torch.tensor([3.0, 1.0, 0.0, 2.0])
    advantages, _ = group_advantages(rewards, 4, "rloo", "none")
    expected = [rewards[i] - (rewards.sum() - rewards[i]) / 3 for i in range(4)]
    torch.testing.assert_close(advantages, torch.stack(expected))


def test_zero_variance_groups_are_exactly_zero():
    # A float mean of repeated 0.1 is not exactly 0.1; the advantage must still be exactly 0.
    rewards = torch.tensor([0.1] * 7 + [0.3, 0.7, 0.3, 0.7, 0.3, 0.7, 0.3])
    for estimator in ("grpo", "dr_grpo", "rloo"):
        for scale in ("group", "batch", "none"):
            advantages, stats = group_advantages(rewards, 7, estimator, scale)
            assert torch.all(advantages[:7] == 0) and torch.all(advantages[7:] != 0)
            assert stats["zero_variance_groups"] == 1
    assert zero_variance_mask(rewards, 7).tolist() == [True, False]


def test_integer_rewards_and_bad_inputs():
    advantages, _ = group_advantages(torch.tensor([1, 0, 1, 1]), 2)
    assert advantages.dtype == torch.float32
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(torch.zeros(4), 3)
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 2), 2)
    with pytest.raises(ValueError, match=">= 2"):
        group_advantages(torch.zeros(2), 1)
    with pytest.raises(ValueError, match="finite"):
        group_advantages(torch.tensor([0.0, float("nan")]), 2)
    with pytest.raises(ValueError, match="estimator"):
        group_advantages(torch.zeros(2), 2, "ppo")  # type: ignore[arg-type]


@settings(max_examples=100, deadline=None)
@given(
    groups=st.lists(
        st.lists(st.sampled_from([0.0, 0.25, 0.5, 1.0, -1.0, 3.7]), min_size=4, max_size=4), min_size=1, max_size=6
    ),
    estimator=st.sampled_from(["grpo", "dr_grpo", "rloo"]),
    scale=st.sampled_from(["group", "batch", "none"]),
)
def test_advantages_sum_to_zero_per_group(groups, estimator, scale):
    rewards = torch.tensor(groups, dtype=torch.float64).flatten()
    advantages, stats = group_advantages(rewards, 4, estimator, scale)
    assert advantages.shape == rewards.shape and torch.isfinite(advantages).all()
    torch.testing.assert_close(advantages.view(-1, 4).sum(1), torch.zeros(len(groups), dtype=torch.float64))
    # Better completions never get a lower advantage than worse ones in the same group.
    for r, a in zip(rewards.view(-1, 4), advantages.view(-1, 4), strict=True):
        order = torch.argsort(r)
        assert torch.all(a[order].diff() >= -1e-12)
    assert stats["zero_variance_groups"] == sum(len(set(g)) == 1 for g in groups)
