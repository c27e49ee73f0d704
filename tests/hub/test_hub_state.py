"""Hub bookkeeping rules without HTTP: leases, expiry, staleness window, idempotency, ledger."""

from __future__ import annotations

import pytest
from helpers.hub_state import N, good_result, make_state, pending_jobs, register, score, submit  # noqa: E402
from pydantic import ValidationError

from rl.config import load_config
from rl.hub.data import PromptOrder, PromptSet
from rl.hub.state import HubError, HubState
from rl.hub.submissions import validate_submission
from rl.trainer.batch import eval_metrics, rollout_metrics
from rl.wire.protocol import (
    Completion,
    EvalRequest,
    LeaseRequest,
    RegisterRequest,
    SubmitRequest,
    TaskResult,
)
from verifiers import Reward


def test_prompt_order_is_deterministic_and_resumable():
    a = PromptOrder(7, seed=3)
    seq = [a.next()[1] for _ in range(20)]
    b = PromptOrder(7, seed=3, position=9)
    assert [b.next()[1] for _ in range(11)] == seq[9:]
    assert sorted(seq[:7]) == list(range(7)) and sorted(seq[7:14]) == list(range(7))
    assert [a.index_of(i) for i in range(20)] == seq


def test_capacity_limits_leases_to_the_staleness_window():
    state = make_state(**{"async.max_staleness": 0})
    wid = register(state)
    lease = state.lease(LeaseRequest(worker_id=wid, policy_version=0, max_tasks=10), "tok-a", 0)
    assert len(lease.tasks) == 2  # on-policy: only one step's worth of prompts in flight
    again = state.lease(LeaseRequest(worker_id=wid, policy_version=0, max_tasks=10), "tok-a", 0)
    assert again.lease_id is None and "enough samples" in again.reason


def test_lease_expiry_requeues_and_task_is_done_once():
    state = make_state()
    a, b = register(state, "tok-a"), register(state, "tok-b")
    lease = state.lease(LeaseRequest(worker_id=a, policy_version=0, max_tasks=2), "tok-a", 0)
    tids = [t.task_id for t in lease.tasks]
    state.heartbeat(b, "tok-b", 0, 0.0, 500.0)
    state.expire(now=500.0)  # a's lease (ttl 120) expired, and a is silent
    assert a not in state.workers and list(state.queue) == sorted(tids)
    with pytest.raises(HubError) as info:
        submit(state, a, lease.lease_id, tids)
    assert info.value.status == 404
    lease_b = state.lease(LeaseRequest(worker_id=b, policy_version=0, max_tasks=2), "tok-b", 500.0)
    assert sorted(t.task_id for t in lease_b.tasks) == sorted(tids)
    assert submit(state, b, lease_b.lease_id, tids, caller="tok-b") == (tids, [])
    # The same submission again (e.g. the response was lost): accepted once, reported as duplicates.
    assert submit(state, b, lease_b.lease_id, tids, caller="tok-b") == ([], tids)
    assert state.submissions == 1 and set(state.scoring) == set(tids)


def test_heartbeat_names_the_leases_the_hub_no_longer_holds():
    """A worker generating an expired lease learns it at its next heartbeat (its results would be refused)."""
    state = make_state()
    a = register(state, "tok-a")
    old = state.lease(LeaseRequest(worker_id=a, policy_version=0, max_tasks=2), "tok-a", 0).lease_id
    state.heartbeat(a, "tok-a", 0, 1.0, 119.0)
    state.expire(now=121.0)  # the lease (ttl 120) expired; its worker is alive
    new = state.lease(LeaseRequest(worker_id=a, policy_version=0, max_tasks=2), "tok-a", 121.0).lease_id
    answer = state.heartbeat(a, "tok-a", 0, 1.0, 122.0, leases=(old, new, "made-up"))
    assert answer.gone == [old, "made-up"]  # the live lease is not named; an id it never granted is gone too
    assert state.heartbeat(a, "tok-a", 0, 1.0, 123.0).gone == []


