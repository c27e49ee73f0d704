"""Checks of a worker's submission before the hub's state changes: ownership, lease, version, shapes, bounds.

Every number a worker sends is self-reported; these checks refuse (4xx, counted by reason) anything
outside the lease it answers, the version window or the run's limits, and change nothing.
"""

from __future__ import annotations

import math
from typing import Any

from rl.wire.protocol import Completion, HubError, SubmitRequest

HubLike = Any
"""The hub's state (rl/hub/state.py `HubState`): its workers, leases, evals, config and `reject`."""


def validate_submission(state: HubLike, req: SubmitRequest, caller: str | None) -> tuple[list[int], list[int]]:
    """Check everything before changing anything; returns (new task ids, duplicate task ids)."""
    rec = state.worker(req.worker_id, caller)
    lease = state.leases.get(req.lease_id)
    if lease is None:
        done = state.finished_leases.get(req.lease_id)
        if done is not None and done[0] == rec.worker_id and {r.task_id for r in req.results} <= done[1]:
            return [], [r.task_id for r in req.results]  # a re-sent submission: accepted once already
        raise state.reject(409, "unknown_lease", f"lease {req.lease_id} is unknown or expired")
    if lease.worker_id != rec.worker_id:
        raise state.reject(403, "not_your_lease", f"lease {req.lease_id} belongs to another worker")
    if req.policy_version > state.policy_version:
        raise state.reject(422, "future_version", f"version {req.policy_version} was never published")
    if req.policy_version < lease.version:
        raise state.reject(422, "version_before_lease", f"version {req.policy_version} is older than version "
                          f"{lease.version}, held when lease {req.lease_id} was taken")  # fmt: skip
    n, max_tokens = state.cfg.sampling.n, state.cfg.sampling.max_tokens
    new, dups, seen = [], [], set()
    for result in req.results:
        tid = result.task_id
        if tid in seen:
            raise state.reject(422, "repeated_task", f"task {tid} appears twice in one submission")
        seen.add(tid)
        if tid not in lease.task_ids:
            if tid in lease.done or tid in lease.lost:
                dups.append(tid)
                continue
            raise state.reject(409, "task_not_in_lease", f"task {tid} is not part of lease {req.lease_id}")
        try:
            want = state.evals.expected_n(tid, req.policy_version) if tid in state.evals else n
            want = 1 if tid in state.episodes else want  # an episode's later turn: one completion
        except HubError as e:
            raise state.reject(e.status, e.reason, e.detail) from None
        if len(result.completions) != want:
            raise state.reject(
                422, "wrong_group_size", f"task {tid}: {len(result.completions)} completions, want {want}"
            )
        for j, c in enumerate(result.completions):
            check_completion(state, tid, j, c, max_tokens)
            if state.episodes.enabled and tid not in state.evals and (why := state.episodes.check_turn(tid, c)):
                raise state.reject(422, "turn_not_ended", why)
        new.append(tid)
    return new, dups


def check_completion(state: HubLike, tid: int, j: int, c: Completion, max_tokens: int) -> None:
    where = f"task {tid} completion {j}"
    if not 1 <= len(c.token_ids) <= max_tokens:
        raise state.reject(422, "bad_length", f"{where}: {len(c.token_ids)} tokens, allowed 1..{max_tokens}")
    if len(c.logprobs) != len(c.token_ids):
        raise state.reject(
            422, "logprobs_mismatch", f"{where}: {len(c.logprobs)} logprobs for {len(c.token_ids)} tokens"
        )
    # min/max/sum run in C: these lists are the bulk of every submission.
    if min(c.token_ids) < 0 or max(c.token_ids) >= state.vocab_size:
        raise state.reject(422, "token_out_of_vocab", f"{where}: token id outside [0, {state.vocab_size})")
    if not (math.isfinite(sum(c.logprobs)) and max(c.logprobs) <= 0.0):  # a NaN or inf makes the sum non-finite
        raise state.reject(422, "bad_logprob", f"{where}: logprobs must be finite and <= 0")
