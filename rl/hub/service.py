"""The running hub: the service the HTTP routes call, one method per request.

`Hub` wraps the bookkeeping of `HubState` (rl/hub/state.py) with what needs the event loop
or I/O: long polls that wait on the state's events, every task's steps and grades
(rl/hub/runner.py; a plain dataset's in the verifier pool's processes, so a slow or hostile
completion never stalls leases or submissions), worker
trust (rl/hub/trust.py), the policy files (rl/hub/policy_files.py), and the ledger
database (rl/hub/ledger.py): a batch is recorded there before it is answered, the rest
every `FLUSH_INTERVAL_S`, so a hub that dies restarts from it with nothing lost or
trained twice. rl/hub/routes.py is the HTTP edge over it, rl/hub/main.py starts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import Counter
from pathlib import Path

import orjson

from rl.config import RunConfig
from rl.envs.verified import Verified
from rl.hub.contributions import ContributionLedger
from rl.hub.episode_store import EpisodeStore
from rl.hub.fair import FairTurns
from rl.hub.ledger import EXIT_DISK_FULL, FLUSH_INTERVAL_S, LedgerStore, disk_full
from rl.hub.policy_files import PolicyFiles
from rl.hub.runner import TaskRunner
from rl.hub.state import HubState
from rl.hub.texts import TextDecoder
from rl.hub.trust import Trust
from rl.wire.protocol import (
    Ack,
    Batch,
    BatchRequest,
    HeartbeatRequest,
    HeartbeatResponse,
    HubError,
    HubStatus,
    IdentityChallenge,
    Lease,
    LeaseRequest,
    PolicyManifest,
    ProvenanceReport,
    RegisterRequest,
    RegisterResponse,
    ScoredGroup,
    Stall,
    SubmitRequest,
    SubmitResponse,
    WaitingFor,
)
from rl.wire.receipts import Contributions, StepReceipt
from rl.wire.tokens import Tokens
from rl.wire.waits import metric_key, open_waits, stall_counts
from verifiers.base import TIMEOUT_MARK

log = logging.getLogger(__name__)

FROZEN_S = 5.0
"""A housekeeping tick this late means the hub itself did not run (see `Hub.housekeeping`)."""
MAX_STALL_REPORTERS = 4096
"""Registrations whose reported waits the hub keeps (`Hub.all_stall_counts`)."""


class Hub:
    """The running hub: state, verifier pool, tokenizer for decoding, policy files, ledger database.

    Methods that act for a worker take the caller's token id (`who`, None for the admin token)
    and the registration secret it sent (`secret`).
    """

    def __init__(self, cfg: RunConfig, state: HubState, pool, tokenizer, policy_dir: Path, tokens: Tokens,
                 store: LedgerStore | None = None):  # fmt: skip
        self.cfg, self.state, self.pool, self.tokenizer = cfg, state, pool, tokenizer
        self.turns = FairTurns(cfg.rewards.workers, operators=state.live_operators)
        """Scoring slots, served round-robin over operators (rl/hub/fair.py); a job uses one verifier process."""
        self.tokens, self.store = tokens, store
        self.files = PolicyFiles(policy_dir)
        self.changed = asyncio.Event()
        """Set when a scored group arrives (wakes batch pulls)."""
        self.work = asyncio.Event()
        """Replaced by `poke()` whenever leasable work may have appeared (wakes long-polling leases)."""
        self.shutdown_requested = asyncio.Event()
        self.trust = Trust(cfg.trust, state)
        self.contributions = ContributionLedger(store.path if store is not None else None, cfg.paths.run_key_pub)
        """Contributors, their counts and the trainer's receipts (rl/hub/contributions.py)."""
        self._scoring_tasks: set[asyncio.Task] = set()
        self.stalls: dict[str, tuple[Stall, float]] = {}
        """Current stalls by component, with when they were reported (`record_stall`)."""
        self.stall_counts: Counter[str] = Counter()
        """Stalls reported to the hub (`record_stall`), by component."""
        self.worker_stalls: dict[str, dict[str, int]] = {}
        self.worker_waits: dict[str, tuple[list[WaitingFor], float]] = {}
        """Each worker's waits in flight from its last heartbeat, with when it was received."""
        """Each registration's reported waits, by what (its heartbeats; kept after it left, for the totals)."""
        state.on_work, state.on_scored = self.poke, self.changed.set
        if store is not None:  # a restarted hub: quarantines hold, evidence keeps counting
            self.trust.restore(store.operators)
        self._ledger_lock = asyncio.Lock()
        """Held while the ledger is written (off the event loop): one snapshot at a time, in order."""
        self.decode = TextDecoder(tokenizer)
        """Token ids -> text, as the tokenizer decodes them (rl/hub/texts.py)."""
        db = None
        if state.episodes.enabled:
            state.episodes.end_ids = {getattr(tokenizer, "eos_token_id", None)} - {None}
            db = EpisodeStore(store.path) if store is not None else None
        env = None if state.episodes.enabled else Verified(self.verify)  # a plain dataset: the one-turn case
        self.runner = TaskRunner(state, tokenizer, db, self.decode, env, self.group_buffered)
        """Every task's steps and grades (rl/hub/runner.py)."""
        self._adopt_published_policy()
        self.runner.restore()  # after the policy: episodes newer than it are from after a checkpoint
        self.flush_ledger()

    @property
    def policy_dir(self) -> Path:
        return self.files.policy_dir

    def _adopt_published_policy(self) -> None:
        newest = self.files.newest_on_disk()
        if newest >= 0:  # a restarted hub serves what the trainer already published
            self.state.publish(newest)
        recorded = self.store.policy_version if self.store is not None else -1
        if recorded >= 0 and recorded != self.state.policy_version:
            # The files are what workers load: they win. Newer on disk is a publish the trainer
            # wrote but the dead hub had not recorded (the trainer re-announces it); older means
            # versions were deleted by hand.
            log.warning("the ledger says policy version %d was published, the newest on disk is %d: using %d",
                        recorded, self.state.policy_version, self.state.policy_version)  # fmt: skip

    # ------------------------------------------------------------------ ledger

    def flush_ledger(self, batch: tuple[str, bytes] | None = None) -> None:
        """Commit the ledger's changes (and a batch answer about to be sent) to the database, if any.

        Blocking: for start-up and shutdown. While serving, `write_ledger`.
        """
        if self.store is not None:
            self.store.save(self.state.ledger(), self.state.policy_version, batch, self.trust.records())
        self.contributions.tick(self.trust.quarantined, self.state.batches, self.state.policy_version)
        self.contributions.flush()

    async def write_ledger(self, batch: tuple[str, bytes] | None = None) -> None:
        """`flush_ledger` in a thread, so a large batch's write never stalls leases and submissions.

        The snapshot is taken under the lock: a write never replaces a newer snapshot with an older one.
        """
        if self.store is None:
            return
        async with self._ledger_lock:
            ledger, version, records = self.state.ledger(), self.state.policy_version, self.trust.records()
            await asyncio.to_thread(self.store.save, ledger, version, batch, records)

    async def record_batch(self, pull_id: str | None, body: bytes) -> None:
        """Commit a batch about to be answered, or exit: a hub that cannot record a batch must not hand it out.

        Its groups already left the in-memory buffer; exiting is a crash like any other, and the
        restarted hub re-queues them from the database (`rl train` restarts it).
        """
        try:
            await self.write_ledger((pull_id or "", body))
        except Exception as e:
            log.critical("cannot record the batch in %s; exiting (restarted from the database by rl train)",
                         self.store.path if self.store else None, exc_info=True)  # fmt: skip
            logging.shutdown()
            os._exit(EXIT_DISK_FULL if disk_full(e) else 75)

    async def flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_S)
            try:
                await self.write_ledger()
                self.contributions.tick(self.trust.quarantined, self.state.batches, self.state.policy_version)
                await self.contributions.flush_async()
            except Exception:  # a full disk: the next flush (or the next batch pull) tries again
                log.exception("writing the ledger to %s failed", self.store.path if self.store else None)

    # ------------------------------------------------------------------ background

    @contextlib.asynccontextmanager
    async def background(self):
        """While serving: expire leases and silent workers every second, flush the ledger periodically."""
        keeper = asyncio.create_task(self.housekeeping())
        flusher = asyncio.create_task(self.flush_periodically())
        try:
            yield
        finally:
            keeper.cancel()
            flusher.cancel()

    async def housekeeping(self) -> None:
        """Every second: expire leases and silent workers. After the hub itself did not run for a while (a
        SIGSTOP, a starved CPU), nothing expires until workers had 3 heartbeats' time to be heard again: their
        silence was the hub's."""
        last = hold_until = time.monotonic()
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            if (frozen := now - last - 1.0) > FROZEN_S:
                hold_until = now + 3 * self.cfg.hub.heartbeat_interval_s + 1.0
                log.warning("the hub did not run for %.0f s (stopped, or starved of CPU): no lease or worker expires "
                            "for %.0f s, so that workers are heard again first", frozen, hold_until - now)  # fmt: skip
            last = now
            if now < hold_until:
                continue
            expired, dead = self.state.expire(now)
            if expired or dead:
                log.info("re-queued %d tasks from expired leases; dropped %d silent workers", expired, dead)

    def poke(self) -> None:
        """Wake the leases waiting for work (see `lease`)."""
        self.work.set()
        self.work = asyncio.Event()

    def request_shutdown(self) -> Ack:
        self.shutdown_requested.set()
        return Ack(detail="shutting down")

    # ------------------------------------------------------------------ workers

    def register(self, req: RegisterRequest, who: str | None) -> RegisterResponse:
        contributor = self.contributions.identify(req.identity, who)
        resp = self.state.register(req, who, time.monotonic())
        self.contributions.bind(resp.worker_id, contributor, who, req.name)
        log.info("worker %s (%s, %s) registered for %s", resp.worker_id, req.name, req.engine, contributor)
        return resp

    def challenge(self) -> IdentityChallenge:
        """A one-time string for a contributor key to sign (registration, fetching receipts)."""
        return self.contributions.challenge()

    def heartbeat(
        self, worker_id: str, req: HeartbeatRequest, who: str | None, secret: str | None
    ) -> HeartbeatResponse:
        self.state.authorize(worker_id, who, secret)
        if req.stalls and (worker_id in self.worker_stalls or len(self.worker_stalls) < MAX_STALL_REPORTERS):
            self.worker_stalls[worker_id] = req.stalls
        if req.waiting or self.worker_waits.pop(worker_id, None) is not None:
            self.worker_waits[worker_id] = (req.waiting, time.monotonic())
        return self.state.heartbeat(worker_id, who, req.policy_version, req.tokens_per_s, time.monotonic(),
                                    req.fetch_s, req.load_s, req.leases)  # fmt: skip

    def leave(self, worker_id: str, who: str | None, secret: str | None) -> Ack:
        self.state.authorize(worker_id, who, secret)
        returned = self.state.leave(worker_id, who)
        log.info("worker %s left; %d tasks re-queued", worker_id, returned)
        return Ack(detail=f"{returned} tasks re-queued")

    async def lease(self, req: LeaseRequest, who: str | None, secret: str | None) -> Lease:
        """A lease, or none; without work, held up to `req.wait_s` (a long poll), re-tried whenever poked."""
        self.state.authorize(req.worker_id, who, secret)
        self.trust.check(req.worker_id)
        deadline = time.monotonic() + req.wait_s
        while True:
            woken = self.work
            answer = self.state.lease(req, who, time.monotonic())
            remaining = deadline - time.monotonic()
            if answer.lease_id is not None or answer.min_policy_version > req.policy_version:
                return answer
            if remaining <= 0:
                return answer.model_copy(update={"retry_after_s": 0.0}) if req.wait_s > 0 else answer
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(woken.wait(), timeout=min(remaining, 1.0))

    def submit(self, req: SubmitRequest, who: str | None, secret: str | None) -> SubmitResponse:
        """Accept a worker's results and start stepping each new task (rl/hub/runner.py: graded when done)."""
        self.state.authorize(req.worker_id, who, secret)
        self.trust.check(req.worker_id)
        step = self.state.batches
        try:
            answer, jobs = self.state.submit(req, who, time.monotonic())
        except HubError as e:  # the registration proved itself: the refusal counts against its contributor
            self.contributions.rejected(req.worker_id, step, req, e.reason)
            raise
        # Evaluation is the run's own business, not a contribution.
        self.contributions.submitted([j for j in jobs if j.task_id >= 0], step, req.gen_seconds)  # evals: < 0
        for job in jobs:
            self._spawn(self.runner.advance(job))
        return answer

    # ------------------------------------------------------------------ scoring

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._scoring_tasks.add(task)
        task.add_done_callback(self._scoring_tasks.discard)

    async def verify(self, items: list[tuple[str, dict]], worker_id: str) -> list:
        """The verifiers' rewards of a task's texts (a plain dataset's grade, `Verified`): one verifier
        process, taken in turns over operators; the verifiers' timeouts are evidence against the worker's."""
        async with self.turns.turn(self.trust.operator_of(worker_id)):
            rewards = await self.pool.score_many(items, processes=1)
        self.trust.count_timeouts(worker_id, sum(TIMEOUT_MARK in r.info for r in rewards))
        return rewards

    def group_buffered(self, group: ScoredGroup) -> None:
        """A group reached the buffer (a task's scored completions, or its graded episodes: the same from
        here on): its contributor is credited, and its rewards are evidence for its operator (rl/hub/trust.py)."""
        self.contributions.scored(group, self.state.batches)
        if self.trust.observe_group(group):  # quarantined: its tasks went back
            self.poke()

    # ------------------------------------------------------------------ policy

    def policy(self, version: int | None = None) -> PolicyManifest:
        """The current version's manifest (409 `no_policy` before the first publish), or `version`'s."""
        if version is None:
            return self.files.manifest(self.state.current_policy())
        return self.files.manifest_of(version, self.state.policy_version)

    def policy_file(self, version: str, name: str):
        return self.files.file(version, name, self.state.policy_version)

    async def publish(self, version: int) -> Ack:
        """The trainer wrote `version`: current from now on; recorded before the answer; old versions collected."""
        self.files.check_publishable(version)
        keep = self.state.publish(version)
        self.files.describe_base(version)  # before version 0 can be collected
        await self.write_ledger()
        self.files.collect(keep, self.cfg.weights.keep_versions)
        log.info("policy version %d published", version)
        return Ack()

    # ------------------------------------------------------------------ trainer

    async def take_batch(self, req: BatchRequest) -> bytes:
        """The batch's JSON: long-polls up to `req.timeout_s` for a full one; recorded before it is answered.

        A pull retried with the same `pull_id` (its answer was lost) gets the recorded answer again.
        """
        if self.store is not None and (again := self.store.replay(req.pull_id)) is not None:
            return again
        deadline = time.monotonic() + req.timeout_s
        stale_total = skipped_total = 0
        while True:
            self.changed.clear()
            groups, stale, skipped = self.state.take_batch(req.num_groups, req.step, req.skip_zero_variance)
            stale_total, skipped_total = stale_total + stale, skipped_total + skipped
            remaining = deadline - time.monotonic()
            if groups or remaining <= 0:
                batch = Batch.model_construct(
                    groups=groups,
                    complete=bool(groups),
                    stale_dropped=stale_total,
                    zero_variance_skipped=skipped_total,
                )
                # orjson over the dumped model: ~3x pydantic's model_dump_json on ~1 MB of packed texts
                # (docs/benchmarks.md, "A pull's stale scan, SIMD base64, orjson batches")
                body = orjson.dumps(batch.model_dump(mode="json"))
                if groups:  # consumed on disk before the trainer can have it (rl/hub/ledger.py)
                    await self.record_batch(req.pull_id, body)
                return body
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), timeout=min(remaining, 1.0))

    def status(self, who: str | None, offset: int, limit: int) -> HubStatus:
        """The hub at a glance, as the caller may see it (a worker token: its own workers only)."""
        now = time.monotonic()
        status = self.state.status(now, self.pool.metrics(), offset, limit)
        update: dict = {"weights_served": self.files.served()}
        if self.state.episodes.enabled:
            update["episodes"] = {**status.episodes, **self.runner.timings()}
        if who is None:  # stalls name paths and causes: the admin's
            update["stalls"] = [st.model_copy(update={"since_s": st.since_s + now - at})
                                for st, at in self.stalls.values()]  # fmt: skip
            update["stall_counts"] = self.all_stall_counts()
            update["stalls"] += self.waits_in_flight(now)
        status = self.contributions.annotate(status, who, self.state.workers)
        return self.trust.annotate(status, who).model_copy(update=update)

    def record_stall(self, stall: Stall) -> Ack:
        """A component reports that it stopped making progress (or, `active` False, that it goes on again)."""
        if stall.active:
            if stall.component not in self.stalls:
                self.stall_counts[metric_key(f"{stall.component} step")] += 1
            self.stalls[stall.component] = (stall, time.monotonic())
            log.warning("%s reports a stall (%.0f s): %s", stall.component, stall.since_s, stall.what)
        elif self.stalls.pop(stall.component, None) is not None:
            log.info("%s goes on again", stall.component)
        return Ack()

    def waits_in_flight(self, now: float) -> list[Stall]:
        """The hub's own waits past their expected time, and each live worker's from its last heartbeat."""
        stalls = [Stall(component="hub", what=what, since_s=s) for what, s in open_waits()]
        for worker_id, (waits, at) in list(self.worker_waits.items()):
            rec = self.state.workers.get(worker_id)
            if rec is None:  # left or dropped: its waits went with it
                del self.worker_waits[worker_id]
                continue
            stalls += [Stall(component=f"worker {rec.name}", what=w.what, since_s=w.since_s + now - at) for w in waits]
        return stalls

    def all_stall_counts(self) -> dict[str, int]:
        """Stalls so far: reported to the hub, the hub's own waits, the workers' waits (summed by what)."""
        counts = Counter(self.stall_counts)
        counts.update({f"hub_{k}": n for k, n in stall_counts().items()})
        for per_worker in self.worker_stalls.values():
            counts.update({f"worker_{metric_key(k)}": n for k, n in per_worker.items()})
        return dict(counts)

    # ------------------------------------------------------------------ contributions

    async def record_receipt(self, report: StepReceipt) -> Ack:
        """The trainer's signed receipt of a step with what it masked; stored before the answer."""
        return await self.contributions.record(report)

    def contributions_of(self, contributor: str, who: str | None, challenge: str | None, signature: str | None,
                         from_step: int = 0) -> Contributions:  # fmt: skip
        """`contributor`'s receipts (from step `from_step`) and inclusion proofs, for it (or the admin) only."""
        self.contributions.authorize(contributor, who, challenge, signature)
        return self.contributions.receipts_of(contributor, from_step)

    # ------------------------------------------------------------------ trust

    def record_provenance(self, report: ProvenanceReport) -> Ack:
        if self.trust.record(report):
            self.poke()
        return Ack()

    def quarantine(self, worker_id: str, reason: str) -> Ack:
        self.state.worker(worker_id, None)  # 404 for an unknown worker
        requeued = self.trust.quarantine(worker_id, reason)
        self.poke()
        return Ack(detail=f"{requeued} tasks re-queued")

    def release(self, worker_id: str) -> Ack:
        self.trust.release(worker_id)
        return Ack(detail="quarantine lifted")

    def revoke_token(self, token: str) -> Ack:
        """Revoke a worker token (or token id): its workers are removed and their tasks re-queued."""
        tid = self.tokens.revoke(token)
        removed, returned = self.state.remove_workers_of(tid)
        self.poke()
        log.warning("worker token %s revoked: %d workers removed, %d tasks re-queued", tid, removed, returned)
        return Ack(detail=f"{removed} workers removed, {returned} tasks re-queued")
