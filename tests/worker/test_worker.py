"""The worker loop (`run_worker`, `rl rollout`) against the real hub app on loopback.

HF engine in-thread for the loop logic (fast); the CLI as a subprocess for signals and exit
codes; one slow run with the real vLLM engine through a policy update. The hub is `LiveHub`
(the hub's app, rl/hub/routes.py, behind a `FaultProxy`), so every lease, rejection and re-registration
the worker sees is one the real hub makes; the proxy's record shows what the worker sent.
"""

from __future__ import annotations

import signal
import threading

import pytest
from helpers.policy import perturbed
from helpers.worker import accepted, check_logprobs, live_hub, rollout_cli, start_worker
from safetensors.torch import load_file

from rl.weights.store import write_version
from rollout_workers.engines import EngineSpec
from rollout_workers.worker import run_worker

ROOMY = {"trainer": {"prompts_per_step": 4, "micro_batch_size": 4}}
"""4 prompts per step, max_staleness 1: a v0 worker may hold 8 tasks without a trainer pulling."""
LOCKSTEP = {"trainer": {"prompts_per_step": 2, "micro_batch_size": 4}, "async": {"max_staleness": 0}}
"""On-policy: 2 tasks per version, and a new version sends every older worker to update first."""


@pytest.fixture(scope="module")
def shared(tiny_model_dir, tmp_path_factory):
    with live_hub(tmp_path_factory.mktemp("run"), tiny_model_dir, **ROOMY) as hub:
        yield hub


@pytest.fixture
def hub(shared):
    """The module's hub as if freshly started: no workers, no tasks handed out, nothing recorded."""
    shared.restart(keep_ledger=False)
    shared.proxy.exchanges.clear()
    return shared


def test_worker_leases_generates_submits_and_leaves(hub, tiny_model_dir, tmp_path):
    thread, result = start_worker(hub.url, tmp_path, max_prompts=6, prompts_per_lease=4)
    thread.join(timeout=120)
    assert result["rc"] == 0
    subs = accepted(hub)
    registration = hub.proxy.calls("POST", "/v1/workers", status=200)
    assert len(registration) == 1 and registration[0].sent()["engine"] == "hf" and registration[0].sent()["name"] == "t"
    worker_id = registration[0].json()["worker_id"]
    assert registration[0].sent()["wire"] == ["packed", "json"] and registration[0].json()["wire"] == "packed"
    assert all(isinstance(c.token_ids, str) and isinstance(c.logprobs, str)
               for s in accepted(hub, raw=True) for r in s.results for c in r.completions)  # fmt: skip
    assert [len(s.results) for s in subs] == [4, 2]
    sampling = hub.cfg.sampling
    for sub in subs:
        assert sub.policy_version == 0 and sub.worker_id == worker_id and sub.gen_seconds > 0
        for r in sub.results:
            assert len(r.completions) == sampling.n
            assert all(len(c.token_ids) <= sampling.max_tokens for c in r.completions)
    assert [e.status for e in hub.proxy.calls("DELETE", f"/v1/workers/{worker_id}")] == [200]
    check_logprobs(tiny_model_dir, None, hub, subs)
    # The real hub scored every group with the real verifier; all six wait for the trainer.
    hub.wait_for(lambda: hub.status().buffered == 6, what="six scored groups")


def test_worker_moves_to_new_policy(tiny_model_dir, tmp_path):
    """Lockstep: 2 tasks at v0, the trainer takes them and publishes v1, the worker updates and goes on."""
    v1 = perturbed(load_file(str(tiny_model_dir / "model.safetensors")), seed=1)
    with live_hub(tmp_path / "run", tiny_model_dir, **LOCKSTEP) as hub, hub.admin() as trainer:
        thread, result = start_worker(hub.url, tmp_path, max_prompts=4, prompts_per_lease=2)
        batch = trainer.pull(2, step=0, timeout_s=120)
        assert batch.complete and [g.policy_version for g in batch.groups] == [0, 0]
        write_version(hub.hub.policy_dir, 1, v1, "float32")
        trainer.publish(1)
        thread.join(timeout=120)
    assert result["rc"] == 0
    subs = accepted(hub)
    assert [s.policy_version for s in subs] == [0, 1]
    check_logprobs(tiny_model_dir, None, hub, subs[:1])
    check_logprobs(tiny_model_dir, v1, hub, subs[1:])
    assert sorted(p.name for p in (tmp_path / "cache").glob("v*")) == ["v0", "v1"]


def test_worker_rides_out_hub_outage_and_restart(hub, tmp_path):
    """The hub goes away mid-run and comes back with no memory of the worker: it re-registers and goes on.

    12 prompts, of which at most 8 (the staleness window, nobody trains) can be done before the outage.
    """
    thread, result = start_worker(hub.url, tmp_path, max_prompts=12, prompts_per_lease=2)
    hub.wait_for(lambda: accepted(hub), timeout=120, what="a first accepted submission")
    hub.stop()  # connections refused for a while
    threading.Event().wait(1.0)
    assert thread.is_alive()
    hub.restart()
    hub.proxy.fail_5xx = 3  # and a reverse proxy answers 503 while the hub starts up
    hub.start()
    thread.join(timeout=120)
    assert result["rc"] == 0
    ids = [e.json()["worker_id"] for e in hub.proxy.calls("POST", "/v1/workers", status=200)]
    assert len(ids) == 2 and ids[0] != ids[1]
    after = [s for s in accepted(hub) if s.worker_id == ids[1]]
    assert after, "no submission accepted after the restart"
    assert [e.status for e in hub.proxy.calls("DELETE", f"/v1/workers/{ids[1]}")] == [200]
    assert not hub.state.workers


def test_bad_token_exits_2(hub, tmp_path):
    assert run_worker(hub.url, "wrong", spec=EngineSpec(kind="hf"), cache_dir=tmp_path) == 2


def test_cli_sigterm_leaves_cleanly(hub, tmp_path):
    proc = rollout_cli(hub.url, tmp_path, "--engine", "hf", "--name", "cli")
    try:
        hub.wait_for(lambda: accepted(hub) or proc.poll() is not None, timeout=120, what="a submission")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    assert [e.status for e in hub.proxy.exchanges if e.method == "DELETE"] == [200]
    assert not hub.state.workers
    assert "registered with hub" in out and "loaded policy v0" in out


@pytest.mark.slow
def test_cli_vllm_worker_with_policy_update(tiny_model_dir, tmp_path):
    v1 = perturbed(load_file(str(tiny_model_dir / "model.safetensors")), seed=2)
    with live_hub(tmp_path / "run", tiny_model_dir, **LOCKSTEP) as hub, hub.admin() as trainer:
        proc = rollout_cli(hub.url, tmp_path, "--engine", "vllm", "--max-prompts", "4", "--prompts-per-lease", "2")
        try:
            batch = trainer.pull(2, step=0, timeout_s=240)
            if not batch.complete:
                proc.kill()
                pytest.fail(f"no batch; worker rc={proc.poll()}:\n{proc.communicate()[0][-5000:]}")
            write_version(hub.hub.policy_dir, 1, v1, "float32")
            trainer.publish(1)
            out, _ = proc.communicate(timeout=240)
        finally:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    subs = accepted(hub)
    assert [s.policy_version for s in subs] == [0, 1]
    check_logprobs(tiny_model_dir, None, hub, subs[:1])
    check_logprobs(tiny_model_dir, v1, hub, subs[1:])
    assert [e.status for e in hub.proxy.exchanges if e.method == "DELETE"] == [200]
