"""Continuous batching in the worker: several leases in flight, background submissions, policy
updates between in-flight prompts, and a drain on SIGTERM.

Against the real hub app (`LiveHub`, faults from its `FaultProxy`); the proxy's record of the
exchanges and the hub's own state are what the assertions read. The vLLM test checks the one
property that matters for training: every completion is tagged with the policy version whose
weights generated it (its logprobs match an HF forward of exactly that version).
"""

from __future__ import annotations

import signal

import pytest
from helpers.policy import perturbed
from helpers.worker import accepted, check_logprobs, live_hub, rollout_cli, start_worker
from safetensors.torch import load_file

from rl.weights.store import write_version
from rl.wire.protocol import Lease

ROOMY = {"trainer": {"prompts_per_step": 4, "micro_batch_size": 4}}
"""4 prompts per step, max_staleness 1: a v0 worker may hold 8 tasks without a trainer pulling."""
ROLLOUTS = "/v1/rollouts"


def granted(hub) -> list[int]:
    """Positions (in the proxy's record) of the lease requests that got tasks."""
    return [
        i
        for i, e in enumerate(hub.proxy.exchanges)
        if e.path == "/v1/leases" and e.status == 200 and Lease.model_validate_json(e.response).lease_id
    ]


def rollout_positions(hub, status: int) -> list[int]:
    return [i for i, e in enumerate(hub.proxy.exchanges) if e.path == ROLLOUTS and e.status == status]


def test_submissions_go_on_in_the_background_and_a_failed_one_is_retried(tiny_model_dir, tmp_path):
    """The hub answers the first submissions with 503s: the worker retries them in the background
    while it leases and generates on, and nothing is lost or counted twice."""
    with live_hub(tmp_path / "run", tiny_model_dir, **ROOMY) as hub:
        hub.proxy.fail_path[ROLLOUTS] = 3  # ~1.4 s of retries with the client's backoff
        # 3 prompts in flight: the leases come one after another, not all eight prompts at once.
        thread, result = start_worker(hub.url, tmp_path, max_prompts=8, prompts_per_lease=2, max_inflight_prompts=3)
        thread.join(timeout=120)
        assert result["rc"] == 0
        subs = accepted(hub)
        leases = granted(hub)
        failed, ok = rollout_positions(hub, 503), rollout_positions(hub, 200)
        assert len(failed) == 3 and len(ok) == 4 == len(leases)
        # Leasing went on while the first submission was failing: not blocked behind it.
        assert any(failed[0] < i < ok[0] for i in leases), "no lease while the first submission was retried"
        assert sorted(r.task_id for s in subs for r in s.results) == list(range(8))
        assert all(s.policy_version == 0 and len(s.results) == 2 for s in subs)
        hub.wait_for(lambda: hub.status().buffered == 8, what="eight scored groups")
        assert not hub.state.leases and not hub.state.workers


def test_sigterm_finishes_and_submits_what_is_in_flight(tiny_model_dir, tmp_path):
    """SIGTERM while a submission is failing: the worker still delivers it (and everything it had
    started), then leaves; the leases it had not started go back to the queue. None lost."""
    with live_hub(tmp_path / "run", tiny_model_dir, **ROOMY) as hub:
        hub.proxy.fail_path[ROLLOUTS] = 4
        proc = rollout_cli(hub.url, tmp_path, "--engine", "hf", "--name", "cli", "--prompts-per-lease", "2")
        try:
            hub.wait_for(lambda: rollout_positions(hub, 503) or proc.poll() is not None, timeout=120,
                         what="a first (failing) submission")  # fmt: skip
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=120)
        finally:
            proc.kill()
        assert proc.returncode == 0, out[-3000:]
        leases = [Lease.model_validate_json(hub.proxy.exchanges[i].response) for i in granted(hub)]
        # The hf engine finishes leases in order: the failing submission was the first lease's.
        delivered = {s.lease_id for s in accepted(hub)}
        assert leases[0].lease_id in delivered, f"the submission failing at SIGTERM was lost:\n{out[-3000:]}"
        assert [e.status for e in hub.proxy.exchanges if e.method == "DELETE"] == [200]
        # Every task handed out was either accepted or re-queued when the worker left.
        state = hub.state
        assert not state.leases and not state.workers
        handed_out = {t.task_id for lease in leases for t in lease.tasks}
        done = {r.task_id for s in accepted(hub) for r in s.results}
        assert handed_out == done | (handed_out & set(state.queue))
        assert "finishing the prompts in flight" in out


