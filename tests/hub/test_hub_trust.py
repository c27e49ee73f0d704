"""Per-worker trust on the hub (rl/hub/trust.py): provenance reports, reward outliers, quarantine.

Pure bookkeeping over a real `HubState`: a quarantined worker gets no leases, and every task it
held (leased, being scored, buffered) goes back to the queue; nothing is lost.
"""

from __future__ import annotations

import pytest

from rl.config import load_config
from rl.hub.data import PromptSet
from rl.hub.state import HubState
from rl.hub.submissions import validate_submission
from rl.hub.trust import Trust
from rl.wire.protocol import (
    Completion,
    HubError,
    LeaseRequest,
    ProvenanceReport,
    RegisterRequest,
    ScoredCompletion,
    ScoredGroup,
    SubmitRequest,
    TaskResult,
    WorkerVerdicts,
)

N = 2


def make(**overrides) -> tuple[HubState, Trust]:
    args = [f"{k}={v}" for k, v in overrides.items()]
    cfg = load_config(None, ["sampling.n=2", "sampling.max_tokens=4", "trainer.prompts_per_step=4",
                             "trainer.micro_batch_size=2", "hub.buffer_size=64", *args])  # fmt: skip
    prompts = PromptSet(rows=[{"question": f"q{i}"} for i in range(50)],
                        prompt_ids=[[1, 2, i] for i in range(50)], skipped_too_long=0)  # fmt: skip
    state = HubState(cfg, prompts, vocab_size=50)
    state.policy_version = 0
    return state, Trust(cfg.trust, state)


def lease(state: HubState, wid: str, max_tasks: int = 2):
    return state.lease(LeaseRequest(worker_id=wid, policy_version=0, max_tasks=max_tasks), token(state, wid), 0.0)


def token(state: HubState, wid: str) -> str:
    return state.workers[wid].token


def submit_and_score(state: HubState, trust: Trust, wid: str, reward: float) -> list[int]:
    got = lease(state, wid)
    tids = [t.task_id for t in got.tasks]
    comp = Completion(token_ids=[3, 4], logprobs=[-0.5, -1.0])
    req = SubmitRequest(worker_id=wid, lease_id=got.lease_id, policy_version=0,
                        results=[TaskResult(task_id=t, completions=[comp] * N) for t in tids])  # fmt: skip
    new, _, _ = validate_submission(state, req, token(state, wid))
    state.accept(req, new, 0.0)
    for t in tids:
        group = ScoredGroup(
            task_id=t, row_index=state.task_rows[t], prompt_token_ids=[1], policy_version=0, worker_id=wid,
            worker_name="w", completions=[ScoredCompletion(token_ids=[3], logprobs=[-1.0], finish_reason="stop",
                                                           reward=reward, components={})] * N,
        )  # fmt: skip
        state.scored(group)
        trust.observe_group(group)
    return tids


def consume(state: HubState) -> None:
    """What the trainer's batch pull does to buffered groups (without the batch bookkeeping)."""
    for tid in list(state.buffer):
        del state.buffer[tid], state.task_rows[tid]


def test_quarantine_requeues_everything_and_refuses_leases():
    state, trust = make()
    bad = state.register(RegisterRequest(), "tok-bad", 0.0).worker_id
    good = state.register(RegisterRequest(), "tok-good", 0.0).worker_id
    buffered = submit_and_score(state, trust, bad, 0.5)
    held = [t.task_id for t in lease(state, bad).tasks]
    assert len(state.buffer) == 2 and len(state.leased) == 2
    requeued = trust.quarantine(bad, "test")
    assert requeued == 4 and not state.buffer and not state.leased
    assert sorted(state.queue) == sorted(buffered + held)  # no prompt lost
    with pytest.raises(HubError) as info:
        trust.check(bad)
    assert info.value.status == 403 and info.value.reason == "quarantined"
    trust.check(good)
    assert sorted(t.task_id for t in lease(state, good, 4).tasks) == sorted(buffered + held)
    status = trust.annotate(state.status(0.0, {}), None)
    assert {w.worker_id: w.quarantined for w in status.workers}[bad] == "test" and status.quarantined == 1
    trust.release(bad)
    trust.check(bad)
    with pytest.raises(HubError, match="not quarantined"):
        trust.release(bad)


