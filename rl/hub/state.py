"""The hub's state machine: workers, the task ledger, leases, submissions and the scored-group buffer.

Pure bookkeeping with no I/O, driven by the HTTP layer (rl/hub/server.py) from
one event loop, so no locks are needed and every rule is unit-testable.

A task is one prompt handed out under a sequence number (`task_id`), from the
deterministic `PromptOrder`. Its life: queued -> leased -> scoring -> buffered
-> consumed (by the trainer). An expired lease, a departed or dead worker, a
stale submission or a stale buffered group sends it back to the queue (front,
oldest first) under the same id; nothing is lost and nothing is counted twice.

How far workers may run ahead (the asynchrony contract, DESIGN.md): a task
leased to a worker holding version w will train at some step t >= `batches`,
and is only usable if t - w <= max_staleness. With P prompts per step, at
most P * (w + max_staleness + 1) tasks can be trained by such steps, so a
worker at version w may lease new tasks only while
`P * (w + max_staleness + 1 - batches) - outstanding > 0`.
"""

from __future__ import annotations

import hmac
import math
import secrets
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field

from rl.config import RunConfig
from rl.data import PromptOrder, PromptSet
from rl.protocol import (
    Completion,
    EvalCompletion,
    EvalJob,
    EvalRequest,
    EvalTaskResult,
    HubError,
    HubStatus,
    Lease,
    LeasedTask,
    LeaseRequest,
    Ledger,
    RegisterRequest,
    RegisterResponse,
    SamplingParamsWire,
    ScoredGroup,
    SubmitRequest,
    WorkerStatus,
)


@dataclass
class WorkerRecord:
    worker_id: str
    name: str
    engine: str
    token: str
    registered_at: float
    last_seen: float
    secret: str = ""
    policy_version: int = -1
    tokens_per_s: float = 0.0
    leases: set[str] = field(default_factory=set)
    completed_tasks: int = 0


@dataclass
class EvalJobRecord:
    """An evaluation of one policy version: its own task ids (negative), sampling and results."""

    job_id: str
    version: int
    sampling: SamplingParamsWire
    rows: dict[int, int]  # task id -> eval row index
    queue: deque[int]
    results: dict[int, EvalTaskResult] = field(default_factory=dict)