def gone_leases(hub) -> list[str]:
    """Lease ids the hub's heartbeat answers named as no longer held, in order."""
    beats = [e for e in hub.proxy.exchanges if e.path.endswith("/heartbeat") and e.status == 200]
    return [lease_id for e in beats for lease_id in e.json().get("gone", [])]


def test_a_lease_the_hub_expired_leaves_the_engine_at_the_next_heartbeat(tiny_model_dir, tmp_path):
    """A lease slower than its life (16 prompts of 8 x 400 tokens, 8 prompts per hf engine step of ~4 s, against 1 s):
    the hub re-queues it, the next heartbeat says so, and the worker drops its prompts rather than
    finishing them for a submission the hub would refuse. Its tasks are leased again, nothing is lost."""
    sections = {"hub": {"lease_ttl_s": 1.0, "heartbeat_interval_s": 0.25}, "sampling": {"n": 8, "max_tokens": 400},
                "model": {"max_model_len": 640}, "trainer": {"prompts_per_step": 8, "micro_batch_size": 4}}  # fmt: skip
    with live_hub(tmp_path / "run", tiny_model_dir, **sections) as hub:
        proc = rollout_cli(hub.url, tmp_path, "--engine", "hf", "--name", "slow", "--prompts-per-lease", "16")
        try:
            hub.wait_for(lambda: gone_leases(hub) or proc.poll() is not None, timeout=120, what="an expired lease")
            first = gone_leases(hub)[0]
            # its tasks are free again, and leased again
            hub.wait_for(lambda: len(granted(hub)) >= 2 or proc.poll() is not None, timeout=60, what="a second lease")
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=120)
        finally:
            proc.kill()
        assert proc.returncode == 0, out[-3000:]
        said = "".join(out.split())  # the console may wrap a log line anywhere
        assert f"lease{first}isgoneatthehub" in said, out[-3000:]
        sent = [e.sent().get("lease_id") for e in hub.proxy.exchanges if e.path == ROLLOUTS and e.request]
        assert first not in sent, "the worker finished and sent a lease the hub had re-queued"
        # Every task is accepted, leased to nobody (the worker left) and queued, or still being scored: none lost.
        state = hub.state
        handed_out = {
            t.task_id for i in granted(hub) for t in Lease.model_validate_json(hub.proxy.exchanges[i].response).tasks
        }
        done = {r.task_id for s in accepted(hub) for r in s.results}
        assert handed_out <= done | set(state.queue)


@pytest.mark.slow
def test_vllm_leases_in_flight_and_versions_through_a_policy_update(tiny_model_dir, tmp_path):
    """vLLM worker, 2 prompts per lease, up to 8 in flight: several leases run in the engine at
    once; v1 is published while they run. Each submission carries the version that generated
    it (checked against HF logprobs of v0 and v1), and all 12 prompts arrive."""
    v1 = perturbed(load_file(str(tiny_model_dir / "model.safetensors")), seed=3)
    # Long completions (96 tokens): generating a lease takes far longer than leasing the next.
    sections = {**ROOMY, "sampling": {"n": 2, "max_tokens": 96}}
    with live_hub(tmp_path / "run", tiny_model_dir, **sections) as hub:
        proc = rollout_cli(hub.url, tmp_path, "--engine", "vllm", "--prompts-per-lease", "2",
                           "--max-inflight-prompts", "8", "--max-prompts", "12")  # fmt: skip
        try:
            # Publish while several leases are in the engine.
            hub.wait_for(lambda: len(granted(hub)) >= 3 or proc.poll() is not None, timeout=240, what="3 leases")
            write_version(hub.hub.policy_dir, 1, v1, "float32")
            hub.publish(1)
            out, _ = proc.communicate(timeout=240)
        finally:
            proc.kill()
        assert proc.returncode == 0, out[-3000:]
        first_submission = min(i for i, e in enumerate(hub.proxy.exchanges) if e.path == ROLLOUTS)
        assert len([i for i in granted(hub) if i < first_submission]) >= 3, "leases were not in flight together"
        subs = accepted(hub)
        assert sorted(r.task_id for s in subs for r in s.results) == list(range(12))
        versions = [s.policy_version for s in subs]
        assert set(versions) == {0, 1}, versions  # the v0 window holds 8 tasks: the last 4 need v1
        for version, state in ((0, None), (1, v1)):
            for sub in (s for s in subs if s.policy_version == version):
                check_logprobs(
                    tiny_model_dir, state, hub, [sub.model_copy(update={"results": [r]}) for r in sub.results]
                )
