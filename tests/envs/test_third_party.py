"""Third-party environments in a process of their own (rl/envs/third_party.py), with the real packages.

Prime Intellect's `verifiers` (an Environments Hub module under tests/envs/vf_environments, and the
package's own ReasoningGymEnv) and a TextArena game run in `.venv-envs` (scripts/setup_envs.sh), in the
sandbox: their steps, their grades, what the child can reach, and a child that does not answer in time.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.sandbox import in_ci, sandbox_required  # noqa: F401 - fixture

from rl.envs import make
from rl.envs.third_party import DEFAULT_VENV, EnvironmentProcessError

HERE = Path(__file__).parent
MODULES = str(HERE / "vf_environments")


@pytest.fixture(autouse=True)
def envs_venv(sandbox_required):  # noqa: F811 - the fixture, imported above
    if not (DEFAULT_VENV / "bin" / "python").exists():
        if in_ci():
            pytest.fail("CI=true but .venv-envs is missing: scripts/setup.sh makes it")
        pytest.skip("no .venv-envs here: run scripts/setup_envs.sh")


def play(env, row, turns):
    state = env.reset(row)
    steps = []
    for t in turns:
        state, step = env.step(state, t)
        steps.append(step)
        if step.done:
            break
    return state, steps


def test_verifiers_multi_turn_environment_steps_and_rubric_grade():
    env = make("verifiers", {"environment": "higher_lower", "paths": [MODULES], "args": {"max_turns": 4}})
    (row,) = env.rows(1, 0)
    assert row["question"] == [{"role": "user", "content": "Guess my number from 1 to 4. Answer with one number."}]
    secret = int(row["vf"]["answer"])
    wrong = 1 if secret != 1 else 2
    state, steps = play(env, row, [str(wrong), "no idea", str(secret)])
    assert steps[0].messages == [{"role": "user", "content": "Higher." if wrong < secret else "Lower."}]
    assert steps[1].messages == [{"role": "user", "content": "Not a number."}]
    assert steps[2].done and steps[2].messages == []
    grade = env.grade(state)
    assert grade.value == 1.0 and grade.components["found"] == 1.0 and grade.components["finished"] == 1.0
    again, _ = play(env, row, [str(wrong), "no idea", str(secret)])  # replayed from the row and turns: same
    assert again == state
    env.close()


def test_verifiers_tool_environment_gets_native_tool_calls_and_shows_its_tools(tiny_tokenizer):
    env = make("verifiers", {"environment": "multiply_tools", "paths": [MODULES], "args": {"size": 4}})
    (row,) = env.rows(1, 0)
    ((tool,),) = [row["tools"]]
    assert tool["type"] == "function" and tool["function"]["name"] == "multiply"
    assert set(tool["function"]["parameters"]["properties"]) == {"a", "b"}
    a, b = (int(x) for x in row["question"][-1]["content"].removeprefix("What is ").split("?")[0].split(" * "))
    call = f'Let me compute.\n<tool_call>\n{{"name": "multiply", "arguments": {{"a": {a}, "b": {b}}}}}\n</tool_call>'
    state, steps = play(env, row, [call, f"It is {a * b}."])
    assert steps[0].messages == [{"role": "tool", "content": str(a * b)}] and not steps[0].done
    assert steps[1].done and env.grade(state).value == 1.0
    assert env.grade(state).components["multiply_calls"] == 1.0  # the environment's own tool metric saw the call
    _, (broken, *_) = play(env, row, ["<tool_call>{not json</tool_call>", "no"])
    assert broken.messages[0]["role"] == "tool" and not broken.done  # its parse error, as the environment words it
    plain, (answered,) = play(env, row, ["I think 5."])  # no tool call: the episode ends, graded
    assert answered.done and env.grade(plain).value == 0.0
    env.close()


def test_verifiers_package_environment_reasoning_gym_graded_by_its_rubric():
    env = make("verifiers", {"environment": "verifiers.envs.integrations.reasoninggym_env:ReasoningGymEnv",
                             "args": {"gym": "basic_arithmetic", "num_train_examples": 4, "num_eval_examples": 1},
                             "max_turns": 1})  # fmt: skip
    rows = env.rows(2, 0)
    assert rows[0]["question"][0]["role"] == "system" and rows[0]["question"][-1]["role"] == "user"
    question = rows[0]["question"][-1]["content"]
    expr = question.removeprefix("Calculate ").rstrip(".").replace("/", "//")
    right = str(eval(expr))  # basic_arithmetic's integer expressions
    good, (step,) = play(env, rows[0], [f"<answer>{right}</answer>"])
    bad, _ = play(env, rows[0], ["<answer>x</answer>"])
    assert step.done
    assert env.grade(good).value == 1.0, (question, right, env.grade(good))
    assert env.grade(bad).value == 0.0
    env.close()


def test_textarena_game_feedback_and_reward():
    env = make("textarena", {"environment": "GuessTheNumber-v0", "max_turns": 12})
    (row,) = env.rows(1, 0)
    assert "Guess The Number" in row["question"]
    low, high, turns = 1, 20, []
    state, step = env.reset(row), None
    while step is None or not step.done:
        guess = (low + high) // 2
        turns.append(guess)
        state, step = env.step(state, f"[{guess}]")
        if not step.done:
            (msg,) = step.messages
            if "higher" in msg["content"]:
                low = guess + 1
            else:
                assert "lower" in msg["content"], msg
                high = guess - 1
    grade = env.grade(state)
    assert grade.value == 1.0 and grade.components["won"] == 1.0, (turns, grade)
    env.close()


def test_child_reaches_neither_the_network_nor_the_hubs_files():
    secret = HERE / "test_third_party.py"
    env = make("verifiers", {"environment": "higher_lower", "paths": [MODULES], "args": {"probe": str(secret)}})
    (row,) = env.rows(1, 0)
    _, (step,) = play(env, row, ["1"])
    assert step.messages[0]["content"].startswith("network: no") and "file: no" in step.messages[0]["content"]
    env.close()


def test_a_child_that_does_not_answer_in_time_is_killed_and_the_next_call_starts_another():
    env = make("verifiers", {"environment": "higher_lower", "paths": [MODULES], "args": {"sleep_s": 30},
                             "call_timeout_s": 2.0})  # fmt: skip
    (row,) = env.rows(1, 0)
    with pytest.raises(EnvironmentProcessError, match="no answer in 2 s"):
        env.step(env.reset(row), "1")
    assert env._child == []  # killed
    with pytest.raises(EnvironmentProcessError, match="no answer in 2 s"):  # a fresh child, bounded again
        env.step(env.reset(row), "1")
    env.close()
