"""`rl plan`: architectures built on the meta device, memory per ZeRO stage, KV cache, weight-sync cost.

Checked against published parameter counts, DeepSpeed's own estimator, and the optimizer
state a real DeepSpeed engine allocates for a tiny model on CPU. Nothing is downloaded.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from rl.cli.main import app
from rl.config import ModelConfig, TrainerConfig, load_config
from rl.plan.estimate import GIB, make_plan, trainer_plan, worker_plan
from rl.plan.inputs import Hardware, PlanError, TrainerSetup, WorkerSetup
from rl.plan.specs import SPECS, ArchitectureError, resolve_architecture

ROOT = Path(__file__).resolve().parents[2]
RL = [sys.executable, "-m", "rl.cli"]
runner = CliRunner()

DS_TOLERANCE = 0.12
"""Model states agree with DeepSpeed's estimator within 12%. Where they differ it is by design: at
ZeRO-3 without offload DeepSpeed counts 18 bytes per parameter and rank, we count 20 (16-bit weights
and gradients, fp32 master, two fp32 Adam moments, and the fp32 gradient partition at the step)."""


def hw(gpus: int, mem: float = 80.0, **kw) -> Hardware:
    return Hardware(gpus=gpus, gpu_mem_gib=mem, trainer_gpus=gpus, gpus_per_node=min(8, gpus), **kw)


# --------------------------------------------------------------------------- architectures


@pytest.mark.parametrize(
    "name, published_billions",
    [
        ("Qwen/Qwen2.5-0.5B-Instruct", 0.49),
        ("Qwen/Qwen2.5-1.5B-Instruct", 1.54),
        ("Qwen/Qwen2.5-7B-Instruct", 7.61),
        ("Qwen/Qwen2.5-14B-Instruct", 14.7),
        ("Qwen/Qwen2.5-32B-Instruct", 32.8),
        ("Qwen/Qwen2.5-72B-Instruct", 72.7),
    ],
)
def test_qwen_specs_count_the_published_sizes(name, published_billions):
    arch = resolve_architecture(name)
    assert arch.source.startswith("built-in spec")
    assert arch.params / 1e9 == pytest.approx(published_billions, rel=0.01)
    # The largest single module is the embedding (or the untied lm_head of the same shape).
    assert arch.largest_layer_params == arch.vocab_size * arch.hidden_size


def test_tied_embeddings_are_counted_once():
    tied = resolve_architecture("Qwen/Qwen2.5-0.5B")
    assert tied.tie_word_embeddings
    untied_spec = {**SPECS["Qwen/Qwen2.5-0.5B"], "tie_word_embeddings": False}
    from transformers import AutoConfig

    from rl.plan.specs import count_parameters

    spec = dict(untied_spec)
    untied, _ = count_parameters(AutoConfig.for_model(spec.pop("model_type"), **spec))
    assert untied - tied.params == tied.vocab_size * tied.hidden_size


def test_local_directory_counts_the_real_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    arch = resolve_architecture(str(tiny_model_dir))
    real = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert arch.params == sum(p.numel() for p in real.parameters())
    assert (arch.hidden_size, arch.num_layers, arch.num_kv_heads, arch.head_dim) == (64, 2, 1, 32)
    assert arch.source.endswith("config.json")


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(ArchitectureError, match="unknown model 'acme/nope-13b'.*Qwen/Qwen2.5-7B"):
        resolve_architecture("acme/nope-13b")
    with pytest.raises(ArchitectureError, match="has no config.json"):
        resolve_architecture(str(tmp_path))


# --------------------------------------------------------------------------- trainer


def test_7b_full_finetune_fits_8x80_with_zero3_not_with_zero0():
    cfg = load_config(ROOT / "configs/qwen2.5-7b.yaml")
    plan = make_plan(cfg, hw(8))
    assert plan.trainer_setup.zero_stage == 3 and plan.trainer.fits and plan.fits
    assert plan.trainer.gpu_total < 60 * GIB
    zero0 = make_plan(load_config(ROOT / "configs/qwen2.5-7b.yaml", ["trainer.zero_stage=0"]), hw(8))
    assert not zero0.trainer.fits and not zero0.fits
    assert any("trainer.zero_stage=3" in s for s in zero0.trainer.suggestions)


def test_72b_on_8x80_without_offload_does_not_fit_and_says_what_would():
    cfg = load_config(ROOT / "configs/qwen2.5-72b.yaml", ["trainer.deepspeed=configs/deepspeed/zero3.json"])
    plan = make_plan(cfg, hw(8))
    assert not plan.trainer.fits
    text = " | ".join(plan.trainer.suggestions)
    assert "configs/deepspeed/zero3_offload.json" in text and "host memory per node" in text
    assert "--gpus 32" in text
    # The suggestions are true: with offload it fits, and so it does on 32 GPUs.
    assert make_plan(load_config(ROOT / "configs/qwen2.5-72b.yaml"), hw(8)).trainer.fits
    assert make_plan(cfg, hw(32)).trainer.fits


def test_offload_moves_optimizer_state_to_host_memory_per_node():
    cfg = load_config(ROOT / "configs/qwen2.5-72b.yaml")
    plan = make_plan(cfg, hw(16, cpu_mem_gib=512))
    p = plan.model.params
    # fp32 master + two Adam moments + fp32 gradients: 16 bytes per parameter, sharded over 16 ranks, 8 per node.
    assert plan.trainer.cpu_per_node == pytest.approx(16 * p / 16 * 8, rel=1e-6)
    assert plan.trainer.cpu_fits is False and not plan.fits
    assert any("host memory" in s for s in plan.trainer.suggestions)
    assert make_plan(cfg, hw(16, cpu_mem_gib=1024)).fits


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("stage, offload", [(2, False), (2, True), (3, False), (3, True)])
@pytest.mark.parametrize("gpus", [8, 16])
def test_model_states_agree_with_deepspeeds_estimator(name, stage, offload, gpus):
    arch = resolve_architecture(name)
    cfg = load_config(ROOT / "configs/qwen2.5-7b.yaml", [f"model.name={name}"])
    setup = replace(TrainerSetup.from_config(cfg), zero_stage=stage, offload_optimizer=offload)
    plan = trainer_plan(arch, setup, hw(gpus))
    diff = (plan.model_states - plan.deepspeed_gpu) / plan.deepspeed_gpu
    assert abs(diff) <= DS_TOLERANCE, diff
    if stage == 2 or offload:  # the same layout: 2P + 18P/N (ZeRO-2), 2P/N + 4L (ZeRO-3 offload)
        assert plan.model_states == pytest.approx(plan.deepspeed_gpu, abs=8)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_planned_optimizer_state_is_what_deepspeed_allocates(tiny_model_dir, stage, dtype):
    """A real one-rank DeepSpeed engine on CPU after one step: Adam moments and fp32 master copy, in bytes."""
    from rl.trainer.strategy import DeepSpeedStrategy

    strategy = DeepSpeedStrategy(
        ModelConfig(name=str(tiny_model_dir), dtype=dtype),
        TrainerConfig(zero_stage=stage, lr=1e-3, threads=1, micro_batch_size=4),
    )
    ids = torch.randint(3, 300, (4, 12))
    logp, _ = strategy.token_logprobs(ids, torch.ones_like(ids))
    strategy.backward(-logp.sum() / 100)
    strategy.step()
    opt = strategy.engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    adam = sum(t.nbytes for s in inner.state.values() for k, t in s.items() if k in ("exp_avg", "exp_avg_sq"))
    master = 0
    for attr in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups"):
        groups = getattr(opt, attr, None)
        if groups:
            flat = [t for g in groups for t in (g if isinstance(g, list) else [g])]
            master = sum(t.nbytes for t in flat)
            break

    arch = resolve_architecture(str(tiny_model_dir))
    cfg = load_config(ROOT / "configs/tiny-test.yaml", [f"model.name={tiny_model_dir}", f"model.dtype={dtype}"])
    setup = replace(TrainerSetup.from_config(cfg), zero_stage=stage)
    rows = {r.name: r.bytes for r in trainer_plan(arch, setup, hw(1)).gpu_rows}
    assert rows["Adam moments (fp32 m, v)"] == pytest.approx(adam, rel=0.01)
    assert rows.get("fp32 master weights", 0) == pytest.approx(master, rel=0.01)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_activation_estimate_covers_what_autograd_saves(tmp_path, dtype):
    """The per-layer activation row against the bytes autograd really keeps for backward (no checkpointing).

    Counted with saved-tensor hooks on a Qwen2-shaped model (SwiGLU, GQA, SDPA) through the trainer's
    own log-prob path; the estimate may be high (it is a budget) but by no more than 25%.
    """
    from transformers import AutoModelForCausalLM, Qwen2Config

    from rl.plan.estimate import DTYPE_BYTES, activation_bytes_per_token_layer
    from rl.trainer.strategy import selected_logprobs

    config = Qwen2Config(hidden_size=256, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=1, vocab_size=2000, tie_word_embeddings=False)  # fmt: skip
    config.save_pretrained(tmp_path)
    arch = resolve_architecture(str(tmp_path))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            saved[ptr] = max(saved.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    batch, length = 4, 128
    ids = torch.randint(0, arch.vocab_size, (batch, length))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits[:, :-1]
        selected_logprobs(logits, ids[:, 1:])
    tokens = batch * length
    logits_saved = tokens * arch.vocab_size * 4  # the fp32 logits / log-softmax the loss keeps
    measured = sum(saved.values()) - logits_saved
    planned = tokens * arch.num_layers * activation_bytes_per_token_layer(arch, DTYPE_BYTES[dtype])
    assert measured <= planned <= 1.25 * measured, (planned, measured)


# --------------------------------------------------------------------------- workers and sync


def test_worker_kv_cache_and_tensor_parallel():
    cfg = load_config(ROOT / "configs/qwen2.5-7b.yaml")
    arch = resolve_architecture(cfg.model.name)
    setup = WorkerSetup.from_config(cfg)
    plan = worker_plan(arch, setup, 80)
    assert plan.kv_bytes_per_token == 2 * 28 * 4 * 128 * 2  # K and V, layers, kv heads, head dim, bf16
    assert plan.kv_tokens == plan.kv_cache // plan.kv_bytes_per_token
    assert plan.fits and plan.sequences_at_max_len > 100
    # TP 2 halves the weights per GPU and the KV heads per GPU: more KV cache, same bytes per token x 1/2.
    tp2 = worker_plan(arch, replace(setup, tensor_parallel=2), 80)
    assert tp2.kv_bytes_per_token * 2 == plan.kv_bytes_per_token and tp2.kv_cache > plan.kv_cache
    assert "divisible" in worker_plan(arch, replace(setup, tensor_parallel=3), 80).problem


def test_72b_worker_on_one_gpu_does_not_fit_and_suggests_tp():
    cfg = load_config(ROOT / "configs/qwen2.5-72b.yaml", ["rollout.tensor_parallel=1"])
    plan = make_plan(cfg, hw(16))
    assert not plan.worker.fits and "exceed" in plan.worker.problem
    assert any("--tp 4" in s for s in plan.worker.suggestions)


def test_weight_sync_costs():
    cfg = load_config(ROOT / "configs/qwen2.5-7b.yaml")
    plan = make_plan(cfg, hw(8, workers=8, bandwidth_gbit=10.0, sites=2, site_bandwidth_gbit=100.0))
    s, p = plan.sync, plan.model.params
    assert s.full_bytes == 2 * p
    assert s.delta_bytes == int(p * 0.0122 * (4 + 2))
    assert s.full_s_from_hub == pytest.approx(8 * 2 * p * 8 / 10e9)
    assert s.full_s_via_caches == pytest.approx(2 * p * 8 * (2 / 10e9 + 4 / 100e9))
    denser = make_plan(cfg, hw(8, change_density=0.05)).sync
    assert denser.delta_bytes == int(p * 0.05 * 6)


def test_bad_hardware_is_a_clear_error():
    cfg = load_config(ROOT / "configs/qwen2.5-7b.yaml")
    with pytest.raises(PlanError, match="--gpus must be at least 1"):
        make_plan(cfg, Hardware(gpus=0, gpu_mem_gib=80, trainer_gpus=0, gpus_per_node=8))
    with pytest.raises(PlanError, match="--change-density"):
        make_plan(cfg, hw(8, change_density=1.5))
    with pytest.raises(PlanError, match="not found"):
        make_plan(load_config(ROOT / "configs/qwen2.5-7b.yaml", ["trainer.deepspeed=nope.json"]), hw(8))


# --------------------------------------------------------------------------- the command


@pytest.mark.slow
def test_cli_json_is_all_of_stdout():
    """A fresh process: DeepSpeed's start-up log must not land in the JSON."""
    res = subprocess.run(
        [*RL, "plan", "configs/qwen2.5-72b.yaml", "--gpus", "8", "--gpu-mem", "80", "--json",
         "trainer.deepspeed=configs/deepspeed/zero3.json"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    plan = json.loads(res.stdout)
    assert plan["fits"] is False and plan["trainer"]["suggestions"]


def test_cli_table(monkeypatch):
    monkeypatch.chdir(ROOT)
    res = runner.invoke(app, ["plan", "configs/qwen2.5-7b.yaml", "--gpus", "8", "--gpu-mem", "80", "--workers", "8"])
    assert res.exit_code == 0, res.output
    for text in ("ZeRO-3", "DeepSpeed's estimator", "KV cache", "delta (1.22% changed)", "fits this hardware"):
        assert text in res.stdout


def test_cli_bad_input_exits_2_with_a_message(monkeypatch):
    monkeypatch.chdir(ROOT)
    res = runner.invoke(app, ["plan", "configs/qwen2.5-7b.yaml", "--gpus", "0"])
    assert res.exit_code == 2 and "--gpus must be at least 1" in res.stderr
    res = runner.invoke(app, ["plan", "configs/qwen2.5-7b.yaml", "--gpus", "8", "model.name=acme/nope-13b"])
    assert res.exit_code == 2 and "unknown model 'acme/nope-13b'" in res.stderr
