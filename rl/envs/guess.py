"""Guess the number: a multi-turn game with feedback, graded on whether (and how fast) the model finds it.

The model guesses an integer in a range; each wrong guess gets "higher" or "lower". A turn
without a number is a wasted guess. Grade: 1 for finding the number, minus a small cost per turn.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

from rl.envs.base import Grade, State, Step

NUMBER = re.compile(r"-?\d+")


@dataclass(frozen=True)
class GuessNumber:
    low: int = 1
    high: int = 16
    max_turns: int = 4
    turn_cost: float = 0.05
    """Subtracted from the grade per turn taken, so finding it sooner is better."""

    def rows(self, size: int, seed: int) -> list[dict[str, Any]]:
        rng = random.Random(seed)
        question = (f"I picked a whole number from {self.low} to {self.high}. Guess it: answer with one number. "
                    f"After each guess I say higher or lower. You have {self.max_turns} guesses.")  # fmt: skip
        return [{"question": question, "answer": rng.randint(self.low, self.high)} for _ in range(size)]

    def reset(self, row: dict[str, Any]) -> State:
        return {"secret": int(row["answer"]), "guesses": [], "found": False}

    def step(self, state: State, turn: str) -> tuple[State, Step]:
        numbers = NUMBER.findall(turn)
        guess = int(numbers[-1]) if numbers else None
        state = {**state, "guesses": [*state["guesses"], guess]}
        if guess == state["secret"]:
            return {**state, "found": True}, Step(done=True, rewards={"valid_guess": 1.0})
        if guess is None:
            feedback = f"That is not a number. Answer with one whole number from {self.low} to {self.high}."
        else:
            feedback = "Higher." if guess < state["secret"] else "Lower."
        done = len(state["guesses"]) >= self.max_turns
        return state, Step(messages=[] if done else [{"role": "user", "content": feedback}], done=done,
                           rewards={"valid_guess": float(guess is not None)})  # fmt: skip

    def grade(self, state: State) -> Grade:
        turns = len(state["guesses"])
        found = float(state["found"])
        return Grade(found - self.turn_cost * turns, {"correct": found, "turns": float(turns)})
