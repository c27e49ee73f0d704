"""Hub bookkeeping rules without HTTP: leases, expiry, staleness window, idempotency, ledger."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from rl.config import load_config
from rl.data import PromptOrder, PromptSet
from rl.hub.state import HubError, HubState
from rl.protocol import (
    Completion,
    LeaseRequest,
    RegisterRequest,
    ScoredCompletion,
    ScoredGroup,
    SubmitRequest,
    TaskResult,
)

N = 2


def make_state(**overrides) -> HubState:
    args = [f"{k}={v}" for k, v in overrides.items()]
    cfg = load_config(None, ["sampling.n=2", "sampling.max_tokens=4", "trainer.prompts_per_step=2",
                             "trainer.micro_batch_size=2", *args])  # fmt: skip
    rows = [{"question": f"q{i}", "answer": str(i)} for i in range(10)]
    prompts = PromptSet(rows=rows, prompt_ids=[[1, 2, i] for i in range(10)], skipped_too_long=0)
    state = HubState(cfg, prompts, vocab_size=50)
    state.policy_version = 0
    return state


def register(state: HubState, caller: str = "tok-a", now: float = 0.0) -> str:
    return state.register(RegisterRequest(name="w"), caller, now).worker_id


def good_result(tid: int) -> TaskResult:
    return TaskResult(task_id=tid, completions=[Completion(token_ids=[3, 4], logprobs=[-0.5, -1.0])] * N)


def submit(state: HubState, wid: str, lease_id: str, tids, version=0, caller="tok-a"):
    req = SubmitRequest(
        worker_id=wid, lease_id=lease_id, policy_version=version, results=[good_result(t) for t in tids]
    )
    new, dups = state.validate_submission(req, caller)
    if new and (stale := state.stale_submission(req)) is not None:
        raise stale
    if new:
        state.accept(req, new, 1.0)
    return new, dups


def score(state: HubState, tid: int, version: int = 0, rewards=(0.0, 1.0)) -> None:
    state.scored(
        ScoredGroup(
            task_id=tid, row_index=state.task_rows[tid], prompt_token_ids=[1], policy_version=version,
            worker_id="w", worker_name="w",
            completions=[ScoredCompletion(token_ids=[3], logprobs=[-1.0], finish_reason="stop", reward=r,
                                          components={}) for r in rewards],
        )
    )  # fmt: skip


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
            state.validate_submission(req, kw.get("caller", "tok-a"))
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


def test_take_batch_drops_stale_groups_and_skips_zero_variance():
    state = make_state(**{"async.max_staleness": 1, "trainer.prompts_per_step": 3})
    wid = register(state)
    lease = state.lease(LeaseRequest(worker_id=wid, policy_version=0, max_tasks=6), "tok-a", 0)
    tids = [t.task_id for t in lease.tasks]
    submit(state, wid, lease.lease_id, tids)
    score(state, tids[0], version=0)
    score(state, tids[1], version=0, rewards=(1.0, 1.0))
    score(state, tids[2], version=0)
    score(state, tids[3], version=0)
    groups, stale, skipped = state.take_batch(2, step=1, skip_zero_variance=True)
    assert [g.task_id for g in groups] == [tids[0], tids[2]] and skipped == 1 and stale == 0
    groups, stale, skipped = state.take_batch(1, step=2, skip_zero_variance=False)
    assert groups == [] and stale == 1 and list(state.queue) == [tids[3]]
    assert state.staleness_hist == {1: 2} and state.consumed == 3


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


def test_eval_jobs_lease_score_and_report():
    from rl.protocol import EvalRequest

    state = make_state()
    state.eval_prompts = PromptSet(rows=[{"question": "e", "answer": "1"}] * 3, prompt_ids=[[9, 9]] * 3,
                                   skipped_too_long=0)  # fmt: skip
    wid = register(state)
    job = state.start_eval(EvalRequest(version=0, num_prompts=3, n=1, temperature=0.0))
    assert job.total == 3 and job.done == 0
    lease = state.lease(LeaseRequest(worker_id=wid, policy_version=0, max_tasks=2), "tok-a", 0)
    assert lease.sampling.n == 1 and lease.sampling.temperature == 0.0 and len(lease.tasks) == 2
    tids = [t.task_id for t in lease.tasks]
    assert all(t < 0 for t in tids)
    one = [Completion(token_ids=[3], logprobs=[-1.0])]
    req = SubmitRequest(worker_id=wid, lease_id=lease.lease_id, policy_version=0,
                        results=[TaskResult(task_id=t, completions=one) for t in tids])  # fmt: skip
    new, dups = state.validate_submission(req, "tok-a")
    assert new == tids and state.stale_submission(req) is None
    state.accept(req, new, 1.0)

    class R:
        value, components = 1.0, {"reasoning_gym": 1.0}

    for t in tids:
        state.eval_scored(t, one, [R()])
    assert state.eval_status(job.job_id).done == 2
    rest = state.lease(LeaseRequest(worker_id=wid, policy_version=0, max_tasks=2), "tok-a", 0)
    assert [t.task_id for t in rest.tasks] == [-3]
    assert state.outstanding == 0  # eval tasks never touch the training ledger


def test_workers_generate_in_rollout_dtype():
    """`rollout.dtype` lets the trainer keep fp32 while workers generate in bf16; unset, workers use model.dtype."""
    assert make_state().register(RegisterRequest(name="w"), "tok-a", 0.0).dtype == "float32"
    state = make_state(**{"model.dtype": "float32", "rollout.dtype": "bfloat16"})
    assert state.register(RegisterRequest(name="w"), "tok-a", 0.0).dtype == "bfloat16"
