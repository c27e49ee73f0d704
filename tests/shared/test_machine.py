"""`rollout.dtype: auto` and `model.dtype: auto`: bf16 only where the machine computes it natively, resolved once,
when the config loads."""

from __future__ import annotations

import yaml

from rl.config import dump_config, load_config
from rl.config.machine import native_rollout_dtype, rollout_dtype_for

AVX2_ONLY = """processor\t: 0
vendor_id\t: AuthenticAMD
flags\t\t: fpu vme sse sse2 avx avx2 fma bmi2
"""
SAPPHIRE_RAPIDS = "flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
ARM_V9 = "Features\t: fp asimd evtstrm aes sve2 bf16 i8mm\n"


def test_bf16_only_where_it_is_native():
    assert rollout_dtype_for(gpu=False, cpuinfo=AVX2_ONLY) == "float32"
    assert rollout_dtype_for(gpu=False, cpuinfo=SAPPHIRE_RAPIDS) == "bfloat16"
    assert rollout_dtype_for(gpu=False, cpuinfo=ARM_V9) == "bfloat16"
    assert rollout_dtype_for(gpu=True, cpuinfo=AVX2_ONLY) == "bfloat16"
    assert rollout_dtype_for(gpu=False, cpuinfo=None) == "float32"  # unknown: never emulated
    assert rollout_dtype_for(gpu=False, cpuinfo="model name\t: avx512_bf16 in a name, not a flag\n") == "float32"


def test_auto_resolves_when_the_config_loads(tmp_path):
    cfg = load_config(None, ["rollout.dtype=auto"])
    assert cfg.rollout.dtype == native_rollout_dtype() in ("float32", "bfloat16")
    # the run directory's config names the dtype: every process of the run (hub, trainer, workers) uses the same
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(cfg))
    assert yaml.safe_load(path.read_text())["rollout"]["dtype"] == cfg.rollout.dtype
    assert load_config(path, []).rollout.dtype == cfg.rollout.dtype
    assert load_config(None, ["rollout.dtype=bfloat16"]).rollout.dtype == "bfloat16"  # explicit stays explicit


def test_model_dtype_auto_resolves_too(tmp_path):
    """`model.dtype: auto` (the trainer's, and the workers' unless `rollout.dtype` says): the same rule."""
    cfg = load_config(None, ["model.dtype=auto"])
    assert cfg.model.dtype == native_rollout_dtype()
    assert (cfg.rollout.dtype or cfg.model.dtype) == cfg.model.dtype
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path, []).model.dtype == cfg.model.dtype
    assert load_config(None, ["model.dtype=float32"]).model.dtype == "float32"
