"""DeepSpeedStrategy on 2 ranks (`torchrun --nproc_per_node 2`, gloo on CPU), ZeRO-2 and ZeRO-3.

Each rank trains on half of a batch that rank 0 broadcasts (tests/helpers/strategy_worker.py).
The gathered weights must equal a single-process run on the whole batch, a policy version
streamed from the gather into shards must hold them bit for bit, the exported
HF directory must hold exactly the gathered weights, every rank must see the same
full weights, and a checkpoint reload must repeat the next step exactly.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import strategy_worker as worker

from rl.config import ModelConfig
from rl.trainer.strategy import DeepSpeedStrategy

pytestmark = pytest.mark.filterwarnings("ignore:`torch.distributed.*is deprecated:FutureWarning")

WORKER = Path(__file__).parents[1] / "helpers" / "strategy_worker.py"


def launch(stage: int, model_dir: Path, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)  # a fresh launch, whatever this process's group is
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(WORKER), "--stage", str(stage), "--model", str(model_dir), "--out", str(out)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=420)
    assert res.returncode == 0, f"torchrun failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}"
    return torch.load(out / "result.pt")


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_match_one_process(tiny_model_dir, tmp_path, stage):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    result = launch(stage, tiny_model_dir, tmp_path)

    single = DeepSpeedStrategy(ModelConfig(name=str(tiny_model_dir)), worker.trainer_config(stage))
    metrics = worker.run_schedule(single, worker.make_batch())
    expected = single.gather_state_dict()

    gathered = result["state"]
    initial = load_file(tiny_model_dir / "model.safetensors")
    assert gathered.keys() == initial.keys()
    assert min(float((gathered[k] - initial[k]).abs().max()) for k in initial) > 0  # every tensor trained
    assert max_diff(gathered, expected) < 5e-6
    assert [m["grad_norm"] for m in result["metrics"]] == pytest.approx([m["grad_norm"] for m in metrics], rel=1e-5)
    assert [m["lr"] for m in result["metrics"]] == [5e-4, 1e-3, 1e-3]
    assert result["ranks_agree"]
    assert result["uneven_ok"]

    # A policy version streamed from the gather into >= 3 shards holds the gathered weights bit for bit.
    shards = [tmp_path / "policy" / "v0" / f["name"] for f in result["published"]["shards"]]
    assert len(shards) >= 3
    published = {}
    for path in shards:
        published.update(load_file(path))
    assert list(published) == list(gathered)
    assert all(torch.equal(published[k], gathered[k]) for k in gathered)

    # The exported (publishable) weights are exactly the gathered ones and load cleanly.
    assert max_diff(load_file(tmp_path / "hf" / "model.safetensors"), gathered) == 0.0
    _, info = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]

    assert result["client_state"] == {"step": len(worker.MICRO_BATCHES)}
    assert max_diff(result["resumed"], result["after"]) == 0.0
    assert result["resumed_metrics"] == result["next_metrics"]
    assert max_diff(result["after"], gathered) > 0
