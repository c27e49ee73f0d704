"""The built-in environments and observation rendering, as pure functions (the tool in its real sandbox)."""

from __future__ import annotations

import json

import pytest
from helpers.sandbox import sandbox_required  # noqa: F401 - fixture

from rl.envs import ENVIRONMENTS, make
from rl.envs.arithmetic import run_python
from rl.envs.render import ObservationRenderer


def test_guess_number_feedback_grade_and_json_state():
    env = make("guess_number", {"low": 1, "high": 8, "max_turns": 3})
    row = env.rows(4, seed=0)[0]
    state = env.reset(row)
    secret = state["secret"]
    state, step = env.step(json.loads(json.dumps(state)), "I guess 0")
    assert not step.done and step.messages == [{"role": "user", "content": "Higher."}]
    state, step = env.step(state, "no idea")
    assert not step.done and "not a number" in step.messages[0]["content"] and step.rewards["valid_guess"] == 0.0
    state, step = env.step(state, f"It is {secret}")
    assert step.done and not step.messages
    grade = env.grade(state)
    assert grade.components == {"correct": 1.0, "turns": 3.0} and grade.value == pytest.approx(1 - 3 * 0.05)


def test_guess_number_ends_after_max_turns_ungraded():
    env = make("guess_number", {"low": 1, "high": 4, "max_turns": 2})
    state = env.reset({"answer": 3})
    state, first = env.step(state, "1")
    state, second = env.step(state, "2")
    assert not first.done and second.done and env.grade(state).components["correct"] == 0.0


def test_unknown_environment_and_bad_params_are_named():
    with pytest.raises(ValueError, match="unknown environment 'chess'.*guess_number"):
        make("chess", {})
    with pytest.raises(ValueError, match="environment 'guess_number': bad params"):
        make("guess_number", {"colour": "red"})
    assert set(ENVIRONMENTS) == {"guess_number", "arithmetic_tool", "verifiers", "textarena"}
    with pytest.raises(ValueError, match="`environment` is required"):
        make("verifiers", {})


def test_observation_tokens_extend_the_generated_ids_as_the_template_would(tiny_tokenizer):
    tok = tiny_tokenizer
    prompt = [{"role": "user", "content": "guess"}]
    ids = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    renderer = ObservationRenderer(tok)
    feedback = [{"role": "user", "content": "Higher."}]
    for closed in (True, False):  # a turn the model ended itself, or one cut at max_tokens
        turn = tok("7", add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if closed else [])
        obs = renderer.render(turn, feedback)
        whole = tok.apply_chat_template([*prompt, {"role": "assistant", "content": "7"}, *feedback],
                                        add_generation_prompt=True, tokenize=False)  # fmt: skip
        assert tok.decode(list(ids) + turn + obs) == whole


@pytest.mark.usefixtures("sandbox_required")
def test_arithmetic_tool_runs_code_in_the_sandbox_without_network_or_host_files():
    env = make("arithmetic_tool", {"max_turns": 3})
    row = env.rows(1, seed=3)[0]
    state = env.reset(row)
    a, b = (int(x) for x in row["question"].split("?")[0].split()[-3::2])
    state, step = env.step(state, f"<python>print({a} * {b})</python>")
    assert not step.done and step.tool_calls == 1 and step.tool_errors == 0
    assert step.messages[0]["content"] == f"<output>\n{a * b}\n</output>"
    state, step = env.step(state, f"<answer>{a * b}</answer>")
    assert step.done and env.grade(state).components == {"correct": 1.0, "tool_calls": 1.0}
    net, ok = run_python("import socket; socket.create_connection(('1.1.1.1', 53), timeout=2)", 10, 256)
    assert not ok and "Error" in net
    files, ok = run_python(f"print(open({__file__!r}).read())", 10, 256)  # the hub's files are not there
    assert not ok and "No such file" in files
    slow, ok = run_python("while True: pass", 2, 256)
    assert not ok and "timed out" in slow


@pytest.mark.usefixtures("sandbox_required")
def test_arithmetic_tool_takes_fenced_code_and_with_plain_answers_a_turn_without_code_answers():
    env = make("arithmetic_tool", {"max_turns": 3, "plain_answers": True})
    state = env.reset({"answer": 12 * 34})
    state, step = env.step(state, "Let me compute it.\n```python\nprint(12 * 34)\n```\nThis prints 400.")
    assert step.tool_calls == 1 and step.messages[0]["content"] == "<output>\n408\n</output>" and not step.done
    state, step = env.step(state, "The product 12 * 34 is 408.")  # its last integer
    assert step.done and env.grade(state).components == {"correct": 1.0, "tool_calls": 1.0}
    state, step = env.step(env.reset({"answer": 408}), "I think it is about 1,000, so: 409")
    assert step.done and env.grade(state).value == 0.0
    two = make("arithmetic_tool", {"max_turns": 2, "plain_answers": True})
    state, step = two.step(two.reset({"answer": 408}), "```python\nprint(12 * 34)\n```")
    state, step = two.step(state, "```python\nprint(12 * 34)\n```\nThis will output: `408`")  # the last turn
    assert step.done and step.tool_calls == 0 and two.grade(state).value == 1.0
    strict = make("arithmetic_tool", {"max_turns": 3})
    state, step = strict.step(strict.reset({"answer": 408}), "It is 408.")  # tags only: told how to answer
    assert not step.done and "<answer>N</answer>" in step.messages[0]["content"]
    for hostile in ("<answer>,</answer>", "<answer>-,</answer>", "<answer>" + "9" * 5000 + "</answer>"):
        state, step = env.step(env.reset({"answer": 408}), hostile)  # graded wrong, never an error
        assert step.done and env.grade(state).value == 0.0


def test_an_environment_run_takes_evaluations():
    from rl.config import load_config

    cfg = load_config(None, ["data.source.type=env", "eval.every=5", "data.eval_size=8"])
    assert cfg.data.source.name == "guess_number" and cfg.eval.every == 5
