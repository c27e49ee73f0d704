"""Operators, not registrations: records that outlive re-registration, fair shares, backup leases, versions.

An operator is the worker token its registrations came with. Pure bookkeeping over a real `HubState`
and `Trust`; the live attacks (real modified workers against `rl train`) are tests/e2e.
"""

from __future__ import annotations

import pytest
from helpers.hub_state import good_result, make_state, pending_jobs
from pydantic import ValidationError

from rl.hub.trust import Trust
from rl.wire.protocol import HeartbeatRequest, HubError, LeaseRequest, RegisterRequest, SubmitRequest


def register(state, token: str) -> str:
    return state.register(RegisterRequest(name="w"), token, 0.0).worker_id


def lease(state, wid: str, max_tasks: int = 8, now: float = 0.0, version: int = 0):
    token = state.workers[wid].token
    return state.lease(LeaseRequest(worker_id=wid, policy_version=version, max_tasks=max_tasks), token, now)


def submit(state, wid: str, lease_id: str, tids, now: float = 1.0, version: int = 0):
    req = SubmitRequest(worker_id=wid, lease_id=lease_id, policy_version=version,
                        results=[good_result(t) for t in tids])  # fmt: skip
    answer, jobs = state.submit(req, state.workers[wid].token, now)
    pending_jobs(state).update({j.task_id: j for j in jobs})
    return answer.accepted, answer.duplicates


def test_a_quarantined_operator_stays_quarantined_across_registrations():
    state = make_state()
    trust = Trust(state.cfg.trust, state)
    bad, honest = register(state, "tok-bad"), register(state, "tok-good")
    second = register(state, "tok-bad")  # the same operator, another registration
    trust.quarantine(bad, "test")
    with pytest.raises(HubError, match="quarantined"):
        trust.check(second)  # every registration of the operator
    state.leave(bad, "tok-bad")
    state.leave(second, "tok-bad")
    with pytest.raises(HubError) as info:
        register(state, "tok-bad")  # a clean registration keeps the operator's record
    assert info.value.status == 403 and info.value.reason == "quarantined"
    trust.check(honest)
    assert lease(state, honest).lease_id is not None
    status = trust.annotate(state.status(0.0, {}), None)
    # the quarantined one has nobody alive, and is still listed with its reason
    assert [(o.operator, o.workers, bool(o.quarantined)) for o in status.operators] == [
        ("tok-good", 1, False), ("tok-bad", 0, True)]  # fmt: skip
    mine = trust.annotate(state.status(0.0, {}), "tok-good")  # a worker token sees only its own operator
    assert [o.operator for o in mine.operators] == ["tok-good"]


def test_rotating_registrations_accumulate_evidence_on_the_operator():
    state = make_state(**{"trust.quarantine_min_sequences": 16, "trust.quarantine_rejected_fraction": 0.25})
    trust = Trust(state.cfg.trust, state)
    from rl.wire.protocol import ProvenanceReport, WorkerVerdicts

    quarantined = []
    for _ in range(4):  # each registration stays under the minimum on its own: 8 sequences, 4 rejected
        wid = register(state, "tok-rot")
        quarantined += trust.record(ProvenanceReport(step=0, workers=[WorkerVerdicts(
            worker_id=wid, sequences=8, rejected={"atypical_unlikely": 4}, tokens=8)]))  # fmt: skip
        if quarantined:
            break
        state.leave(wid, "tok-rot")
    assert quarantined == ["tok-rot"], "16 sequences over two registrations, 50% rejected"


def test_one_operator_holds_at_most_its_fair_share_of_the_window():
    state = make_state(**{"trust.enabled": True, "trainer.prompts_per_step": 4, "async.max_staleness": 1})
    hoarders = [register(state, "tok-hoard") for _ in range(6)]
    honest = register(state, "tok-good")
    held = sum(len(lease(state, w).tasks) for w in hoarders)
    assert held == 4, f"window 8 over 2 operators: the hoarder holds {held}"
    got = lease(state, honest)
    assert len(got.tasks) == 4, "the honest operator still gets its half"


def test_a_late_task_gets_a_backup_lease_and_the_first_result_wins():
    state = make_state(**{"trainer.prompts_per_step": 6, "async.max_staleness": 0, "hub.backup_factor": 3.0,
                          "hub.backup_min_s": 5.0, "hub.fair_share": False})  # fmt: skip
    fast, slow = register(state, "tok-fast"), register(state, "tok-slow")
    for i in range(4):  # the run's typical turnaround: 1 s
        got = lease(state, fast, 1, now=10.0 * i)
        submit(state, fast, got.lease_id, [t.task_id for t in got.tasks], now=10.0 * i + 1.0)
    held = lease(state, slow, 2, now=50.0)
    held_ids = sorted(t.task_id for t in held.tasks)
    assert not lease(state, fast, 2, now=52.0).tasks  # 2 s: not late yet (window full, nothing queued)
    backup = lease(state, fast, 2, now=60.0)  # 10 s > max(5 s, 3 x 1 s): late
    assert sorted(t.task_id for t in backup.tasks) == held_ids
    assert submit(state, fast, backup.lease_id, held_ids, now=61.0) == (held_ids, [])
    assert submit(state, slow, held.lease_id, held_ids, now=62.0) == ([], held_ids), "the loser's are duplicates"
    assert all(t not in state.leased for t in held_ids) and not state.queue
    assert sorted(pending_jobs(state))[-2:] == held_ids  # scored once


