"""Held-out episodes played outside a run (rl/envs/play.py) follow the hub's rules exactly: the same scripted
policy gives the same token sequences and grades through the hub's episodes as through `play`."""

from __future__ import annotations

import pytest
from helpers.episodes import env_state, lease, register, runner, submit, turn

from rl.envs import make
from rl.envs.play import cut_turn, play, summarise
from rl.envs.render import ObservationRenderer
from rl.hub.episodes import split_turn_id
from rl.hub.texts import TextDecoder

GUESSES = {0: ["2", "3", "4"], 1: ["x", "1", "1"]}
"""Episode j's guesses, turn by turn: a search that finds any secret of 1..4 in 3 turns, and a loser."""


def _hub_group(tok):
    """One task's two episodes through the hub's state and runner, with GUESSES as the policy."""
    state = env_state(tok)
    run, wid = runner(state, tok), register(state)
    granted = lease(state, wid, max_tasks=1)
    (task,) = granted.tasks
    submit(state, run, wid, granted.lease_id, {task.task_id: [turn(tok, GUESSES[j][0]) for j in range(2)]})
    while not state.buffer:
        granted = lease(state, wid)
        results = {}
        for item in granted.tasks:
            _, j = split_turn_id(item.task_id)
            done = len(state.episodes.groups[task.task_id][j].turns)
            results[item.task_id] = [turn(tok, GUESSES[j][done])]
        submit(state, run, wid, granted.lease_id, results)
    (group,) = state.buffer.values()
    return state, task, group


def test_play_builds_the_hubs_token_sequences_and_grades(tiny_tokenizer):
    tok = tiny_tokenizer
    state, task, group = _hub_group(tok)
    row = state.prompts.rows[group.row_index]
    env = make("guess_number", {"low": 1, "high": 4, "max_turns": 3})
    prompt = list(task.prompt_token_ids)

    def policy(j):
        """Episode j's turns, one per call, each with tokens after its end (cut there, as the hub requires)."""
        said = iter(GUESSES[j])
        return lambda batch: [turn(tok, next(said)).token_ids + [7, 7] for _ in batch]

    played = [p for j in range(2)
              for p in play(env, [row], [prompt], policy(j), TextDecoder(tok), ObservationRenderer(tok),
                            state.cfg.model.max_model_len, state.cfg.sampling.max_tokens)]  # fmt: skip
    for p, c in zip(played, group.completions, strict=True):
        assert p.tokens == c.token_ids  # bit for bit: turns as generated, observations as the hub renders them
        assert p.grade.value == pytest.approx(c.reward) and p.turns == c.components["turns"]
    summary = summarise(played)
    found = group.completions[0].components["correct"] + group.completions[1].components["correct"]
    assert summary["success"] == found / 2 and summary["episodes"] == 2


def test_a_turn_is_cut_at_its_first_end_token():
    assert cut_turn([5, 6, 2, 9, 2], {2}) == [5, 6, 2]
    assert cut_turn([5, 6], {2}) == [5, 6]


def test_rows_and_prompts_must_pair(tiny_tokenizer):
    env = make("guess_number", {})
    with pytest.raises(ValueError, match="2 rows but 1 prompts"):
        play(env, [{"answer": 1}, {"answer": 2}], [[1]], lambda b: b, lambda s: [], ObservationRenderer(tiny_tokenizer),
             64, 8)  # fmt: skip