def test_provenance_reports_quarantine_over_the_threshold():
    state, trust = make(**{"trust.quarantine_min_sequences": 16, "trust.quarantine_rejected_fraction": 0.25})
    wid = state.register(RegisterRequest(), "tok-bad", 0.0).worker_id
    honest = state.register(RegisterRequest(), "tok-good", 0.0).worker_id

    def report(worker, sequences, rejected):
        return ProvenanceReport(step=0, workers=[WorkerVerdicts(worker_id=worker, sequences=sequences,
                                                                rejected=rejected, abs_logprob_diff_sum=1.0,
                                                                tokens=10)])  # fmt: skip

    assert trust.record(report(wid, 8, {"atypical_unlikely": 8})) == []  # under the minimum: evidence only
    assert trust.record(report(honest, 40, {"logprob_mismatch": 1})) == []  # 1/40: honest noise
    assert trust.record(report(wid, 8, {})) == ["tok-bad"]  # 8/16 > 25%: the operator
    assert "atypical_unlikely 8" in trust.reason(wid)
    view = {w.worker_id: w for w in trust.annotate(state.status(0.0, {}), None).workers}
    assert view[wid].trust.rejected == {"atypical_unlikely": 8} and view[honest].quarantined == ""


def test_cherry_picked_rewards_are_an_outlier():
    state, trust = make(**{"trust.reward_min_groups": 8, "trust.reward_z": 4.0})
    honest = [state.register(RegisterRequest(), f"tok-{i}", 0.0).worker_id for i in range(2)]
    picker = state.register(RegisterRequest(), "tok-picker", 0.0).worker_id
    for i in range(4):  # honest rewards vary around 0.3
        for w in honest:
            submit_and_score(state, trust, w, 0.1 + 0.2 * ((i + len(w)) % 3))
        consume(state)
    for _ in range(3):
        submit_and_score(state, trust, picker, 1.0)  # best-of-k: always the top reward (2 groups a lease)
        consume(state)
    assert not trust.reason(picker) and trust.reward_z(picker) == 0.0  # too few groups yet
    submit_and_score(state, trust, picker, 1.0)
    assert trust.reason(picker).startswith("reward outlier")
    assert all(not trust.reason(w) for w in honest)


def test_a_late_honest_worker_is_not_an_outlier_while_rewards_rise():
    """Training raises every reward; a worker joining late scores above the run's all-time mean but not
    above what the others score at the same time."""
    import random

    state, trust = make(**{"trust.reward_min_groups": 16, "trust.reward_z": 5.0})
    rng = random.Random(0)

    def group(worker: str, step: int) -> ScoredGroup:
        p = min(0.9, 0.1 + step / 400)  # accuracy rising over training
        comps = [ScoredCompletion(token_ids=[3], logprobs=[-1.0], finish_reason="stop",
                                  reward=float(rng.random() < p), components={}) for _ in range(8)]  # fmt: skip
        return ScoredGroup(task_id=step, row_index=0, prompt_token_ids=[1], policy_version=step // 4, worker_id=worker,
                           worker_name=worker, completions=comps)  # fmt: skip

    for step in range(600):
        for worker in ("early-1", "early-2", *(("late",) if step >= 300 else ())):
            assert not trust.observe_group(group(worker, step)), trust.reason(worker)
    assert abs(trust.reward_z("late")) < 3.0


def test_rl_status_shows_masked_sequences_and_quarantine():
    from rich.console import Console

    from rl.cli.status_view import render

    state, trust = make()
    bad = state.register(RegisterRequest(name="bad"), "tok", 0.0).worker_id
    verdicts = WorkerVerdicts(worker_id=bad, sequences=4, rejected={"logprob_mismatch": 3}, tokens=8)
    trust.record(ProvenanceReport(step=0, workers=[verdicts]))
    trust.quarantine(bad, "forged logprobs")
    console = Console(width=240, record=True)
    console.print(render(trust.annotate(state.status(0.0, {}), None)))
    text = console.export_text()
    assert "3/4 (logprob_mismatch:3)" in text and "QUARANTINED: forged logprobs" in text
