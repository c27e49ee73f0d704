"""Random-weight Qwen2 models of real sizes (rl/models.py), for GPU checks without a model hub."""

from __future__ import annotations

import json

import pytest
import torch

from rl import models


@pytest.mark.parametrize(("size", "params"), [("0.5b", 494_032_768), ("1.5b", 1_543_714_304)])
def test_shapes_have_the_released_parameter_counts(size, params):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(models.qwen2_config(size))
    assert sum(p.numel() for p in model.parameters()) == params  # Qwen2.5-0.5B / -1.5B, tied embeddings
    with pytest.raises(models.ModelError, match="unknown Qwen2 size"):
        models.qwen2_config("3b")


@pytest.mark.slow
def test_random_alias_builds_a_full_vocabulary_model(tmp_path, monkeypatch):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("SCATTER_RL_CACHE", str(tmp_path))
    path = models.prepare_model("random-qwen2-tiny")
    assert models.verify_manifest(path) is None
    config = json.loads((path / "config.json").read_text())
    assert config["vocab_size"] == models.QWEN2_VOCAB and config["tie_word_embeddings"]
    with safe_open(path / "model.safetensors", "pt") as f:
        assert all(f.get_slice(k).get_dtype() == "BF16" for k in f.keys())  # noqa: SIM118

    tok = AutoTokenizer.from_pretrained(path)
    assert len(tok) == models.QWEN2_VOCAB
    # Every id a random model samples decodes to text, so text rewards differ between completions.
    assert tok.decode([600, 151935], skip_special_tokens=True) == "<w600><w151935>"
    messages = [{"role": "user", "content": "What is 3 + 4?"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert max(prompt) < 512  # real text still encodes to the small BPE vocabulary
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
