"""Pure pieces of the verifiers: extraction, format and overlong shaping, composition, term table,
custom (TRL-style) functions and code-job building. No processes here."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rl.config import RewardTerm
from verifiers.base import Reward, VerifierError, combine
from verifiers.coding import build_job
from verifiers.custom import adapt, is_trl_style
from verifiers.extract import extract_answer, extract_code, last_number, last_tag
from verifiers.formatting import overlong_penalty, score_format, score_length
from verifiers.procedural import dataset_names, make_dataset
from verifiers.terms import resolve_all


def test_last_tag_and_last_number() -> None:
    text = "<answer>1</answer> then <answer> 2 </answer> and <answer>3"
    assert last_tag(text) == "2"
    assert last_tag("no tags") is None
    assert last_number("a 1,234 b -5.5 c") == "-5.5"
    assert last_number("total 1,234") == "1234"
    assert last_number("none") is None


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("answer_tag", None), ("last_number", "42"), ("raw", "so 42"), ("answer_tag_or_last_number", "42")],
)
def test_extract_answer_modes_without_tag(mode: str, expected: str | None) -> None:
    assert extract_answer("  so 42 ", mode) == expected


def test_extract_answer_prefers_tag() -> None:
    assert extract_answer("7 <answer>-3</answer> 9") == "-3"


@given(st.text(max_size=300))
def test_extraction_never_fails_on_arbitrary_text(text: str) -> None:
    extract_answer(text)
    extract_code(text)
    score_format(text, {})


def test_extract_code_prefers_last_python_fence() -> None:
    text = "```\nplain\n```\ntext\n```python\nx = 1\n```\n```py\ny = 2\n```"
    assert extract_code(text) == "y = 2\n"
    assert extract_code("```\nonly plain\n```") == "only plain\n"
    assert extract_code("```python\ncut off at max tokens") == "cut off at max tokens"
    assert extract_code("def f(): pass") == "def f(): pass"


def test_format_reward() -> None:
    good = "<think>reason</think>\n<answer>7</answer>\n"
    assert score_format(good, {}).value == 1.0
    assert score_format("<answer>7</answer>", {}, tags=["answer"]).value == 1.0
    bad = score_format("<answer>7</answer><think>late</think>", {})
    assert bad.value == 0.0 and bad.components["order"] == 0.0 and "order" in bad.info
    assert score_format("<think>x</think><answer>7</answer> trailing", {}).value == 0.0
    assert score_format("<think>x</think><answer>7</answer> trailing", {}, answer_last=False).value == 1.0
    assert score_format("pre <think>x</think><answer>7</answer>", {}, strict=True).value == 0.0
    assert score_format("<think></think><answer>7</answer>", {}).value == 0.0  # empty think
    assert score_format("<answer>1</answer><answer>2</answer>", {}, tags=["answer"]).value == 0.0
    partial = score_format("<answer>7</answer>", {}, partial=True)
    assert 0.0 < partial.value < 1.0


def test_overlong_penalty_matches_dapo() -> None:
    assert overlong_penalty(100, 1000, 200) == 0.0
    assert overlong_penalty(800, 1000, 200) == 0.0
    assert overlong_penalty(900, 1000, 200) == pytest.approx(-0.5)
    assert overlong_penalty(1000, 1000, 200) == pytest.approx(-1.0)
    assert overlong_penalty(1001, 1000, 200) == -1.0


def test_length_term_uses_token_count_when_given() -> None:
    r = score_length("x" * 10, {"completion_tokens": 950}, max_length=1000, buffer=100)
    assert r.value == pytest.approx(-0.5)
    assert score_length("x" * 200, {}, max_length=100, buffer=50).value == 0.0  # 50 tokens estimated
    assert score_length("x" * 200, {}, max_length=100, buffer=50, unit="chars").value == -1.0


def test_combine_weights_and_components() -> None:
    total = combine(
        [
            ("math", 1.0, Reward(1.0, {"extracted": 1.0})),
            ("format", 0.1, Reward(0.0, {"answer": 0.0}, "failed checks: answer")),
            ("length", 1.0, Reward(-0.5, {})),
        ]
    )
    assert total.value == pytest.approx(0.5)
    assert total.components == {"math": 1.0, "math/extracted": 1.0, "format": 0.0, "format/answer": 0.0, "length": -0.5}
    assert total.info == "format: failed checks: answer"
    assert combine([("x", 1.0, Reward(float("nan"), {}))]).value == 0.0


def test_term_table_errors_are_clear() -> None:
    with pytest.raises(VerifierError, match="unknown reward term 'bogus'"):
        resolve_all([RewardTerm(name="bogus")], 5.0)
    with pytest.raises(VerifierError, match=r"'format': params.bad_key"):
        resolve_all([RewardTerm(name="format", params={"bad_key": 1})], 5.0)
    with pytest.raises(VerifierError, match="not found"):
        resolve_all([RewardTerm(name="no_such_module_xyz:fn")], 5.0)
    with pytest.raises(VerifierError, match="twice"):
        resolve_all([RewardTerm(name="format"), RewardTerm(name="format")], 5.0)
    (math_term,) = resolve_all([RewardTerm(name="math")], 6.0)
    assert math_term.params["timeout_s"] == 2 and math_term.site == "worker"


def trl_accuracy(prompts, completions, answer, **kwargs):
    return [1.0 if a in c else 0.0 for c, a in zip(completions, answer, strict=True)]


def trl_chat_len(completions, **kwargs):
    return [float(len(c[0]["content"])) for c in completions]


def trl_strict(completions, answer):
    return [None for _ in completions]


def test_trl_style_functions_are_used_as_is() -> None:
    assert is_trl_style(trl_accuracy) and not is_trl_style(lambda text, example: 1.0)
    example = {"question": "2+2?", "answer": "4", "metadata": {"x": 1}}
    assert adapt(trl_accuracy, "acc")("it is 4", example).value == 1.0
    assert adapt(trl_accuracy, "acc")("it is 5", example).value == 0.0
    chat = {"prompt": [{"role": "user", "content": "hi"}], "answer": "x"}
    assert adapt(trl_chat_len, "len")("hello", chat).value == 5.0
    none = adapt(trl_strict, "strict")("x", example)  # no **kwargs: only accepted columns are passed
    assert none.value == 0.0 and "not applicable" in none.info


def test_build_job_shapes() -> None:
    prog, mode, cases = build_job("```python\ndef f(): return 1\n```", {"tests": "assert f() == 1"})
    assert (mode, cases) == ("assert", ["assert f() == 1"]) and "def f()" in prog
    _, mode, cases = build_job("print(1)", {"tests": [{"input": "", "output": "1"}]})
    assert mode == "stdio" and cases == [{"input": "", "output": "1"}]
    he = {"prompt": "def g(x):\n", "test": "def check(c):\n    assert c(1) == 2\n", "entry_point": "g"}
    prog, mode, cases = build_job("    return x + 1\n", he)
    assert prog == "def g(x):\n    return x + 1\n" and "check(g)" in cases[0]
    prog, _, _ = build_job("```python\ndef g(x):\n    return x + 1\n```", he)
    assert prog.startswith("def g(x):\n\n\ndef g(x):")
    assert isinstance(build_job("x", {"answer": "1"}), str)


def test_reasoning_gym_prompt_source_is_deterministic() -> None:
    rows = make_dataset("basic_arithmetic", {"min_terms": 2, "max_terms": 2}, size=3, seed=7)
    assert rows == make_dataset("basic_arithmetic", {"min_terms": 2, "max_terms": 2}, size=3, seed=7)
    assert {"question", "answer", "metadata"} <= set(rows[0])
    assert rows[0]["metadata"]["source_dataset"] == "basic_arithmetic"
    assert "basic_arithmetic" in dataset_names()
    with pytest.raises(VerifierError, match="no_such_dataset"):
        make_dataset("no_such_dataset")