def test_rejections_leave_state_unchanged():
    state = make_state()
    a, b = register(state, "tok-a"), register(state, "tok-b")
    lease = state.lease(LeaseRequest(worker_id=a, policy_version=0, max_tasks=1), "tok-a", 0)
    tid = lease.tasks[0].task_id
    before = (dict(state.leased), list(state.queue), dict(state.scoring))
    bad = {
        "not_your_worker": dict(caller="tok-b"),
        "token_out_of_vocab": dict(completion=Completion(token_ids=[3, 50], logprobs=[-1, -1])),
        "bad_length": dict(completion=Completion(token_ids=[3] * 5, logprobs=[-1] * 5)),
        "bad_logprob": dict(completion=Completion(token_ids=[3], logprobs=[0.5])),
        "logprobs_mismatch": dict(completion=Completion(token_ids=[3, 4], logprobs=[-1])),
        "future_version": dict(version=3),
    }
    for reason, kw in bad.items():
        comp = kw.get("completion", Completion(token_ids=[3], logprobs=[-1.0]))
        req = SubmitRequest(
            worker_id=a, lease_id=lease.lease_id, policy_version=kw.get("version", 0),
            results=[TaskResult(task_id=tid, completions=[comp] * N)],
        )  # fmt: skip
        with pytest.raises(HubError) as info:
            validate_submission(state, req, kw.get("caller", "tok-a"))
        assert info.value.reason == reason
    for x in (float("nan"), float("inf"), -float("inf")):  # the wire refuses them before the state sees them
        with pytest.raises(ValidationError, match="finite"):
            Completion(token_ids=[3], logprobs=[x])
    with pytest.raises(HubError) as info:
        submit(state, b, lease.lease_id, [tid], caller="tok-b")
    assert info.value.reason == "not_your_lease"
    assert (dict(state.leased), list(state.queue), dict(state.scoring)) == before


def test_stale_submission_is_rejected_and_requeued():
    state = make_state(**{"async.max_staleness": 1})
    wid = register(state)
    lease = state.lease(LeaseRequest(worker_id=wid, policy_version=0, max_tasks=2), "tok-a", 0)
    state.policy_version = 2
    with pytest.raises(HubError) as info:
        submit(state, wid, lease.lease_id, [t.task_id for t in lease.tasks], version=0)
    assert info.value.reason == "stale_version" and state.rejections["stale_version"] == 1
    assert sorted(state.queue) == sorted(t.task_id for t in lease.tasks)


def submitted(state: HubState, k: int) -> list[int]:
    """The task ids of one worker's lease of `k` tasks, submitted (not yet scored)."""
    wid = register(state)
    lease = state.lease(LeaseRequest(worker_id=wid, policy_version=0, max_tasks=k), "tok-a", 0)
    tids = [t.task_id for t in lease.tasks]
    submit(state, wid, lease.lease_id, tids)
    return tids


def test_take_batch_drops_stale_groups_and_skips_zero_variance():
    state = make_state(**{"async.max_staleness": 1, "trainer.prompts_per_step": 3})
    tids = submitted(state, 6)
    score(state, tids[0], version=0)
    score(state, tids[1], version=0, rewards=(1.0, 1.0))
    score(state, tids[2], version=0)
    score(state, tids[3], version=0)
    groups, stale, skipped = state.take_batch(2, step=1, skip_zero_variance=True)
    assert [g.task_id for g in groups] == [tids[0], tids[2]] and skipped == 1 and stale == 0
    groups, stale, skipped = state.take_batch(1, step=2, skip_zero_variance=False)
    assert groups == [] and stale == 1 and list(state.queue) == [tids[3]]
    assert state.staleness_hist == {1: 2} and state.consumed == 3


def test_groups_carry_generation_and_scoring_seconds():
    """The trainer's `perf/generate_s` and `perf/score_s` come from these (rl/batch.py rollout_metrics)."""
    state = make_state()
    wid = register(state)
    lease = state.lease(LeaseRequest(worker_id=wid, policy_version=0, max_tasks=2), "tok-a", 0)
    req = SubmitRequest(worker_id=wid, lease_id=lease.lease_id, policy_version=0, gen_seconds=2.5,
                        results=[good_result(t.task_id) for t in lease.tasks])  # fmt: skip
    _, jobs = state.submit(req, "tok-a", 1.0)
    for job, seconds in zip(jobs, (0.25, 0.75), strict=True):
        state.finish_scoring(job, [Reward(value=r, components={"t": r}) for r in (0.0, 1.0)], score_s=seconds)
    groups, _, _ = state.take_batch(2, step=0, skip_zero_variance=False)
    assert [(g.gen_s, g.score_s) for g in groups] == [(2.5, 0.25), (2.5, 0.75)]
    metrics = rollout_metrics(groups, 0, max_tokens=2, accuracy_term=None)
    assert metrics["perf/generate_s"] == 2.5 and metrics["perf/score_s"] == 0.5


