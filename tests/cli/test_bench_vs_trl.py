"""The fair TRL benchmark's bookkeeping (scripts/bench_vs_trl.py): held-out prompts, config shape, statistics.

The benchmark itself (TRL and `rl train` runs) is run by hand; its numbers live in docs/benchmarks.md.
"""

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_vs_trl", ROOT / "scripts" / "bench_vs_trl.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_vs_trl"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_vs_trl", None)


def shape(**overrides) -> argparse.Namespace:
    base = dict(model="tiny-test", n=8, max_tokens=48, steps=9, prompts_per_step=4, micro_batch=16, lr=2e-5,
                ours_threads=[1, 1], staleness=1, eval_pool=400)  # fmt: skip
    return argparse.Namespace(**(base | overrides))


def test_heldout_prompts_are_outside_the_training_set(bench, tmp_path):
    from rl.hub.data import load_rows

    cfg = bench.freeze_config(shape(), tmp_path / "bench.yaml")
    train, _ = load_rows(cfg.data)
    assert len(train) >= 9 * 4  # spare rows: those asking an eval question are dropped
    held = bench.heldout_rows(cfg, 128)
    questions = [str(r["question"]) for r in held]
    assert len(questions) == len(set(questions)) == 128
    assert not set(questions) & {str(r["question"]) for r in train}


def test_too_small_eval_pool_is_a_clear_error(bench, tmp_path):
    cfg = bench.freeze_config(shape(eval_pool=50), tmp_path / "bench.yaml")
    with pytest.raises(SystemExit, match="raise --eval-pool"):
        bench.heldout_rows(cfg, 128)


def test_frozen_config_has_the_benchmark_shape(bench, tmp_path):
    from rl.config import load_config

    bench.freeze_config(shape(), tmp_path / "bench.yaml")
    cfg = load_config(tmp_path / "bench.yaml")
    assert (cfg.trainer.threads, cfg.rollout.threads, cfg.rollout.local_workers) == (1, 1, 1)
    assert (cfg.trainer.lr, cfg.sampling.n, cfg.trainer.prompts_per_step) == (2e-5, 8, 4)
    assert cfg.async_.max_staleness == 1


def test_throughput_is_steady_state_and_spread_is_median_and_range(bench):
    run = bench.Run(name="x", step_end_s=[30.0, 40.0, 50.0], wall_s=55.0, samples_per_step=32, rewards=[0, 0, 0])
    assert run.samples_per_s == pytest.approx(2 * 32 / 20.0)
    assert run.startup_s == 30.0
    assert bench.spread([1.0, 3.0, 2.0], ".1f") == "2.0 (1.0-3.0)"
    assert bench.spread([1.0], ".1f") == "1.0"


def fake_run(bench, name: str, speed: float, acc: float, pressure: float):
    return bench.Run(name=name, step_end_s=[10.0, 10.0 + 32 / speed], wall_s=60.0, samples_per_step=32,
                     rewards=[0.1, 0.2], heldout=acc, cpu_pressure=pressure)  # fmt: skip


def test_report_states_trl_setup_and_flags_runs_that_cannot_carry_a_verdict(bench, tmp_path):
    args = shape(model="tiny-test", steps=2, cores="0,1", threads=2, eval_prompts=128)
    cfg = bench.freeze_config(args, tmp_path / "bench.yaml")
    setup = bench.TrlSetup("hf", True, 16)
    notes = {"vllm_colocate": {"ran": False, "error": "AttributeError: no weight_loader"},
             "tuning": [{"generation": "hf", "bf16": True, "batch": 16, "samples_per_s": 1.0, "error": None}],
             "tune_steps": 3}  # fmt: skip
    trl = [fake_run(bench, "TRL", s, 0.40, 0.01) for s in (1.0, 1.1, 0.9)]
    ours = [fake_run(bench, "ours", s, 0.42, 0.01) for s in (3.2, 3.0, 3.4)]
    text, results = bench.report(args, cfg, trl, ours, setup, notes, base_acc=0.20)
    assert "AttributeError: no weight_loader" in text and "bf16 autocast, batch 16 x 2 accum" in text
    assert "| 3.200 (3.000-3.400) | 3.20x |" in text  # median (range) over the repeats, vs TRL's median
    assert results["goal_met"] and not results["caveats"]
    assert "NOT A VALID" not in text

    busy = [fake_run(bench, "TRL", 1.0, 0.21, 0.5)]
    text, results = bench.report(args, cfg, busy, [fake_run(bench, "ours", 3.5, 0.21, 0.5)], setup, notes, 0.20)
    assert "NOT A VALID MEASUREMENT" in text
    assert len(results["caveats"]) == 3  # one repeat, a busy machine, a policy that did not move


def test_a_tuning_made_on_another_cpu_is_refused(bench, tmp_path):
    """TRL's best setup depends on the CPU (bf16 autocast is fast only with bf16 units): a tuning file from
    another CPU names both and asks for a new tuning; one from this CPU and shape is taken."""
    args = shape(cores="0,1", trl_generation="auto")
    tuned = {
        "trl_setup": {"generation": "hf", "bf16": True, "batch": 16},
        "trl_notes": {},
        "shape": bench.shape_of(args),
    }
    path = tmp_path / "tuning.json"
    path.write_text(json.dumps(tuned))
    setup, notes = bench.choose_trl(argparse.Namespace(**vars(args), tuning=path), tmp_path)
    assert setup == bench.TrlSetup("hf", True, 16) and notes["from"] == str(path)
    elsewhere = {**tuned, "shape": {**tuned["shape"], "cpu": {"model": "Xeon", "isa": ["avx512_bf16", "amx_bf16"]}}}
    path.write_text(json.dumps(elsewhere))
    with pytest.raises(SystemExit, match="amx_bf16.*tune TRL here"):
        bench.choose_trl(argparse.Namespace(**vars(args), tuning=path), tmp_path)
