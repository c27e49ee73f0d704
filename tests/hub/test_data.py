"""Data layer: sources, templating, too-long prompts, deterministic order, clear errors."""

from __future__ import annotations

import json

import pytest

from rl.config import load_config
from rl.hub.data import DataError, PromptSet, build_messages, load_rows


def test_reasoning_gym_rows_are_deterministic_and_eval_is_disjoint_seeded():
    cfg = load_config("configs/quickstart.yaml").data
    train, evals = load_rows(cfg)
    again, _ = load_rows(cfg)
    assert train == again and len(evals) == cfg.eval_size
    asked = {r["question"] for r in evals}
    assert not any(r["question"] in asked for r in train)  # held out: one-digit sums repeat questions
    assert 0 < len(train) < cfg.source.size
    assert train[0]["metadata"]["source_dataset"] == "basic_arithmetic"
    json.dumps(train[0])  # rows cross process/HTTP boundaries as JSON


def test_messages_have_system_few_shot_and_question():
    cfg = load_config("configs/quickstart.yaml").data
    msgs = build_messages({"question": "Calculate 1 + 1.", "answer": "2"}, cfg)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert msgs[-1]["content"] == "Calculate 1 + 1." and "<answer>" in msgs[2]["content"]
    conversation = [{"role": "user", "content": "hi"}]
    assert build_messages({"question": conversation, "answer": ""}, cfg) == conversation


def test_jsonl_source_and_errors(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"q": f"question {i}", "a": str(i), "extra": i}) for i in range(5)))
    cfg = load_config(None, [f"data.source={{type: jsonl, path: {path}, prompt_field: q, answer_field: a}}",
                             "data.eval_size=2"]).data  # fmt: skip
    train, evals = load_rows(cfg)
    assert [r["answer"] for r in train] == ["0", "1", "2"] and [r["extra"] for r in evals] == [3, 4]
    path.write_text('{"q": "x", "a": "1"}\n{broken\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: not valid JSON"):
        load_rows(cfg)
    path.write_text('{"question": "x"}\n' * 3)
    with pytest.raises(DataError, match="has no column 'q'"):
        load_rows(cfg)


def test_training_rows_never_ask_an_eval_question(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"prompt": q, "answer": "1"} for q in ("a", "b", "a", "c", "a ")]  # the eval split asks "c" and "a "
    path.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = load_config(None, [f"data.source={{type: jsonl, path: {path}}}", "data.eval_size=2"]).data
    train, evals = load_rows(cfg)
    assert [r["question"] for r in train] == ["b"] and [r["question"] for r in evals] == ["c", "a "]
    path.write_text("\n".join(json.dumps({"prompt": "same", "answer": "1"}) for _ in range(3)))
    with pytest.raises(DataError, match="every training row asks one of the 2 eval questions"):
        load_rows(cfg)


def test_hf_datasets_source_from_local_files(tmp_path):
    path = tmp_path / "d.json"
    path.write_text("\n".join(json.dumps({"prompt": f"p{i}", "answer": str(i)}) for i in range(6)))
    cfg = load_config(None, [f"data.source={{type: hf, path: json, data_files: {path}}}", "data.eval_size=1"]).data
    train, evals = load_rows(cfg)
    assert len(train) == 5 and evals[0]["question"] == "p5"


def test_humaneval_source():
    cfg = load_config(None, ["data.source={type: humaneval, limit: 10}", "data.eval_size=2"]).data
    train, evals = load_rows(cfg)
    assert len(train) == 8 and {"test", "entry_point", "question"} <= set(train[0])


def test_unknown_reasoning_gym_dataset_is_a_clear_error():
    cfg = load_config(None, ["data.source.dataset=no_such_task"]).data
    with pytest.raises(DataError, match="no_such_task"):
        load_rows(cfg)


def test_prompt_set_skips_too_long_prompts(tiny_tokenizer):
    cfg = load_config(None, ["data.max_prompt_tokens=20"]).data
    rows = [{"question": "short", "answer": "1"}, {"question": "long " * 50, "answer": "2"}]
    prompts = PromptSet.build(rows, cfg, tiny_tokenizer)
    assert len(prompts) == 1 and prompts.skipped_too_long == 1
    text = tiny_tokenizer.decode(prompts.prompt_ids[0])
    assert text.endswith("<|im_start|>assistant\n") and "short" in text
    with pytest.raises(DataError, match="no prompt fits"):
        PromptSet.build(rows[1:], cfg, tiny_tokenizer)


def test_a_rows_tools_are_rendered_by_a_template_that_shows_them_and_a_template_that_does_not_is_named(
    tiny_tokenizer, caplog
):
    import copy

    cfg = load_config(None, ["data.max_prompt_tokens=200"]).data
    tools = [{"type": "function", "function": {"name": "multiply", "description": "", "parameters": {}}}]
    rows = [{"question": "What is 12 * 34?", "answer": "408", "tools": tools}]
    showing = copy.deepcopy(tiny_tokenizer)
    showing.chat_template = "{% if tools %}TOOLS {{ tools | tojson }}\n{% endif %}" + tiny_tokenizer.chat_template
    with caplog.at_level("WARNING", logger="rl.hub.data"):
        shown = PromptSet.build(rows, cfg, showing)
    assert tiny_tokenizer.decode(shown.prompt_ids[0]).startswith('TOOLS [{"type": "function"')
    assert "does not show them" not in caplog.text
    with caplog.at_level("WARNING", logger="rl.hub.data"):
        hidden = PromptSet.build(rows, cfg, tiny_tokenizer)  # the tiny ChatML template ignores tools
    assert "multiply" not in tiny_tokenizer.decode(hidden.prompt_ids[0])
    assert "the model's chat template does not show them" in caplog.text
