"""A multi-turn environment in Prime Intellect's `verifiers` format (an Environments Hub module), for the tests.

It runs only in the environments' venv (`.venv-envs`), never in scatter-rl's interpreter: `verifiers`
here is Prime Intellect's package. `load_environment` returns a `vf.MultiTurnEnv` with a dataset, an
`env_response` and a rubric whose reward is a local function. `probe` makes `env_response` report
what the environment's process can reach: the network, a host path (the sandbox's tests).
"""

import random
import re
import socket
import time

from datasets import Dataset

import verifiers as vf


def _reach(path: str) -> str:
    out = []
    try:
        socket.create_connection(("1.1.1.1", 53), timeout=2).close()
        out.append("network: yes")
    except OSError as e:
        out.append(f"network: no ({type(e).__name__})")
    try:
        open(path).close()
        out.append("file: yes")
    except OSError as e:
        out.append(f"file: no ({type(e).__name__})")
    return "; ".join(out)


class HigherLower(vf.MultiTurnEnv):
    def __init__(self, probe: str = "", sleep_s: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.probe, self.sleep_s = probe, sleep_s

    async def env_response(self, messages, state, **kwargs):
        time.sleep(self.sleep_s)
        if self.probe:
            return [vf.UserMessage(content=_reach(self.probe))]
        numbers = re.findall(r"-?\d+", str(messages[-1].content or ""))
        guess, secret = (int(numbers[-1]) if numbers else None), int(state["answer"])
        if guess == secret:
            state["final_env_response"] = [vf.UserMessage(content="Correct!")]
            return state["final_env_response"]
        return [vf.UserMessage(content="Not a number." if guess is None else "Higher." if guess < secret else "Lower.")]


def found(completion, **kwargs) -> float:
    return float(any(m.role == "user" and m.content == "Correct!" for m in completion))


def load_environment(
    low: int = 1, high: int = 4, max_turns: int = 3, size: int = 64, probe: str = "", sleep_s: float = 0.0
):
    rng = random.Random(0)
    rows = [
        {
            "question": f"Guess my number from {low} to {high}. Answer with one number.",
            "answer": str(rng.randint(low, high)),
        }
        for _ in range(size)
    ]
    return HigherLower(
        dataset=Dataset.from_list(rows),
        rubric=vf.Rubric(funcs=[found]),
        max_turns=max_turns,
        probe=probe,
        sleep_s=sleep_s,
    )
