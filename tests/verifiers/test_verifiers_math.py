"""Math verifier: equivalence cases (fractions, sets, intervals, percentages, units, LaTeX and plain
text), the plain-text `1/sqrt(2)` failure mode of math-verify, and hostile inputs through the pool."""

from __future__ import annotations

import time

import pytest

from rl.config import RewardTerm
from verifiers.maths import score
from verifiers.pool import VerifierPool

CASES = [
    # (gold, completion, expected)
    ("42", "The answer is \\boxed{42}", 1.0),
    ("\\frac{1}{2}", "\\boxed{0.5}", 1.0),
    ("0.5", "So $x = \\frac{1}{2}$", 1.0),
    ("1/2", "\\boxed{\\frac12}", 1.0),
    ("3/4", "\\boxed{0.75}", 1.0),
    ("0.75", "\\boxed{\\dfrac{3}{4}}", 1.0),
    ("\\{1,2,3\\}", "\\boxed{\\{3,2,1\\}}", 1.0),
    ("\\{1,2\\}", "\\boxed{\\{1,2,3\\}}", 0.0),
    ("(0,1]", "\\boxed{(0,1]}", 1.0),
    ("(0,1)", "\\boxed{[0,1]}", 0.0),
    ("[2, \\infty)", "\\boxed{[2,\\infty)}", 1.0),
    ("(1, 2)", "\\boxed{(1,2)}", 1.0),
    ("50\\%", "\\boxed{50\\%}", 1.0),
    ("50\\%", "\\boxed{0.5}", 1.0),
    ("5\\text{ cm}", "\\boxed{5}", 1.0),
    ("5", "The length is \\boxed{5\\text{ cm}}", 1.0),
    ("7", "The final answer is 7.", 1.0),
    ("7", "The final answer is 8.", 0.0),
    ("\\frac{\\sqrt{2}}{2}", "\\boxed{\\frac{1}{\\sqrt{2}}}", 1.0),
    ("2\\sqrt{3}", "\\boxed{\\sqrt{12}}", 1.0),
    ("x^2+2x+1", "\\boxed{(x+1)^2}", 1.0),
    ("3", "\\boxed{x=3}", 1.0),
    ("1000", "\\boxed{1,000}", 1.0),
    ("10^{-3}", "<answer>0.001</answer>", 1.0),
    ("-3", "<answer>-3</answer>", 1.0),
    ("\\pi", "\\boxed{\\pi}", 1.0),
    ("\\pi", "\\boxed{3.14159}", 0.0),
    ("\\infty", "\\boxed{\\infty}", 1.0),
    ("\\frac{1}{2}", "The answer is $\\frac{1}{2}$.", 1.0),
    ("12", "I computed 5+7 and got <answer>12</answer>", 1.0),
    ("12", "<answer>13</answer> though maybe \\boxed{12}", 0.0),  # the answer tag wins
    ("5", "", 0.0),
    ("5", "no numbers at all", 0.0),
    # math-verify alone reads plain-text `1/sqrt(2)` as `1`; the verifier rewrites it to LaTeX.
    ("\\frac{\\sqrt{2}}{2}", "The answer is 1/sqrt(2)", 1.0),
    ("1", "The answer is 1/sqrt(2)", 0.0),
    ("\\frac{\\sqrt{3}}{2}", "so the value is sqrt(3)/2", 1.0),
]


@pytest.mark.parametrize(("gold", "completion", "expected"), CASES)
def test_math_equivalence(gold: str, completion: str, expected: float) -> None:
    # A generous timeout: a loaded machine slows sympy, and the answer is what is tested.
    reward = score(completion, {"answer": gold}, timeout_s=10)
    assert reward.value == expected, reward.info
    if expected == 0.0:
        assert reward.info  # a zero always says why


def test_known_math_verify_failure_mode_is_what_we_work_around() -> None:
    from math_verify import parse, verify

    pred = parse("The answer is 1/sqrt(2)")
    assert verify(parse("$1$"), pred)  # raw math-verify: a false positive ...
    assert not verify(parse("$\\frac{\\sqrt{2}}{2}$"), pred)  # ... and a false negative


def test_math_without_answer_tag_param_reads_whole_text() -> None:
    text = "<answer>13</answer> though maybe \\boxed{12}"
    assert score(text, {"answer": "12"}, answer_tag=False, timeout_s=2).value == 1.0


def test_missing_or_unparsable_gold_scores_zero_with_reason() -> None:
    assert "no 'answer'" in score("\\boxed{1}", {}).info
    assert score("\\boxed{1}", {"answer": ""}).value == 0.0


def test_hostile_math_inputs_finish_within_the_timeout_and_score_zero() -> None:
    hostile = ["\\boxed{9^{9^{9^{9}}}}", "\\boxed{(10^{1000000})!}", "$9^{9^{9^{9}}}$ is the answer"]
    items = [(text, {"answer": "5"}) for text in hostile] + [("\\boxed{5}", {"answer": "5"})]
    with VerifierPool([RewardTerm(name="math")], workers=2, timeout_s=3.0) as pool:
        pool.score_many_sync([("\\boxed{1}", {"answer": "1"})])  # wait for start-up
        start = time.perf_counter()
        rewards = pool.score_many_sync(items)
        elapsed = time.perf_counter() - start
    assert [r.value for r in rewards] == [0.0, 0.0, 0.0, 1.0]
    assert all(r.info for r in rewards[:3])
    assert elapsed < 2 * 3.0 + 2.0  # two workers, each item bounded by the 3 s hard timeout
