"""Episodes in a training batch: observation tokens out of the mask, seeded draws per turn, turn-closing stops."""

from __future__ import annotations

import math

import torch

from rl.sampling import uniform
from rl.trainer.batch import build_batch
from rl.trainer.provenance import special_token_rows
from rl.wire.protocol import ScoredCompletion, ScoredGroup

EOS = 2


def episode_group(version: int = 3) -> ScoredGroup:
    # prompt [5, 6]; turn 1 = [7, 8, EOS] (seed 11, v3), observation [9, 9], turn 2 = [10, EOS] (seed 12, v4)
    tokens = [7, 8, EOS, 9, 9, 10, EOS]
    logprobs = [-0.1, -0.2, -0.3, 0.0, 0.0, -0.5, -0.25]
    turns = [[0, 3, 11, 3], [5, 7, 12, 4]]
    c = ScoredCompletion(token_ids=tokens, logprobs=logprobs, finish_reason="stop", reward=1.0, components={},
                         turns=turns)  # fmt: skip
    plain = ScoredCompletion(token_ids=[7, EOS], logprobs=[-0.1, -0.2], finish_reason="stop", reward=0.0,
                             components={})  # fmt: skip
    return ScoredGroup(task_id=0, row_index=0, prompt_token_ids=[5, 6], policy_version=version, worker_id="w",
                       worker_name="w", completions=[c, plain], seeds=[11, 13])  # fmt: skip


def test_only_the_models_turns_are_trained_and_each_turn_has_its_own_draws():
    batch = build_batch([episode_group()], pad_token_id=0)
    assert batch.input_ids[0].tolist() == [5, 6, 7, 8, EOS, 9, 9, 10, EOS]
    assert batch.completion_mask[0].tolist() == [0, 0, 1, 1, 1, 0, 0, 1, 1]
    assert batch.behaviour_logprobs[0, 7].item() == -0.5 and batch.behaviour_logprobs[0, 5].item() == 0.0
    u = batch.draw_uniforms()
    assert [u[0, p].item() for p in (2, 3, 4)] == [uniform(11, i) for i in range(3)]  # turn 1: its seed, from 0
    assert all(math.isnan(u[0, p].item()) for p in (0, 1, 5, 6))  # prompt and observation: no draw
    assert all(math.isnan(u[0, p].item()) for p in (7, 8))  # turn 2 came from version 4: log-probs checked only
    assert batch.completion_mask[1].tolist()[:4] == [0, 0, 1, 1]  # a plain completion beside it: unchanged
    assert [u[1, p].item() for p in (2, 3)] == [uniform(13, i) for i in range(2)]


def test_a_stop_token_may_close_each_turn_but_not_sit_inside_one():
    batch = build_batch([episode_group()], pad_token_id=0)
    special = [0, 1, EOS]
    assert special_token_rows(batch.input_ids, batch.completion_mask, special, [EOS]).tolist() == [False, False]
    inside = batch.input_ids.clone()
    inside[0, 3] = EOS  # an end-of-turn in the middle of turn 1
    assert special_token_rows(inside, batch.completion_mask, special, [EOS]).tolist() == [True, False]
    unmasked = batch.completion_mask.clone()
    unmasked[0, 5:7] = 1.0  # observation tokens trained as if generated: turn 1's stop is now inside
    assert special_token_rows(batch.input_ids, unmasked, special, [EOS]).tolist() == [True, False]
    assert torch.equal(batch.rewards, torch.tensor([1.0, 0.0]))