def test_a_dropped_lease_does_not_requeue_a_task_its_backup_still_holds():
    state = make_state(**{"trainer.prompts_per_step": 5, "async.max_staleness": 0, "hub.backup_min_s": 0.0,
                          "hub.fair_share": False})  # fmt: skip
    fast, slow = register(state, "tok-fast"), register(state, "tok-slow")
    for i in range(4):
        got = lease(state, fast, 1, now=float(i))
        submit(state, fast, got.lease_id, [t.task_id for t in got.tasks], now=i + 0.1)
    held = lease(state, slow, 1, now=10.0)
    backup = lease(state, fast, 1, now=20.0)
    assert [t.task_id for t in backup.tasks] == [t.task_id for t in held.tasks]
    state.leave(slow, "tok-slow")
    assert not state.queue, "still held by the backup lease: not re-queued"
    state.leave(fast, "tok-fast")
    assert list(state.queue) == [held.tasks[0].task_id], "no holder left: re-queued once"


def test_results_cannot_claim_a_version_older_than_their_lease():
    state = make_state()
    state.policy_version = 1
    wid = register(state, "tok-a")
    got = lease(state, wid, 1, version=1)
    with pytest.raises(HubError) as info:
        submit(state, wid, got.lease_id, [got.tasks[0].task_id], version=0)
    assert info.value.status == 422 and info.value.reason == "version_before_lease"


@pytest.mark.parametrize("name", ["evil\x1b[31m", "two\nlines", "", "x" * 65, "spa ce", "ünï"])
def test_worker_names_are_a_safe_alphabet(name):
    with pytest.raises(ValidationError):
        RegisterRequest(name=name)
    RegisterRequest(name="gpu-node_3.local:0@site+1")


def test_heartbeat_numbers_are_bounded():
    for field in ("tokens_per_s", "fetch_s", "load_s"):
        with pytest.raises(ValidationError):
            HeartbeatRequest(policy_version=0, **{field: 1e300})


def test_eval_tasks_go_only_to_the_trusted_operator():
    """Eval results are scored but never provenance-checked: `rl train`'s own workers answer them alone."""
    from rl.hub.data import PromptSet
    from rl.hub.state import HubState
    from rl.wire.protocol import EvalRequest

    base = make_state()
    evals = PromptSet(rows=[{"question": "e", "answer": "1"}] * 3, prompt_ids=[[9, 9]] * 3, skipped_too_long=0)
    state = HubState(base.cfg, base.prompts, 50, eval_prompts=evals)
    state.publish(0)
    state.eval_operator = "tok-local"
    outsider, local = register(state, "tok-outside"), register(state, "tok-local")
    state.start_eval(EvalRequest(version=0, num_prompts=3, n=1, temperature=0.0))
    got = lease(state, outsider, 3)
    assert got.tasks and not any(t.task_id in state.evals for t in got.tasks), "training tasks only"
    got = lease(state, local, 3)
    assert [t.task_id in state.evals for t in got.tasks] == [True] * 3
    assert all(len(t.seeds) == 1 for t in got.tasks)


def test_seeds_are_fixed_per_task_and_survive_a_requeue():
    state = make_state()
    a, b = register(state, "tok-a"), register(state, "tok-b")
    first = lease(state, a, 1)
    task = first.tasks[0]
    assert len(task.seeds) == state.cfg.sampling.n and len(set(task.seeds)) == len(task.seeds)
    state.leave(a, "tok-a")  # re-queued
    again = lease(state, b, 1).tasks[0]
    assert again.task_id == task.task_id and again.seeds == task.seeds


def test_an_operator_that_took_the_window_alone_shares_it_once_others_join():
    """A hoarder registered first holds the whole window; when another operator joins, what it holds beyond
    its new share is leased again as backups right away (no expiry, no turnaround samples needed)."""
    state = make_state(**{"trainer.prompts_per_step": 2, "async.max_staleness": 1, "hub.lease_ttl_s": 300.0})
    hoarder = register(state, "tok-hoard")
    held = lease(state, hoarder, 8)
    assert len(held.tasks) == 4, "alone, the whole window"
    honest = register(state, "tok-good")
    got = lease(state, honest, 8, now=1.0)
    assert sorted(t.task_id for t in got.tasks) == sorted(t.task_id for t in held.tasks)[:2], got
    assert submit(state, honest, got.lease_id, [t.task_id for t in got.tasks], now=2.0)[0]


def test_quarantine_reaches_the_groups_of_registrations_that_already_left():
    """Rotating registrations: the buffered and scoring groups of a registration that left are re-queued when its
    operator is quarantined; a score arriving afterwards is not buffered."""
    from verifiers import Reward

    state = make_state()
    trust = Trust(state.cfg.trust, state)
    first = register(state, "tok-rot")
    got = lease(state, first, 2)
    tids = [t.task_id for t in got.tasks]
    submit(state, first, got.lease_id, tids)
    jobs = pending_jobs(state)
    group = state.finish_scoring(jobs.pop(tids[0]), [Reward(value=1.0)] * 2)
    assert not trust.observe_group(group) and list(state.buffer) == [tids[0]]
    state.leave(first, "tok-rot")  # rotate away; one group buffered, one still being scored
    second = register(state, "tok-rot")
    trust.quarantine(second, "test")
    assert not state.buffer and sorted(state.queue) == sorted(tids), "buffered and scoring work went back"
    assert state.finish_scoring(jobs.pop(tids[1]), [Reward(value=1.0)] * 2) is None  # given up: not buffered
    assert not state.buffer and sorted(state.queue) == sorted(tids)
