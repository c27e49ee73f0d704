"""`rl train` on 2 trainer ranks under torchrun (gloo on CPU), ZeRO-2 and ZeRO-3, end to end.

Rank 0 starts the hub and the local vLLM worker and broadcasts each batch; rank 1 only
trains. The published policy versions must hold the gathered (full) trainer weights:
the last version equals the `final/` export, and both moved away from the initial model.
"""

from __future__ import annotations

import re

import helpers.train as h
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::FutureWarning")]


@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_end_to_end(tiny_model_dir, tmp_path, stage):
    from safetensors.torch import load_file

    run_dir = tmp_path / "run"
    config = h.train_config(
        run_dir,
        tiny_model_dir,
        trainer={"max_steps": 2, "micro_batch_size": 1, "deepspeed": f"configs/deepspeed/zero{stage}.json"},
    )
    log = tmp_path / "train.log"
    code = h.run_train(config, log, ranks=2, timeout=400)
    text = log.read_text()
    assert code == 0, h.tail(log)
    assert f"DeepSpeed ZeRO-{stage} engine on cpu: rank 1/2" in text

    # Only rank 0 started children and wrote the run's logs; each step trained every sequence once.
    assert sorted(p.name for p in (run_dir / "logs").iterdir()) == ["hub.log", "worker-0.log"]
    assert text.count("hub at http://") == 1
    assert int(re.search(r"hub at http://127\.0\.0\.1:(\d+)", text).group(1)) > 0  # hub.port 0: a free port
    metrics = h.by_step(h.read_jsonl(run_dir / "metrics.jsonl"))
    assert sorted(metrics) == [1, 2]
    assert all(m["sequences"] == 2 * 2 and m["grad_norm"] > 0 for m in metrics.values())

    published = load_file(run_dir / "policy" / "v2" / "model.safetensors")
    exported = load_file(run_dir / "final" / "model.safetensors")
    initial = load_file(tiny_model_dir / "model.safetensors")
    assert published.keys() == exported.keys() == initial.keys()
    assert all((published[k] == exported[k]).all() for k in published)
    assert any((published[k] != initial[k]).any() for k in published)
