"""The hub's state machine: workers, the task ledger, leases, submissions and the scored-group buffer.

Pure bookkeeping with no I/O, driven from one event loop (no locks), so every rule is
unit-testable. The service (rl/hub/service.py) calls one method per request or event:
register / heartbeat / leave / expire, lease, submit (-> `ScoringJob`s for the runner, rl/hub/runner.py),
finish_scoring / fail_scoring, take_batch, publish, start_eval / eval_status (rl/hub/evals.py).

A task is one prompt handed out under a sequence number (`task_id`) of the deterministic
`PromptOrder`: queued -> leased -> scoring -> buffered -> consumed by the trainer. An expired
lease, a gone worker or a stale group sends it back to the front of the queue under the same
id: nothing is lost or counted twice. How far workers may run ahead is `capacity`
(docs/protocol.md, "How far ahead workers run"); failed scoring, docs/protocol.md "Scoring".
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Sequence

from rl.config import RunConfig
from rl.hub.data import PromptOrder, PromptSet
from rl.hub.episodes import Episodes
from rl.hub.evals import EvalJobs
from rl.hub.fair import holdings_agree, late_tasks, operator_room
from rl.hub.records import (
    MAX_SCORING_ATTEMPTS,
    MAX_SCORING_RETRY_S,
    SCORING_RETRY_S,
    LeaseRecord,
    ScoredBuffer,
    ScoringJob,
    WorkerRecord,
)
from rl.hub.status_report import hub_status
from rl.hub.submissions import stale_submission, validate_submission
from rl.sampling import completion_seeds
from rl.wire.packed import choose_wire
from rl.wire.protocol import (
    EvalJob,
    EvalRequest,
    HeartbeatResponse,
    HubError,
    HubStatus,
    Lease,
    LeasedTask,
    LeaseRequest,
    Ledger,
    RegisterRequest,
    RegisterResponse,
    SamplingParamsWire,
    ScoredCompletion,
    ScoredGroup,
    SubmitRequest,
    SubmitResponse,
)

EVAL_SEED_SALT = 0x5EED_E7A1
"""Eval tasks draw their seeds apart from training tasks (their ids are a separate count)."""


class HubState:
    def __init__(
        self,
        cfg: RunConfig,
        prompts: PromptSet,
        vocab_size: int,
        ledger: Ledger | None = None,
        eval_prompts: PromptSet | None = None,
    ):
        self.cfg = cfg
        self.prompts = prompts
        self.evals = EvalJobs(eval_prompts)
        self.vocab_size = vocab_size
        self.started = time.monotonic()
        self.prompts_per_step = cfg.trainer.prompts_per_step
        self.max_staleness = cfg.async_.max_staleness
        self.policy_version = -1  # nothing published yet
        self.workers: dict[str, WorkerRecord] = {}
        self.leases: dict[str, LeaseRecord] = {}
        self.queue: deque[int] = deque()  # re-queued task ids, served before new ones
        self.task_rows: dict[int, int] = {}  # outstanding task id -> row index
        self.episodes = Episodes.for_run(cfg, prompts, self.task_rows, self.evals)  # environments' turns (episodes.py)
        self.leased: dict[int, set[str]] = {}  # task id -> the leases holding it (two with a backup lease)
        self.blocked: set[str] = set()  # quarantined operators (token ids): no registrations, no leases
        self.registered: Counter[str] = Counter()  # operator -> its registrations (`self.workers`)
        self.held: Counter[str] = Counter()  # operator -> task ids its leases hold (rl/hub/fair.py, every lease)
        self.eval_operator: str | None = None  # the only operator given eval tasks (`rl train`'s local workers)
        self.turnaround: deque[float] = deque(maxlen=256)  # seconds from a lease to its result, recent ones
        self.scoring: dict[int, tuple[str, int]] = {}  # task id -> (worker id, version)
        self.buffer = ScoredBuffer()  # arrival order
        self.finished_leases: OrderedDict[str, tuple[str, set[int]]] = OrderedDict()  # for idempotent re-submits
        self.consumed = 0
        self.batches = 0
        self.rejections: Counter[str] = Counter()
        self.staleness_hist: Counter[int] = Counter()
        self.stale_dropped = 0
        self.zero_variance_skipped = 0
        self.submissions = 0
        self.tokens_generated = 0
        self.scoring_failures = 0
        self.scoring_dropped = 0
        self.last_scoring_error: str | None = None
        self.max_scoring_attempts = MAX_SCORING_ATTEMPTS
        self.scoring_retry_s = SCORING_RETRY_S
        self._sampling = SamplingParamsWire.of(cfg.sampling)  # what every lease carries: made once
        self.order = PromptOrder(len(prompts), cfg.data.seed)
        self.on_work: Callable[[], None] = lambda: None
        """Called whenever leasable work may have appeared (the server wakes long-polling leases)."""
        self.on_scored: Callable[[], None] = lambda: None
        """Called when a scored group enters the buffer (the server wakes waiting batch pulls)."""
        if ledger is not None:
            self._restore(ledger)

    # ------------------------------------------------------------------ ledger

    def _restore(self, ledger: Ledger) -> None:
        if ledger.seed != self.cfg.data.seed or ledger.num_rows != len(self.prompts):
            raise ValueError(
                f"ledger is for seed={ledger.seed}, {ledger.num_rows} prompts; this run has "
                f"seed={self.cfg.data.seed}, {len(self.prompts)} prompts (data config changed?)"
            )
        self.order.position = ledger.position
        self.consumed, self.batches = ledger.consumed, ledger.batches
        for tid in sorted(ledger.pending):
            self.task_rows[tid] = self.order.index_of(tid)
            self.queue.append(tid)

    def ledger(self) -> Ledger:
        return Ledger(seed=self.cfg.data.seed, num_rows=len(self.prompts), position=self.order.position,
                      pending=sorted(self.task_rows), consumed=self.consumed, batches=self.batches)  # fmt: skip

    @property
    def outstanding(self) -> int:
        return len(self.task_rows)

    # ------------------------------------------------------------------ workers

    def register(self, req: RegisterRequest, caller: str | None, now: float) -> RegisterResponse:
        token = caller or "admin"
        if token in self.blocked:
            raise self.reject(403, "quarantined", "this worker token is quarantined (its record outlives them)")
        cap = self.cfg.hub.max_workers_per_token
        if caller is not None and self.registered[token] >= cap:
            raise self.reject(429, "too_many_workers", f"this token already has {cap} registered workers "
                              "(hub.max_workers_per_token); leave or wait for dead ones to expire")  # fmt: skip
        worker_id = f"w-{secrets.token_hex(8)}"
        secret = secrets.token_urlsafe(24)
        self.workers[worker_id] = WorkerRecord(worker_id, req.name, req.engine, token, last_seen=now, secret=secret)
        self.registered[token] += 1
        return RegisterResponse(
            worker_id=worker_id,
            worker_secret=secret,
            heartbeat_interval_s=self.cfg.hub.heartbeat_interval_s,
            policy_version=self.policy_version,
            max_model_len=self.cfg.model.max_model_len,
            dtype=self.cfg.rollout.dtype or self.cfg.model.dtype,
            sampling=self.sampling_params(),
            weights_url=self.cfg.hub.weights_url,
            wire=choose_wire(req.wire),
        )

    def sampling_params(self) -> SamplingParamsWire:
        return self._sampling

    def worker(self, worker_id: str, caller: str | None) -> WorkerRecord:
        """The worker's record; `caller` is the caller's token id (None: admin, may act for anyone)."""
        rec = self.workers.get(worker_id)
        if rec is None:
            raise HubError(404, "unknown_worker", f"worker {worker_id} is not registered (hub restarted?)")
        if caller is not None and rec.token != caller:
            raise HubError(403, "not_your_worker", f"worker {worker_id} was registered with another token")
        return rec

    def authorize(self, worker_id: str, caller: str | None, secret: str | None) -> None:
        """A worker token may act for a worker only with that registration's secret (admin: always)."""
        rec = self.worker(worker_id, caller)
        if caller is not None and not hmac.compare_digest((secret or "").encode(), rec.secret.encode()):
            raise self.reject(403, "bad_worker_secret", f"wrong or missing X-Worker-Secret for worker {worker_id}")

    def drop_worker_work(self, worker_id: str) -> int:
        """Re-queue everything a worker holds: leases, tasks being scored, buffered groups (quarantine)."""
        rec = self.workers.get(worker_id)
        dropped = sum(self._drop_lease(lid) for lid in list(rec.leases)) if rec is not None else 0
        tids = [t for t, (wid, _) in self.scoring.items() if wid == worker_id]
        tids += [t for t, g in self.buffer.items() if g.worker_id == worker_id]
        for tid in tids:
            self.scoring.pop(tid, None)
            self.buffer.pop(tid, None)
        self._requeue(tids)
        return dropped + len(tids)

    def heartbeat(
        self, worker_id: str, caller: str | None, version: int, tokens_per_s: float, now: float,
        fetch_s: float = 0.0, load_s: float = 0.0, leases: Sequence[str] = (),
    ) -> HeartbeatResponse:  # fmt: skip
        """`leases`: those the worker is generating; the answer names the ones it no longer holds here."""
        rec = self.worker(worker_id, caller)
        if version > self.policy_version:
            raise self.reject(409, "future_version", f"version {version} was never published")
        rec.last_seen, rec.policy_version, rec.tokens_per_s = now, version, tokens_per_s
        rec.fetch_s, rec.load_s = fetch_s, load_s
        return HeartbeatResponse(policy_version=self.policy_version, lease_ttl_s=self.cfg.hub.lease_ttl_s,
                                 gone=[lid for lid in leases if lid not in rec.leases])  # fmt: skip

    def leave(self, worker_id: str, caller: str | None) -> int:
        rec = self.worker(worker_id, caller)
        returned = sum(self._drop_lease(lid) for lid in list(rec.leases))
        self._forget(worker_id)
        return returned

    def _forget(self, worker_id: str) -> None:
        token = self.workers.pop(worker_id).token
        self.registered[token] -= 1
        if not self.registered[token]:
            del self.registered[token]

    def remove_workers_of(self, token: str) -> tuple[int, int]:
        """Remove every worker registered with this token id (revoked): (workers removed, tasks re-queued)."""
        gone = [w.worker_id for w in self.workers.values() if w.token == token]
        return len(gone), sum(self.leave(worker_id, None) for worker_id in gone)

    def workers_of(self, operator: str) -> list[str]:
        return [w.worker_id for w in self.workers.values() if w.token == operator]

    def live_operators(self) -> int:  # operators with a live registration, not quarantined (rl/hub/fair.py)
        return len(self.registered.keys() - self.blocked)

    def block_operator(self, operator: str) -> None:
        """Quarantine (rl/hub/trust.py): the operator's registrations, present and future, get no work."""
        self.blocked.add(operator)
        self.on_work()  # the others' fair shares grew

    def unblock_operator(self, operator: str) -> None:
        self.blocked.discard(operator)

    def versions_in_use(self) -> set[int]:
        """Versions live workers hold that can still produce usable groups (a stale claim keeps nothing)."""
        oldest = max(0, self.policy_version - self.max_staleness)
        return {w.policy_version for w in self.workers.values() if w.policy_version >= oldest}

    # ------------------------------------------------------------------ policy

    def publish(self, version: int) -> set[int]:
        """`version` is the current policy from now on; returns the versions whose files must be kept."""
        self.policy_version = version
        self.on_work()  # the staleness window moved: waiting workers may lease, or must update
        return self.versions_in_use() | {version}

    def current_policy(self) -> int:
        """The current policy version; 409 `no_policy` while nothing is published yet (workers wait)."""
        if self.policy_version < 0:
            raise HubError(409, "no_policy", "no policy version published yet; retry shortly")
        return self.policy_version

    # ------------------------------------------------------------------ leases

    def capacity(self, version: int) -> int:
        """New tasks a worker holding `version` may start without breaking the staleness window."""
        window = self.prompts_per_step * (version + self.max_staleness + 1 - self.batches)
        return min(window, self.cfg.hub.buffer_size) - self.outstanding

    def lease(self, req: LeaseRequest, caller: str | None, now: float) -> Lease:
        rec = self.worker(req.worker_id, caller)
        rec.last_seen = now
        rec.policy_version = req.policy_version
        if rec.token in self.blocked:
            raise HubError(403, "quarantined", f"worker {rec.worker_id} is quarantined")
        if self.policy_version < 0:
            return Lease(lease_id=None, retry_after_s=1.0, reason="no policy published yet")
        if req.policy_version > self.policy_version:
            raise HubError(409, "future_version", f"version {req.policy_version} was never published")
        min_version = max(0, self.policy_version - self.max_staleness)
        if req.policy_version < min_version:
            return Lease(lease_id=None, min_policy_version=self.policy_version, reason="update policy first")
        offered = None  # eval results are not checked by the trainer: they go to the trusted operator alone
        if self.eval_operator is None or rec.token == self.eval_operator:
            k = min(req.max_tasks, self.cfg.hub.max_tasks_per_lease)
            offered = self.evals.next_tasks(req.policy_version, k) or self.episodes.next_eval_turns(
                rec.worker_id, req.policy_version, k
            )
        if offered is not None:
            return self._grant(rec, *offered, req.policy_version, now, req.policy_version)
        turns = self.episodes.next_turns(rec.worker_id, self.sampling_params(), req.max_tasks)
        if turns is not None:  # episodes in flight go first
            return self._grant(rec, *turns, min_version, now, req.policy_version)
        held = sum(len(self.leases[lid].task_ids) for lid in rec.leases if lid in self.leases)
        want = min(req.max_tasks, self.cfg.hub.max_tasks_per_lease, self.cfg.hub.max_leased_per_worker - held,
                   operator_room(self, rec.token))  # fmt: skip
        tasks: list[int] = []
        while self.queue and len(tasks) < want:
            tasks.append(self.queue.popleft())
        room = min(want - len(tasks), self.capacity(req.policy_version))
        for _ in range(max(room, 0)):
            seq, index = self.order.next()
            self.task_rows[seq] = index
            tasks.append(seq)
        if len(tasks) < want:
            tasks += late_tasks(self, rec.token, want - len(tasks), now)
        if not tasks:
            behind = self.capacity(self.policy_version) > 0 and req.policy_version < self.policy_version
            return Lease(
                lease_id=None,
                min_policy_version=self.policy_version if behind else req.policy_version,
                retry_after_s=0.5,
                reason="update policy first" if behind else "no work: the trainer has enough samples in flight",
            )
        leased = [LeasedTask(task_id=t, prompt_token_ids=self.prompts.prompt_ids[self.task_rows[t]]) for t in tasks]
        return self._grant(rec, leased, self.sampling_params(), min_version, now, req.policy_version)

    def _grant(
        self, rec: WorkerRecord, tasks: list[LeasedTask], sampling: SamplingParamsWire, min_version: int, now: float,
        held_version: int,
    ) -> Lease:  # fmt: skip
        lease_id = f"l-{secrets.token_hex(6)}"
        tids = {t.task_id for t in tasks}
        for t in tasks:
            t.seeds = t.seeds or self.seeds_of(t.task_id, sampling.n)  # an episode's turn comes with its seed
        self.leases[lease_id] = LeaseRecord(lease_id, rec.worker_id, tids, now + self.cfg.hub.lease_ttl_s,
                                            version=held_version, granted_at=now, token=rec.token)  # fmt: skip
        self.held[rec.token] += len(tids)
        rec.leases.add(lease_id)
        for tid in tids:
            self.leased.setdefault(tid, set()).add(lease_id)
        return Lease(
            lease_id=lease_id,
            expires_in_s=self.cfg.hub.lease_ttl_s,
            min_policy_version=min_version,
            sampling=sampling,
            tasks=tasks,
        )

    def seeds_of(self, task_id: int, n: int) -> list[int]:
        """The completions' sampling seeds of a task: a function of the run and the task, so a re-queued or
        restored task keeps them (dropping a group to wait for luckier draws gains nothing)."""
        salt = EVAL_SEED_SALT if task_id < 0 else 0
        return completion_seeds(self.cfg.trainer.seed ^ salt, task_id, n)

    def _requeue(self, task_ids) -> None:
        """Back to the front of the queue, oldest first (eval tasks back to their job)."""
        for tid in sorted(task_ids, reverse=True):
            if tid in self.evals:
                self.evals.requeue(tid)
            elif tid in self.episodes:
                self.episodes.requeue(tid)
            else:
                self.queue.appendleft(tid)
        if task_ids:
            self.on_work()

    def _drop_lease(self, lease_id: str) -> int:
        lease = self.leases.pop(lease_id, None)
        if lease is None:
            return 0
        self.held[lease.token] -= len(lease.task_ids)
        if (rec := self.workers.get(lease.worker_id)) is not None:
            rec.leases.discard(lease_id)
        self._requeue([tid for tid in lease.task_ids if self._release(tid, lease_id)])
        return len(lease.task_ids)

    def _release(self, tid: int, lease_id: str) -> bool:
        """`lease_id` no longer holds `tid`; True when no lease does (the task is free again)."""
        holders = self.leased.get(tid)
        if holders is None:
            return False
        holders.discard(lease_id)
        if not holders:
            del self.leased[tid]
            return True
        return False

    def expire(self, now: float) -> tuple[int, int]:
        """Re-queue expired leases and drop workers silent for 3 heartbeat intervals."""
        expired = sum(self._drop_lease(lid) for lid, lease in list(self.leases.items()) if lease.expires_at < now)
        dead_after = 3 * self.cfg.hub.heartbeat_interval_s
        dead = [w for w in self.workers.values() if now - w.last_seen > dead_after]
        for w in dead:
            expired += sum(self._drop_lease(lid) for lid in list(w.leases))
            self._forget(w.worker_id)
        return expired, len(dead)

    # ------------------------------------------------------------------ submissions

    def submit(self, req: SubmitRequest, caller: str | None, now: float) -> tuple[SubmitResponse, list[ScoringJob]]:
        """Validate and accept a worker's results; returns the answer and the jobs to score.

        A stale version is rejected (409) after its tasks went back to the queue; any other
        rejection changes nothing. Re-sent results are reported as duplicates, not scored twice.
        """
        new, dups, checked = validate_submission(self, req, caller)
        if new and (stale := stale_submission(self, req)) is not None:
            raise stale
        if not new:
            return SubmitResponse(accepted=[], duplicates=dups), []
        self.accept(req, new, now, sum(len(c) for cs in checked.values() for c in cs))
        rec, cached = self.workers[req.worker_id], {r.task_id: r.cached_prompt_tokens for r in req.results}
        jobs = [
            ScoringJob(
                task_id=tid,
                example=self.episodes.example_of(tid),
                completions=checked[tid],
                policy_version=req.policy_version,
                worker_id=rec.worker_id,
                worker_name=rec.name,
                gen_s=req.gen_seconds,
                cached_prompt_tokens=cached[tid],
            )
            for tid in new
        ]
        return SubmitResponse(accepted=new, duplicates=dups), jobs

    def count_rejection(self, reason: str) -> None:
        """Count a request refused before it reached the state (e.g. malformed JSON)."""
        self.rejections[reason] += 1

    def reject(self, status: int, reason: str, detail: str) -> HubError:
        self.rejections[reason] += 1
        return HubError(status, reason, detail)

    def accept(self, req: SubmitRequest, task_ids: list[int], now: float, tokens: int = 0) -> None:
        """Move validated tasks from their lease to scoring; stale versions go back to the queue."""
        rec = self.workers[req.worker_id]
        rec.last_seen = now
        lease = self.leases[req.lease_id]
        self.turnaround.append(now - lease.granted_at)
        for tid in task_ids:
            self._unhold(lease, tid)
            lease.done.add(tid)
            for other in self.leased.pop(tid, set()) - {req.lease_id}:  # a backup lease lost the race
                if (loser := self.leases.get(other)) is not None:
                    self._unhold(loser, tid)
                    loser.lost.add(tid)
                    if not loser.task_ids:
                        self._finish_lease(loser)
            self.scoring[tid] = (rec.worker_id, req.policy_version)
        if not lease.task_ids:
            self._finish_lease(lease)
        rec.completed_tasks += len(task_ids)
        self.submissions += 1
        self.tokens_generated += tokens

    def _unhold(self, lease: LeaseRecord, tid: int) -> None:
        if tid in lease.task_ids:
            lease.task_ids.remove(tid)
            self.held[lease.token] -= 1

    def _finish_lease(self, lease: LeaseRecord) -> None:
        """Every task of `lease` has a result (its own or a backup's); re-sent results become duplicates."""
        del self.leases[lease.lease_id]
        if (rec := self.workers.get(lease.worker_id)) is not None:
            rec.leases.discard(lease.lease_id)
        self.finished_leases[lease.lease_id] = (lease.worker_id, lease.done | lease.lost)
        while len(self.finished_leases) > 10_000:
            self.finished_leases.popitem(last=False)

    def give_back(self, lease_id: str, tids: list[int]) -> None:
        """Those of `tids` the lease holds go back to the queue (a stale submission's); it ends once it holds none."""
        if (lease := self.leases.get(lease_id)) is None:
            return
        for tid in (held := [t for t in tids if t in lease.task_ids]):
            self._unhold(lease, tid)
        self._requeue([tid for tid in held if self._release(tid, lease_id)])
        if not lease.task_ids:
            self._drop_lease(lease_id)

    # ------------------------------------------------------------------ scoring

    def finish_scoring(self, job: ScoringJob, rewards: list, score_s: float = 0.0) -> ScoredGroup | None:
        """A one-turn task's grades for `job.completions`, in order (rl/hub/runner.py): buffer its group (the
        packed completions forwarded as they came), or record the eval. `score_s`: seconds from submission to
        grade, retries included (for the trainer's metrics). The group, or None (an eval, a task given up)."""
        tid = job.task_id
        if self.scoring.get(tid) != job.key():
            return None  # given up meanwhile (and maybe leased and submitted again)
        if tid in self.evals:
            self.scoring.pop(tid)
            self.evals.record(tid, job.completions, rewards)
            return None
        row_index = self.task_rows[tid]
        # model_construct: the completions were validated on submission, the rest is made here.
        group = ScoredGroup.model_construct(
            task_id=tid,
            row_index=row_index,
            prompt_token_ids=self.prompts.prompt_ids[row_index],
            policy_version=job.policy_version,
            worker_id=job.worker_id,
            worker_name=job.worker_name,
            completions=[
                ScoredCompletion.model_construct(  # the packed texts, forwarded as they came
                    token_ids=c.packed_ids,
                    logprobs=c.packed_logprobs,
                    finish_reason=c.finish_reason,
                    reward=r.value,
                    components=r.components,
                )
                for c, r in zip(job.completions, rewards, strict=True)
            ],
            seeds=self.seeds_of(tid, len(job.completions)),
            gen_s=job.gen_s,
            score_s=score_s,
        )
        self.scored(group)
        return group

    def scored(self, group: ScoredGroup) -> None:
        self.scoring.pop(group.task_id, None)
        self.buffer[group.task_id] = group
        self.on_scored()

    def fail_scoring(self, job: ScoringJob, error: str) -> float | None:
        """Scoring `job` raised `error`: seconds to wait before `job.retry()`, or None when it is given up.

        After `max_scoring_attempts` failures the task is dropped: a training task leaves the
        ledger (counted in `scoring_dropped`, never trained), an eval task finishes its job without
        a result. The error stays in `last_scoring_error` for /v1/status.
        """
        self.scoring_failures += 1
        self.last_scoring_error = f"task {job.task_id} (attempt {job.attempt}/{self.max_scoring_attempts}): {error}"
        if self.scoring.get(job.task_id) != job.key():
            return None  # given up meanwhile (and maybe leased and submitted again)
        if job.attempt < self.max_scoring_attempts:
            return min(self.scoring_retry_s * 2 ** (job.attempt - 1), MAX_SCORING_RETRY_S)
        del self.scoring[job.task_id]
        self.scoring_dropped += 1
        if job.task_id in self.evals:
            self.evals.give_up(job.task_id)
        else:
            del self.task_rows[job.task_id]
            self.on_work()  # a slot in the staleness window is free again
        return None

    # ------------------------------------------------------------------ trainer

    def take_batch(self, num_groups: int, step: int, skip_zero_variance: bool) -> tuple[list[ScoredGroup], int, int]:
        """Take a full batch if one is ready, else nothing (stale groups are dropped either way)."""
        self._requeue(dropped := self.buffer.drop_stale(step - self.max_staleness))
        stale = len(dropped)
        if len(self.buffer) < num_groups and not skip_zero_variance:
            self.stale_dropped += stale
            return [], stale, 0  # not enough for a batch (what a waiting pull sees after most wake-ups)
        chosen: list[int] = []
        zero: list[int] = []  # removed after the loop, which reads the buffer in place (no copy per pull)
        for tid in sorted(self.task_rows) if self.cfg.async_.ordered else self.buffer:
            if len(chosen) == num_groups:
                break
            group = self.buffer.get(tid)
            if group is None:
                break  # ordered mode: the next task in order is not ready yet
            rewards = [c.reward for c in group.completions]
            (zero if skip_zero_variance and max(rewards) - min(rewards) < 1e-9 else chosen).append(tid)
        for tid in zero:
            del self.buffer[tid], self.task_rows[tid]
        skipped = len(zero)
        self.consumed += skipped
        self.stale_dropped += stale
        self.zero_variance_skipped += skipped
        if skipped:
            self.on_work()  # consumed without training: room in the staleness window
        if len(chosen) < num_groups:
            return [], stale, skipped
        groups = [self.buffer.pop(tid) for tid in chosen]
        for g in groups:
            del self.task_rows[g.task_id]
            self.staleness_hist[step - g.policy_version] += 1
        self.consumed += len(groups)
        self.batches += 1
        self.on_work()  # the staleness window moved on
        return groups, stale, skipped

    # ------------------------------------------------------------------ evaluation

    def start_eval(self, req: EvalRequest) -> EvalJob:
        job = self.evals.start(req, self.policy_version, self.sampling_params())
        self.on_work()
        return job

    def eval_status(self, job_id: str) -> EvalJob:
        return self.evals.report(job_id)

    # ------------------------------------------------------------------ status

    def status(self, now: float, verifier: dict[str, float], offset: int = 0, limit: int = 100) -> HubStatus:
        """The hub at a glance (rl/hub/status_report.py)."""
        return hub_status(self, now, verifier, offset, limit)

    def audit(self) -> dict[str, list[int] | int]:
        """Where every training task handed out is now (consumed ones are known to the trainer)."""
        return {
            "position": self.order.position,
            "queued": sorted(self.queue),
            "leased": sorted(t for t in self.leased if t >= 0),
            "scoring": sorted(t for t in self.scoring if t >= 0),
            "buffered": sorted(self.buffer),
            "counts_agree": int(holdings_agree(self)),
        }
