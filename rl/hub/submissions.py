"""Checks of a worker's submission before the hub's state changes: ownership, lease, version, shapes, bounds.

Every number a worker sends is self-reported; these checks refuse (4xx, counted by reason) anything
outside the lease it answers, the version window or the run's limits, and change nothing (but a stale
version's tasks go back to the queue: `stale_submission`). Token ids
and log-probs come as JSON lists or packed (rl/wire/packed.py) and are checked as arrays either way.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rl.wire.packed import PackedCompletion, PackedError
from rl.wire.protocol import Completion, HubError, SubmitRequest

HubLike = Any
"""The hub's state (rl/hub/state.py `HubState`): its workers, leases, evals, config and `reject`."""


def validate_submission(
    state: HubLike, req: SubmitRequest, caller: str | None
) -> tuple[list[int], list[int], dict[int, list[PackedCompletion]]]:
    """Check everything before changing anything; returns (new task ids, duplicate task ids, their completions)."""
    rec = state.worker(req.worker_id, caller)
    lease = state.leases.get(req.lease_id)
    if lease is None:
        done = state.finished_leases.get(req.lease_id)
        if done is not None and done[0] == rec.worker_id and {r.task_id for r in req.results} <= done[1]:
            return [], [r.task_id for r in req.results], {}  # a re-sent submission: accepted once already
        raise state.reject(409, "unknown_lease", f"lease {req.lease_id} is unknown or expired")
    if lease.worker_id != rec.worker_id:
        raise state.reject(403, "not_your_lease", f"lease {req.lease_id} belongs to another worker")
    if req.policy_version > state.policy_version:
        raise state.reject(422, "future_version", f"version {req.policy_version} was never published")
    if req.policy_version < lease.version:
        raise state.reject(422, "version_before_lease", f"version {req.policy_version} is older than version "
                          f"{lease.version}, held when lease {req.lease_id} was taken")  # fmt: skip
    n, max_tokens = state.cfg.sampling.n, state.cfg.sampling.max_tokens
    new, dups, seen, checked = [], [], set(), {}
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
            task = state.episodes.task_of(tid)  # an eval's turns too are at its job's version
            want = state.evals.expected_n(task, req.policy_version) if task in state.evals else n
            want = 1 if tid in state.episodes else want  # an episode's later turn: one completion
        except HubError as e:
            raise state.reject(e.status, e.reason, e.detail) from None
        if len(result.completions) != want:
            raise state.reject(
                422, "wrong_group_size", f"task {tid}: {len(result.completions)} completions, want {want}"
            )
        checked[tid] = check_completions(state, tid, result.completions, max_tokens)
        if state.episodes.enabled:
            for c in checked[tid]:
                if why := state.episodes.check_turn(tid, c):
                    raise state.reject(422, "turn_not_ended", why)
        new.append(tid)
    return new, dups, checked


def stale_submission(state: HubLike, req: SubmitRequest) -> HubError | None:
    """A version older than current - max_staleness: refused, and the lease's tasks go back to the queue (the
    one check that changes the state: results that arrive too late are not waited for)."""
    oldest = state.policy_version - state.max_staleness
    if req.policy_version >= oldest or all(r.task_id < 0 for r in req.results):  # evals: their job's version
        return None
    state.give_back(req.lease_id, [r.task_id for r in req.results])
    return state.reject(409, "stale_version",
                        f"version {req.policy_version} is older than {oldest} (max_staleness); re-queued")  # fmt: skip


def check_completions(
    state: HubLike, tid: int, completions: list[Completion], max_tokens: int
) -> list[PackedCompletion]:
    """A task's completions, checked: each one's shape, then the values of all of them in one array pass
    (a failure is then named by checking them one at a time)."""
    packed = [unpack_completion(state, tid, j, c, max_tokens) for j, c in enumerate(completions)]
    if len(packed) > 1:
        ids = np.concatenate([p.ids for p in packed])
        logprobs = np.concatenate([p.logprobs for p in packed])
        if values_ok(state, ids, logprobs):
            return packed
    for j, p in enumerate(packed):
        check_values(state, f"task {tid} completion {j}", p)
    return packed


def unpack_completion(state: HubLike, tid: int, j: int, c: Completion, max_tokens: int) -> PackedCompletion:
    """A completion's arrays from either encoding, with their lengths checked."""
    where = f"task {tid} completion {j}"
    try:
        packed = PackedCompletion.of(c.token_ids, c.logprobs, c.finish_reason)
    except PackedError as e:
        raise state.reject(422, "bad_packed", f"{where}: {e}") from None
    ids, logprobs = packed.ids, packed.logprobs
    if not 1 <= len(ids) <= max_tokens:
        raise state.reject(422, "bad_length", f"{where}: token_ids: {len(ids)} tokens, allowed 1..{max_tokens}")
    if len(logprobs) != len(ids):
        raise state.reject(422, "logprobs_mismatch", f"{where}: logprobs: {len(logprobs)} for {len(ids)} tokens")
    return packed


def values_ok(state: HubLike, ids: np.ndarray, logprobs: np.ndarray) -> bool:
    """Every id in the vocabulary, every log-prob finite and <= 0. A NaN or inf makes the sum non-finite
    (summed in float64: many large finite values do not overflow)."""
    return bool(ids.min() >= 0 and ids.max() < state.vocab_size and np.isfinite(logprobs.sum(dtype=np.float64))
                and logprobs.max() <= 0.0)  # fmt: skip


def check_values(state: HubLike, where: str, packed: PackedCompletion) -> None:
    if packed.ids.min() < 0 or packed.ids.max() >= state.vocab_size:
        raise state.reject(422, "token_out_of_vocab", f"{where}: token_ids: an id outside [0, {state.vocab_size})")
    if not values_ok(state, packed.ids, packed.logprobs):
        raise state.reject(422, "bad_logprob", f"{where}: logprobs: must be finite (as float32) and <= 0")