def test_ordered_mode_waits_for_task_order_and_ledger_round_trips():
    state = make_state(**{"async.ordered": True})
    wid = register(state)
    lease = state.lease(LeaseRequest(worker_id=wid, policy_version=0, max_tasks=4), "tok-a", 0)
    tids = [t.task_id for t in lease.tasks]
    submit(state, wid, lease.lease_id, tids)
    score(state, tids[1])
    score(state, tids[2])
    assert state.take_batch(2, step=0, skip_zero_variance=False)[0] == []  # tids[0] not ready
    score(state, tids[0])
    groups = state.take_batch(2, step=0, skip_zero_variance=False)[0]
    assert [g.task_id for g in groups] == tids[:2]
    ledger = state.ledger()
    assert ledger.pending == sorted(tids[2:]) and ledger.consumed == 2 and ledger.batches == 1
    restored = HubState(state.cfg, state.prompts, 50, ledger)
    assert list(restored.queue) == sorted(tids[2:]) and restored.order.position == state.order.position
    with pytest.raises(ValueError, match="seed"):
        HubState(load_config(None, ["data.seed=5"]), state.prompts, 50, ledger)


def test_worker_leave_returns_leases():
    state = make_state()
    wid = register(state)
    lease = state.lease(LeaseRequest(worker_id=wid, policy_version=0, max_tasks=2), "tok-a", 0)
    assert state.leave(wid, "tok-a") == 2
    assert sorted(state.queue) == sorted(t.task_id for t in lease.tasks) and not state.leases


def test_old_worker_must_update_first():
    state = make_state(**{"async.max_staleness": 0})
    wid = register(state)
    state.policy_version = 1
    state.batches = 1
    lease = state.lease(LeaseRequest(worker_id=wid, policy_version=0, max_tasks=2), "tok-a", 0)
    assert lease.lease_id is None and lease.min_policy_version == 1


def eval_state() -> HubState:
    state = make_state()
    eval_prompts = PromptSet(rows=[{"question": "e", "answer": "1"}] * 3, prompt_ids=[[9, 9]] * 3, skipped_too_long=0)
    return HubState(state.cfg, state.prompts, 50, eval_prompts=eval_prompts)


def test_eval_jobs_lease_score_and_report():
    state = eval_state()
    state.publish(0)
    wid = register(state)
    job = state.start_eval(EvalRequest(version=0, num_prompts=3, n=1, temperature=0.0))
    assert job.total == 3 and job.done == 0
    lease = state.lease(LeaseRequest(worker_id=wid, policy_version=0, max_tasks=2), "tok-a", 0)
    assert lease.sampling.n == 1 and lease.sampling.temperature == 0.0 and len(lease.tasks) == 2
    tids = [t.task_id for t in lease.tasks]
    assert all(t in state.evals for t in tids) and not any(t in state.task_rows for t in tids)
    one = [Completion(token_ids=[3], logprobs=[-1.0])]
    wrong_n = SubmitRequest(worker_id=wid, lease_id=lease.lease_id, policy_version=0,
                            results=[TaskResult(task_id=tids[0], completions=one * 2)])  # fmt: skip
    with pytest.raises(HubError, match="want 1"):
        state.submit(wrong_n, "tok-a", 1.0)
    req = SubmitRequest(worker_id=wid, lease_id=lease.lease_id, policy_version=0,
                        results=[TaskResult(task_id=t, completions=one) for t in tids])  # fmt: skip
    answer, jobs = state.submit(req, "tok-a", 1.0)
    assert answer.accepted == tids and [j.example["question"] for j in jobs] == ["e", "e"]
    for j in jobs:
        state.finish_scoring(j, [Reward(value=1.0, components={"reasoning_gym": 1.0})])
    assert state.eval_status(job.job_id).done == 2
    rest = state.lease(LeaseRequest(worker_id=wid, policy_version=0, max_tasks=2), "tok-a", 0)
    assert len(rest.tasks) == 1 and rest.tasks[0].task_id in state.evals
    assert state.outstanding == 0  # eval tasks never touch the training ledger
    answer, jobs = state.submit(
        SubmitRequest(worker_id=wid, lease_id=rest.lease_id, policy_version=0,
                      results=[TaskResult(task_id=rest.tasks[0].task_id, completions=one)]), "tok-a", 2.0)  # fmt: skip
    state.finish_scoring(jobs[0], [Reward(value=0.0, components={"reasoning_gym": 0.0})])
    final = state.eval_status(job.job_id)
    assert final.done == final.total == 3 and [r.completions[0].reward for r in final.results] == [1.0, 1.0, 0.0]
    with pytest.raises(HubError, match="no eval job"):
        state.eval_status(job.job_id)  # reported once, then forgotten