@dataclass
class LeaseRecord:
    lease_id: str
    worker_id: str
    task_ids: set[int]
    expires_at: float
    done: set[int] = field(default_factory=set)


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
        self.eval_prompts = eval_prompts
        self.eval_jobs: dict[str, EvalJobRecord] = {}
        self.eval_tasks: dict[int, str] = {}  # eval task id -> job id
        self._next_eval_id = -1
        self.vocab_size = vocab_size
        self.started = time.monotonic()
        self.prompts_per_step = cfg.trainer.prompts_per_step
        self.max_staleness = cfg.async_.max_staleness
        self.policy_version = -1  # nothing published yet
        self.workers: dict[str, WorkerRecord] = {}
        self.leases: dict[str, LeaseRecord] = {}
        self.queue: deque[int] = deque()  # re-queued task ids, served before new ones
        self.task_rows: dict[int, int] = {}  # outstanding task id -> row index
        self.leased: dict[int, str] = {}  # task id -> lease id
        self.scoring: dict[int, tuple[str, int]] = {}  # task id -> (worker id, version)
        self.buffer: OrderedDict[int, ScoredGroup] = OrderedDict()  # arrival order
        self.finished_leases: OrderedDict[str, tuple[str, set[int]]] = OrderedDict()  # for idempotent re-submits
        self.consumed = 0
        self.batches = 0
        self.rejections: Counter[str] = Counter()
        self.staleness_hist: Counter[int] = Counter()
        self.stale_dropped = 0
        self.zero_variance_skipped = 0
        self.submissions = 0
        self.tokens_generated = 0
        self.order = PromptOrder(len(prompts), cfg.data.seed)
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
        return Ledger(
            seed=self.cfg.data.seed,
            num_rows=len(self.prompts),
            position=self.order.position,
            pending=sorted(self.task_rows),
            consumed=self.consumed,
            batches=self.batches,
        )

    @property
    def outstanding(self) -> int:
        return len(self.task_rows)

    # ------------------------------------------------------------------ workers

    def register(self, req: RegisterRequest, caller: str | None, now: float) -> RegisterResponse:
        token = caller or "admin"
        cap = self.cfg.hub.max_workers_per_token
        if caller is not None and sum(w.token == token for w in self.workers.values()) >= cap:
            raise self.reject(429, "too_many_workers", f"this token already has {cap} registered workers "
                              "(hub.max_workers_per_token); leave or wait for dead ones to expire")  # fmt: skip
        worker_id = f"w-{secrets.token_hex(8)}"
        secret = secrets.token_urlsafe(24)
        self.workers[worker_id] = WorkerRecord(worker_id, req.name, req.engine, token, now, now, secret)
        return RegisterResponse(
            worker_id=worker_id,
            worker_secret=secret,
            heartbeat_interval_s=self.cfg.hub.heartbeat_interval_s,
            policy_version=self.policy_version,
            max_model_len=self.cfg.model.max_model_len,
            dtype=self.cfg.rollout.dtype or self.cfg.model.dtype,
            sampling=self.sampling_params(),
        )

    def sampling_params(self) -> SamplingParamsWire:
        s = self.cfg.sampling
        return SamplingParamsWire(
            n=s.n,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            max_tokens=s.max_tokens,
            stop=s.stop,
        )

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

    def heartbeat(self, worker_id: str, caller: str | None, version: int, tokens_per_s: float, now: float) -> None:
        rec = self.worker(worker_id, caller)
        if version > self.policy_version:
            raise self.reject(409, "future_version", f"version {version} was never published")
        rec.last_seen, rec.policy_version, rec.tokens_per_s = now, version, tokens_per_s

    def leave(self, worker_id: str, caller: str | None) -> int:
        rec = self.worker(worker_id, caller)
        returned = sum(self._drop_lease(lid) for lid in list(rec.leases))
        del self.workers[worker_id]
        return returned

    def versions_in_use(self) -> set[int]:
        """Versions live workers hold that can still produce usable groups (a stale claim keeps nothing)."""
        oldest = max(0, self.policy_version - self.max_staleness)
        return {w.policy_version for w in self.workers.values() if w.policy_version >= oldest}

    # ------------------------------------------------------------------ leases

    def capacity(self, version: int) -> int:
        """New tasks a worker holding `version` may start without breaking the staleness window."""
        window = self.prompts_per_step * (version + self.max_staleness + 1 - self.batches)
        return min(window, self.cfg.hub.buffer_size) - self.outstanding

    def lease(self, req: LeaseRequest, caller: str | None, now: float) -> Lease:
        rec = self.worker(req.worker_id, caller)
        rec.last_seen = now
        rec.policy_version = req.policy_version
        if self.policy_version < 0:
            return Lease(lease_id=None, retry_after_s=1.0, reason="no policy published yet")
        if req.policy_version > self.policy_version:
            raise HubError(409, "future_version", f"version {req.policy_version} was never published")
        min_version = max(0, self.policy_version - self.max_staleness)
        if req.policy_version < min_version:
            return Lease(lease_id=None, min_policy_version=self.policy_version, reason="update policy first")
        job = next((j for j in self.eval_jobs.values() if j.queue and j.version == req.policy_version), None)
        if job is not None:
            return self._lease_eval(job, rec, req, now)
        held = sum(len(self.leases[lid].task_ids) for lid in rec.leases if lid in self.leases)
        want = min(req.max_tasks, self.cfg.hub.max_tasks_per_lease, self.cfg.hub.max_leased_per_worker - held)
        tasks: list[int] = []
        while self.queue and len(tasks) < want:
            tasks.append(self.queue.popleft())
        room = min(want - len(tasks), self.capacity(req.policy_version))
        for _ in range(max(room, 0)):
            seq, index = self.order.next()
            self.task_rows[seq] = index
            tasks.append(seq)
        if not tasks:
            behind = self.capacity(self.policy_version) > 0 and req.policy_version < self.policy_version
            return Lease(
                lease_id=None,
                min_policy_version=self.policy_version if behind else req.policy_version,
                retry_after_s=0.5,
                reason="update policy first" if behind else "no work: the trainer has enough samples in flight",
            )
        lease_id = f"l-{secrets.token_hex(6)}"
        self.leases[lease_id] = LeaseRecord(lease_id, rec.worker_id, set(tasks), now + self.cfg.hub.lease_ttl_s)
        rec.leases.add(lease_id)
        for tid in tasks:
            self.leased[tid] = lease_id
        return Lease(
            lease_id=lease_id,
            expires_in_s=self.cfg.hub.lease_ttl_s,
            min_policy_version=min_version,
            sampling=self.sampling_params(),
            tasks=[LeasedTask(task_id=t, prompt_token_ids=self.prompts.prompt_ids[self.task_rows[t]]) for t in tasks],
        )

    def _lease_eval(self, job: EvalJobRecord, rec: WorkerRecord, req: LeaseRequest, now: float) -> Lease:
        want = min(req.max_tasks, self.cfg.hub.max_tasks_per_lease)
        tasks = [job.queue.popleft() for _ in range(min(want, len(job.queue)))]
        lease_id = f"l-{secrets.token_hex(6)}"
        self.leases[lease_id] = LeaseRecord(lease_id, rec.worker_id, set(tasks), now + self.cfg.hub.lease_ttl_s)
        rec.leases.add(lease_id)
        for tid in tasks:
            self.leased[tid] = lease_id
        assert self.eval_prompts is not None
        return Lease(
            lease_id=lease_id,
            expires_in_s=self.cfg.hub.lease_ttl_s,
            min_policy_version=job.version,
            sampling=job.sampling,
            tasks=[LeasedTask(task_id=t, prompt_token_ids=self.eval_prompts.prompt_ids[job.rows[t]]) for t in tasks],
        )

    def _requeue(self, task_ids) -> None:
        """Back to the front of the queue, oldest first (eval tasks back to their job)."""
        for tid in sorted(task_ids, reverse=True):
            if tid in self.eval_tasks:
                self.eval_jobs[self.eval_tasks[tid]].queue.appendleft(tid)
            else:
                self.queue.appendleft(tid)

    def _drop_lease(self, lease_id: str) -> int:
        lease = self.leases.pop(lease_id, None)
        if lease is None:
            return 0
        if (rec := self.workers.get(lease.worker_id)) is not None:
            rec.leases.discard(lease_id)
        for tid in lease.task_ids:
            self.leased.pop(tid, None)
        self._requeue(lease.task_ids)
        return len(lease.task_ids)

    def expire(self, now: float) -> tuple[int, int]:
        """Re-queue expired leases and drop workers silent for 3 heartbeat intervals."""
        expired = sum(self._drop_lease(lid) for lid, lease in list(self.leases.items()) if lease.expires_at < now)
        dead_after = 3 * self.cfg.hub.heartbeat_interval_s
        dead = [w for w in self.workers.values() if now - w.last_seen > dead_after]
        for w in dead:
            expired += sum(self._drop_lease(lid) for lid in list(w.leases))
            del self.workers[w.worker_id]
        return expired, len(dead)

    # ------------------------------------------------------------------ submissions

    def reject(self, status: int, reason: str, detail: str) -> HubError:
        self.rejections[reason] += 1
        return HubError(status, reason, detail)

    def validate_submission(self, req: SubmitRequest, caller: str | None) -> tuple[list[int], list[int]]:
        """Check everything before changing anything; returns (new task ids, duplicate task ids)."""
        rec = self.worker(req.worker_id, caller)
        lease = self.leases.get(req.lease_id)
        if lease is None:
            done = self.finished_leases.get(req.lease_id)
            if done is not None and done[0] == rec.worker_id and {r.task_id for r in req.results} <= done[1]:
                return [], [r.task_id for r in req.results]  # a re-sent submission: accepted once already
            raise self.reject(409, "unknown_lease", f"lease {req.lease_id} is unknown or expired")
        if lease.worker_id != rec.worker_id:
            raise self.reject(403, "not_your_lease", f"lease {req.lease_id} belongs to another worker")
        if req.policy_version > self.policy_version:
            raise self.reject(422, "future_version", f"version {req.policy_version} was never published")
        n, max_tokens = self.cfg.sampling.n, self.cfg.sampling.max_tokens
        new, dups, seen = [], [], set()
        for result in req.results:
            tid = result.task_id
            if tid in seen:
                raise self.reject(422, "repeated_task", f"task {tid} appears twice in one submission")
            seen.add(tid)
            if tid not in lease.task_ids:
                if tid in lease.done:
                    dups.append(tid)
                    continue
                raise self.reject(409, "task_not_in_lease", f"task {tid} is not part of lease {req.lease_id}")
            want = n
            if tid in self.eval_tasks:
                job = self.eval_jobs[self.eval_tasks[tid]]
                want = job.sampling.n
                if req.policy_version != job.version:
                    raise self.reject(422, "wrong_version", f"eval task {tid} is for version {job.version}")
            if len(result.completions) != want:
                raise self.reject(
                    422, "wrong_group_size", f"task {tid}: {len(result.completions)} completions, want {want}"
                )
            for j, c in enumerate(result.completions):
                self._check_completion(tid, j, c, max_tokens)
            new.append(tid)
        return new, dups

    def _check_completion(self, tid: int, j: int, c: Completion, max_tokens: int) -> None:
        where = f"task {tid} completion {j}"
        if not 1 <= len(c.token_ids) <= max_tokens:
            raise self.reject(422, "bad_length", f"{where}: {len(c.token_ids)} tokens, allowed 1..{max_tokens}")
        if len(c.logprobs) != len(c.token_ids):
            raise self.reject(
                422, "logprobs_mismatch", f"{where}: {len(c.logprobs)} logprobs for {len(c.token_ids)} tokens"
            )
        if any(t < 0 or t >= self.vocab_size for t in c.token_ids):
            raise self.reject(422, "token_out_of_vocab", f"{where}: token id outside [0, {self.vocab_size})")
        if not all(math.isfinite(x) and x <= 0.0 for x in c.logprobs):
            raise self.reject(422, "bad_logprob", f"{where}: logprobs must be finite and <= 0")

    def accept(self, req: SubmitRequest, task_ids: list[int], now: float) -> None:
        """Move validated tasks from their lease to scoring; stale versions go back to the queue."""
        rec = self.workers[req.worker_id]
        rec.last_seen = now
        lease = self.leases[req.lease_id]
        for tid in task_ids:
            lease.task_ids.discard(tid)
            lease.done.add(tid)
            self.leased.pop(tid, None)
            self.scoring[tid] = (rec.worker_id, req.policy_version)
        if not lease.task_ids:
            del self.leases[req.lease_id]
            rec.leases.discard(req.lease_id)
            self.finished_leases[req.lease_id] = (rec.worker_id, lease.done)
            while len(self.finished_leases) > 10_000:
                self.finished_leases.popitem(last=False)
        rec.completed_tasks += len(task_ids)
        self.submissions += 1
        self.tokens_generated += sum(
            len(c.token_ids) for r in req.results if r.task_id in task_ids for c in r.completions
        )

    def stale_submission(self, req: SubmitRequest) -> HubError | None:
        """A version older than current - max_staleness: reject, and re-queue the lease's tasks."""
        oldest = self.policy_version - self.max_staleness
        if req.policy_version >= oldest or all(r.task_id in self.eval_tasks for r in req.results):
            return None
        lease = self.leases.get(req.lease_id)
        if lease is not None:
            tids = [r.task_id for r in req.results if r.task_id in lease.task_ids]
            for tid in tids:
                lease.task_ids.discard(tid)
                self.leased.pop(tid, None)
            self._requeue(tids)
            if not lease.task_ids:
                self._drop_lease(req.lease_id)
        return self.reject(
            409,
            "stale_version",
            f"version {req.policy_version} is older than {oldest} (max_staleness); re-queued",
        )

    def scored(self, group: ScoredGroup) -> None:
        self.scoring.pop(group.task_id, None)
        self.buffer[group.task_id] = group

    def scoring_failed(self, task_id: int) -> None:
        self.scoring.pop(task_id, None)
        self._requeue([task_id])

    # ------------------------------------------------------------------ trainer

    def take_batch(self, num_groups: int, step: int, skip_zero_variance: bool) -> tuple[list[ScoredGroup], int, int]:
        """Take a full batch if one is ready, else nothing (stale groups are dropped either way)."""
        stale = skipped = 0
        for tid, group in list(self.buffer.items()):
            if step - group.policy_version > self.max_staleness:
                del self.buffer[tid]
                self._requeue([tid])
                stale += 1
        chosen: list[int] = []
        candidates = sorted(self.task_rows) if self.cfg.async_.ordered else list(self.buffer)
        for tid in candidates:
            if len(chosen) == num_groups:
                break
            group = self.buffer.get(tid)
            if group is None:
                break  # ordered mode: the next task in order is not ready yet
            rewards = [c.reward for c in group.completions]
            if skip_zero_variance and max(rewards) - min(rewards) < 1e-9:
                del self.buffer[tid]
                del self.task_rows[tid]
                self.consumed += 1
                skipped += 1
                continue
            chosen.append(tid)
        self.stale_dropped += stale
        self.zero_variance_skipped += skipped
        if len(chosen) < num_groups:
            return [], stale, skipped
        groups = [self.buffer.pop(tid) for tid in chosen]
        for g in groups:
            del self.task_rows[g.task_id]
            self.staleness_hist[step - g.policy_version] += 1
        self.consumed += len(groups)
        self.batches += 1
        return groups, stale, skipped

    # ------------------------------------------------------------------ evaluation

    def start_eval(self, req: EvalRequest) -> EvalJob:
        if self.eval_prompts is None or len(self.eval_prompts) == 0:
            raise HubError(422, "no_eval_data", "this run has no held-out prompts (data.eval_size = 0)")
        if req.version != self.policy_version:
            raise HubError(422, "not_current", f"can only evaluate the current version {self.policy_version}")
        count = min(req.num_prompts, len(self.eval_prompts))
        rows = {}
        for row in range(count):
            rows[self._next_eval_id] = row
            self._next_eval_id -= 1
        s = self.sampling_params()
        sampling = s.model_copy(update={"n": req.n, "temperature": req.temperature})
        job_id = f"e-{secrets.token_hex(4)}"
        job = EvalJobRecord(job_id, req.version, sampling, rows, deque(sorted(rows, reverse=True)))
        self.eval_jobs[job_id] = job
        self.eval_tasks.update({tid: job_id for tid in rows})
        return self.eval_status(job_id)

    def eval_row(self, task_id: int) -> int | None:
        job_id = self.eval_tasks.get(task_id)
        return None if job_id is None else self.eval_jobs[job_id].rows[task_id]

    def eval_scored(self, task_id: int, completions: list[Completion], rewards) -> None:
        self.scoring.pop(task_id, None)
        job = self.eval_jobs[self.eval_tasks[task_id]]
        job.results[task_id] = EvalTaskResult(
            task_id=task_id,
            row_index=job.rows[task_id],
            completions=[
                EvalCompletion(
                    reward=r.value, components=r.components, length=len(c.token_ids), finish_reason=c.finish_reason
                )
                for c, r in zip(completions, rewards, strict=True)
            ],
        )

    def eval_status(self, job_id: str) -> EvalJob:
        job = self.eval_jobs.get(job_id)
        if job is None:
            raise HubError(404, "unknown_eval", f"no eval job {job_id}")
        done = len(job.results) == len(job.rows)
        out = EvalJob(job_id=job_id, version=job.version, total=len(job.rows), done=len(job.results))
        if done:
            out.results = [job.results[t] for t in sorted(job.rows, reverse=True)]
            for tid in job.rows:  # finished: forget it (the caller has the results now)
                self.eval_tasks.pop(tid, None)
            del self.eval_jobs[job_id]
        return out

    # ------------------------------------------------------------------ status

    def status(self, now: float, verifier: dict[str, float]) -> HubStatus:
        return HubStatus(
            policy_version=self.policy_version,
            workers=[
                WorkerStatus(
                    worker_id=w.worker_id,
                    name=w.name,
                    engine=w.engine,
                    policy_version=w.policy_version,
                    tokens_per_s=w.tokens_per_s,
                    last_seen_s=round(now - w.last_seen, 2),
                    leased_tasks=sum(len(self.leases[lid].task_ids) for lid in w.leases if lid in self.leases),
                    completed_tasks=w.completed_tasks,
                )
                for w in self.workers.values()
            ],
            queued=len(self.queue),
            leased=len(self.leased),
            scoring=len(self.scoring),
            buffered=len(self.buffer),
            consumed=self.consumed,
            batches=self.batches,
            rejections=dict(self.rejections),
            staleness_histogram={str(k): v for k, v in sorted(self.staleness_hist.items())},
            stale_dropped=self.stale_dropped,
            zero_variance_skipped=self.zero_variance_skipped,
            submissions=self.submissions,
            tokens_generated=self.tokens_generated,
            verifier=verifier,
            uptime_s=round(now - self.started, 1),
        )