def test_scoring_failures_retry_with_backoff_then_drop():
    """A verifier that keeps raising: K attempts with growing pauses, then the task is dropped and counted."""
    state = make_state()
    woken: list[int] = []
    state.on_work = lambda: woken.append(1)
    wid = register(state)
    lease = state.lease(LeaseRequest(worker_id=wid, policy_version=0, max_tasks=2), "tok-a", 0)
    tids = [t.task_id for t in lease.tasks]
    submit(state, wid, lease.lease_id, tids)
    job = pending_jobs(state)[tids[0]]
    waits = []
    while (wait := state.fail_scoring(job, "RuntimeError: verifier processes cannot start")) is not None:
        waits.append(wait)
        job = job.retry()
    assert waits == [1.0, 2.0] and job.attempt == state.max_scoring_attempts == 3
    st = state.status(0.0, {})
    assert st.scoring_failures == 3 and st.scoring_dropped == 1 and st.scoring == 1
    assert st.last_scoring_error == f"task {tids[0]} (attempt 3/3): RuntimeError: verifier processes cannot start"
    assert tids[0] not in state.task_rows and tids[0] not in state.ledger().pending and woken
    # The other task scores normally, and a late answer for the dropped one is ignored.
    score(state, tids[1])
    state.finish_scoring(job, [Reward(value=1.0, components={})] * N)
    assert list(state.buffer) == [tids[1]]


def test_eval_task_that_fails_scoring_finishes_its_job_without_a_result():
    state = eval_state()
    state.publish(0)
    state.max_scoring_attempts = 1
    wid = register(state)
    job = state.start_eval(EvalRequest(version=0, num_prompts=1, n=1))
    lease = state.lease(LeaseRequest(worker_id=wid, policy_version=0, max_tasks=2), "tok-a", 0)
    one = [Completion(token_ids=[3], logprobs=[-1.0])]
    req = SubmitRequest(worker_id=wid, lease_id=lease.lease_id, policy_version=0,
                        results=[TaskResult(task_id=lease.tasks[0].task_id, completions=one)])  # fmt: skip
    _, jobs = state.submit(req, "tok-a", 1.0)
    assert state.fail_scoring(jobs[0], "OSError: boom") is None
    report = state.eval_status(job.job_id)
    assert report.done == report.total == 1 and report.failed == 1 and report.results == []
    assert eval_metrics([("", report)], "reasoning_gym") == {"eval/scoring_failed": 1.0}  # the trainer goes on


def test_publish_and_current_policy():
    state = make_state()
    state.policy_version = -1
    with pytest.raises(HubError) as info:
        state.current_policy()
    assert info.value.status == 409 and info.value.reason == "no_policy"
    wid = register(state)
    state.publish(2)
    state.heartbeat(wid, "tok-a", 2, 1.0, 0.0)
    assert state.publish(3) == {2, 3} and state.current_policy() == 3  # a worker's version within staleness
    assert state.heartbeat(wid, "tok-a", 3, 1.0, 1.0).policy_version == 3


def test_workers_generate_in_rollout_dtype():
    """`rollout.dtype` lets the trainer keep fp32 while workers generate in bf16; unset, workers use model.dtype."""
    assert make_state().register(RegisterRequest(name="w"), "tok-a", 0.0).dtype == "float32"
    state = make_state(**{"model.dtype": "float32", "rollout.dtype": "bfloat16"})
    assert state.register(RegisterRequest(name="w"), "tok-a", 0.0).dtype == "bfloat16"


def test_status_pages_workers_and_summarises_all():
    """With thousands of workers a status lists one page of them; the summary still counts every one."""
    state = make_state(**{"hub.max_workers_per_token": 1000})
    ids = [register(state) for _ in range(250)]
    for i, wid in enumerate(ids):
        state.heartbeat(wid, "tok-a", -1 if i % 5 else 0, 10.0, 1.0, fetch_s=2.0 if i < 10 else 0.0)
    first = state.status(2.0, {})
    assert [w.worker_id for w in first.workers] == ids[:100]
    page = state.status(2.0, {}, offset=200, limit=100)
    assert [w.worker_id for w in page.workers] == ids[200:]
    summary = page.worker_summary
    assert summary.total == 250 and summary.by_version == {"-1": 200, "0": 50}
    assert summary.tokens_per_s == 2500.0 and summary.fetch_s == 2.0
    assert state.status(2.0, {}, limit=0).workers == []


def test_a_stale_group_is_dropped_whenever_it_arrives():
    """Pulls look for stale groups only when one may be buffered (ScoredBuffer.floor): one that arrives after
    a pull found none is still dropped by the next."""
    state = make_state(**{"async.max_staleness": 1, "trainer.prompts_per_step": 3})
    tids = submitted(state, 3)
    score(state, tids[0], version=0)
    assert state.take_batch(2, step=1, skip_zero_variance=False) == ([], 0, 0)  # version 0 is fresh at step 1
    score(state, tids[1], version=0)
    assert state.take_batch(3, step=2, skip_zero_variance=False) == ([], 2, 0)  # both too old at step 2
    assert state.buffer.floor == float("inf") and sorted(state.queue) == sorted(tids[:2])
