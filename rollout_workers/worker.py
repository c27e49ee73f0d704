"""The rollout worker loop behind `rl rollout --hub URL --token T`.

Register, download and load the current policy, then continuous batching: a lease thread keeps
up to `max_inflight_prompts` prompts leased (POST /v1/leases), the main thread adds each to the
engine and steps it, a submit thread posts finished leases (POST /v1/rollouts). When a newer
policy is out the worker stops adding, lets the prompts in flight finish and reloads in place,
so every completion is submitted with the version that generated it. A heartbeat thread reports
the loaded version and tokens/s, and learns about new versions. SIGTERM/SIGINT: stop leasing,
finish and submit what is in flight, leave the hub (it re-queues leases not started); a second
signal interrupts at once. Exit codes: 0 clean exit (signal or --max-prompts), 1 unrecoverable
error, 2 the hub refused the token (401/403).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import queue
import re
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from rl.wire.identity import load_key
from rl.wire.packed import WIRE_ENCODINGS
from rl.wire.protocol import (
    Completion,
    Lease,
    RegisterRequest,
    RegisterResponse,
    SamplingParamsWire,
    SubmitRequest,
    TaskResult,
)
from rl.wire.waits import pending
from rollout_workers.client import AuthError, HubClient, HubError, HubUnavailable
from rollout_workers.engines import Engine, EngineSpec, make_engine
from rollout_workers.heartbeat import heartbeat_loop
from rollout_workers.in_place import DeltaPrefetch, load_in_place
from rollout_workers.pacing import Pacing, owed
from rollout_workers.signals import install_stop_handlers
from rollout_workers.weight_sync import WeightSync, WeightSyncError

log = logging.getLogger(__name__)

LEASE_WAIT_S = 2.0
"""Long poll of a lease when idle: the hub answers at once when work appears; short, so SIGTERM is prompt."""
MIN_LEASE_RETRY_S = 0.05
"""Floor of the pause after an empty lease (a hub that neither waits nor asks for a pause is not spun on)."""
IDLE_POLL_S = 0.1
"""How long the idle main loop waits for a lease before looking at policy updates and signals again."""
DRAIN_RETRY_S = 30.0
"""On the way out, how long the last submissions keep retrying an unreachable hub (the stop no longer cuts it short)."""
ENGINE_STEP_S = 60.0
"""An engine step (a decode iteration; the HF engine's whole batch) this much slower is logged as a wait."""
TOKENS_PER_S_WINDOW_S = 5.0
"""Busy seconds over which the reported tokens/s is averaged."""

EXIT_OK, EXIT_ERROR, EXIT_AUTH = 0, 1, 2


class Stopping(Exception):
    """The worker was asked to stop while it waited."""


@dataclass
class InFlight:
    """One lease whose prompts are in the engine (or waiting to go in)."""

    lease: Lease
    sampling: SamplingParamsWire
    version: int = -1
    """Policy version loaded when its prompts were added: the one that generates them."""
    started: float = 0.0
    unfinished: int = 0
    results: list[TaskResult] = field(default_factory=list)
    tokens: int = 0


class Worker:
    """One worker's state; `run()` is the loop. Built and driven by `run_worker`."""

    def __init__(
        self,
        client: HubClient,
        *,
        spec: EngineSpec = EngineSpec(),
        max_prompts: int | None = None,
        name: str | None = None,
        cache_dir: Path | None = None,
        prompts_per_lease: int = 4,
        max_inflight_prompts: int | None = None,
        weights_url: str | None = None,
        base_model: Path | None = None,
    ) -> None:
        self.client = client
        self.stop = client.stop_event
        """Set by a signal (or a fatal error): lease no more, finish what is in flight, leave."""
        self.closing = threading.Event()
        """Set once the work is drained: the background threads end."""
        self.spec = spec
        self.max_prompts = max_prompts
        self.name = name or safe_name(f"{socket.gethostname()}-{os.getpid()}")
        self.prompts_per_lease = prompts_per_lease
        self.max_inflight_prompts = max_inflight_prompts
        self.sync = WeightSync(client, cache_dir, weights_url=weights_url, base_model=base_model)
        self.prefetch = DeltaPrefetch(self.sync, client.policy)
        self.engine: Engine | None = None
        self.engine_shape: tuple[int, str] | None = None
        self.loaded_version = -1
        self.target_version = 0
        """Latest version the hub announced (register, heartbeat, lease)."""
        self.registrations_seen = 0
        self.prompts_done = 0
        self.tokens_per_s = 0.0
        self.fetch_s = 0.0
        """Seconds the last policy update took to download (and rebuild) its version."""
        self.load_s = 0.0
        """Seconds the last in-place reload took (engine start-up is not counted)."""
        self.fatal: BaseException | None = None
        self.leased: queue.Queue[InFlight] = queue.Queue()
        """Leases from the lease thread, not yet added to the engine."""
        self.inflight: dict[str, InFlight] = {}
        """Leases with prompts in the engine, by lease id (written by the main thread only)."""
        self.gone: queue.SimpleQueue[str] = queue.SimpleQueue()
        """Leases the hub no longer holds (heartbeat thread): the main thread drops their prompts."""
        self.to_submit: queue.Queue[tuple[InFlight, float] | None] = queue.Queue()
        self._count = threading.Condition()
        """Guards the two counters below; notified when prompts finish or a policy is loaded."""
        self.prompts_leased = 0
        self.prompts_unfinished = 0
        """Leased and not yet generated (queued here or in the engine): what the lease thread keeps topped up."""
        self.pacing = Pacing()
        """The tokens those prompts owe: no more leased than the worker generates before a lease expires."""
        self._window = [0, 0.0]  # tokens, busy seconds since tokens_per_s was last updated
        self._drain_deadline: float | None = None
        self._threads: list[threading.Thread] = []

    @property
    def busy(self) -> bool:
        """Prompts in the engine (read by the heartbeat thread too, hence the local copy)."""
        engine = self.engine
        return engine is not None and engine.pending > 0

    # ------------------------------------------------------------------ lifecycle

    def run(self) -> int:
        request = RegisterRequest(name=self.name, engine=self.spec.kind, tensor_parallel=self.spec.tensor_parallel,
                                  host=_host(), wire=list(WIRE_ENCODINGS))  # fmt: skip
        try:
            self.client.register(request)
            self._adopt_registration()
            for target, name in ((functools.partial(heartbeat_loop, self), "heartbeat"), (self._lease_loop, "lease"),
                                 (self._submit_loop, "submit")):  # fmt: skip
                thread = threading.Thread(target=self._guarded(target), name=name, daemon=True)
                thread.start()
                self._threads.append(thread)
            with contextlib.suppress(Stopping):
                self._loop()
            self._drain()
        except HubUnavailable:
            if not self.stop.is_set():
                raise
            log.info("stopped while waiting for the hub")
        finally:
            self.stop.set()
            self.closing.set()
            self.to_submit.put(None)
            for thread in self._threads:
                thread.join(timeout=DRAIN_RETRY_S + 5.0)
            self.client.leave()
            if self.engine is not None:
                self.engine.close()
        if self.fatal is not None:
            raise self.fatal
        log.info("worker %s done: %d prompts", self.name, self.prompts_done)
        return EXIT_OK

    def _guarded(self, loop):
        """A background thread's body: an error it cannot handle stops the worker and is re-raised by `run`."""

        def body() -> None:
            try:
                loop()
            except HubUnavailable as e:
                if not self.stop.is_set():
                    self.fail(e)
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                self.fail(e)

        return body

    def fail(self, error: BaseException) -> None:
        if self.fatal is None:
            self.fatal = error
        self.stop.set()

    def _done(self) -> bool:
        if self.fatal is not None or self.stop.is_set():
            return True
        if self.max_prompts is not None and self.prompts_done >= self.max_prompts:
            log.info("reached --max-prompts %d; leaving", self.max_prompts)
            return True
        return False

    def _wait(self, seconds: float) -> None:
        if self.stop.wait(max(0.0, seconds)):
            raise Stopping

    def _adopt_registration(self) -> None:
        """Take in a (re-)registration: its policy version, and a new model shape if the hub changed it."""
        reg: RegisterResponse = self.client.registration
        self.registrations_seen = self.client.registrations
        self.target_version = reg.policy_version
        shape = (reg.max_model_len, reg.dtype)
        if self.engine is not None and shape != self.engine_shape:
            log.warning(
                "the hub now asks for max_model_len/dtype %s (was %s); restarting the engine", shape, self.engine_shape
            )
            # The hub that changed shape forgot our leases: what is in flight can no longer be submitted.
            self.engine.abort_all()
            self._forget(list(self.inflight.values()))
            self.engine.close()
            self.engine, self.loaded_version = None, -1

    def _forget(self, leases: list[InFlight]) -> None:
        for item in leases:
            self.inflight.pop(item.lease.lease_id, None)
        with self._count:
            self.prompts_unfinished -= sum(item.unfinished for item in leases)
            self.pacing.finished(sum(owed(item.unfinished, item.sampling) for item in leases))
            self._count.notify_all()

    # ------------------------------------------------------------------ main loop

    def _loop(self) -> None:
        """Keep the engine busy with leased prompts; reload a newer policy once nothing is in flight."""
        draining = None  # the version an update waits for (logged once)
        while not self._done():
            if self.client.registrations != self.registrations_seen:
                self._adopt_registration()
            self._drop_gone()
            update = self.engine is None or self.target_version != self.loaded_version
            if update and self.busy and draining != self.target_version:
                draining = self.target_version
                log.info("policy v%d announced: finishing %d prompt(s) in flight first", draining, self.engine.pending)
                self.prefetch.start(self.loaded_version)
            if update and not self.busy:
                self._update_policy()
                with self._count:
                    self._count.notify_all()  # the lease thread may go on
                continue
            if not update:  # while an update waits, new prompts wait too (they get the new version)
                self._start_leases(block_s=0.0 if self.busy else IDLE_POLL_S)
            if self.busy:
                self._step()

    def _drop_gone(self) -> None:
        """Leases the hub re-queued (expired) or saw finished by backups: their results would be refused."""
        while not self.gone.empty():
            item = self.inflight.get(self.gone.get())
            if item is not None:  # else finished meanwhile: submitted, and the hub says what it makes of it
                prompts = self.engine.abort([(item.lease.lease_id, t.task_id) for t in item.lease.tasks])
                self._forget([item])
                log.warning("lease %s is gone at the hub (expired, or its tasks done by backups): dropped its %d "
                            "prompt(s) in flight and %d finished", item.lease.lease_id, prompts,
                            len(item.results))  # fmt: skip

    def _drain(self) -> None:
        """On the way out: finish and submit the prompts in flight (leases not started go back with `leave`)."""
        if self.fatal is not None or self.engine is None:
            return
        if self.busy:
            log.info("finishing %d prompt(s) in flight before leaving", self.engine.pending)
        while self.busy:
            self._drop_gone()
            if self.busy:
                self._step()
        self.to_submit.put(None)
        for thread in self._threads:
            if thread.name == "submit":
                thread.join()

    def _start_leases(self, block_s: float) -> None:
        """Add the prompts of every lease received so far to the engine (waiting up to `block_s` for one)."""
        try:
            item = self.leased.get(timeout=block_s) if block_s > 0 else self.leased.get_nowait()
        except queue.Empty:
            return
        while item is not None:
            self._add(item)
            try:
                item = self.leased.get_nowait()
            except queue.Empty:
                item = None

    def _add(self, item: InFlight) -> None:
        item.version, item.started = self.loaded_version, time.perf_counter()
        skipped = []
        for task in item.lease.tasks:
            seeds = task.seeds or None  # a hub without verifiable sampling sends none
            if self.engine.add((item.lease.lease_id, task.task_id), task.prompt_token_ids, item.sampling, seeds):
                item.unfinished += 1
            else:
                log.warning("task %d leaves no room for a completion (prompt too long?); not submitted", task.task_id)
                skipped.append(task)
        self.inflight[item.lease.lease_id] = item
        if skipped:
            self._finished(item, len(skipped), owed(len(skipped), item.sampling))

    def _step(self) -> None:
        start = time.perf_counter()
        with pending(f"the engine to finish a generation step ({self.engine.pending} prompts in flight)",
                     expect_s=ENGINE_STEP_S, key="engine step"):  # fmt: skip
            finished = self.engine.step()
        tokens = paid = 0
        for (lease_id, task_id), completions in finished:
            item = self.inflight[lease_id]
            item.unfinished -= 1
            paid += owed(1, item.sampling)
            completions = [_clamped(c) for c in completions]
            count = sum(len(c.token_ids) for c in completions)
            item.tokens += count
            tokens += count
            cached = self.engine.cached_prompt_tokens.pop((lease_id, task_id), 0)
            if completions:
                item.results.append(TaskResult(task_id=task_id, completions=completions, cached_prompt_tokens=cached))
            if item.unfinished == 0:
                self._lease_done(item)
        self._count_tokens(tokens, time.perf_counter() - start)
        if finished:
            self._finished(None, len(finished), paid)

    def _finished(self, item: InFlight | None, prompts: int, tokens_owed: int) -> None:
        with self._count:
            self.prompts_unfinished -= prompts
            self.pacing.finished(tokens_owed)
            self._count.notify_all()
        if item is not None and item.unfinished == 0:
            self._lease_done(item)

    def _lease_done(self, item: InFlight) -> None:
        self.inflight.pop(item.lease.lease_id, None)
        self.prompts_done += len(item.lease.tasks)
        seconds = time.perf_counter() - item.started
        lease = item.lease
        log.info("lease %s: %d prompts, %d tokens in %.1f s (v%d)", lease.lease_id, len(lease.tasks), item.tokens,
                 seconds, item.version)  # fmt: skip
        if lease.expires_in_s and seconds > lease.expires_in_s:
            log.warning("generation took %.0f s, longer than the lease (%.0f s)", seconds, lease.expires_in_s)
        if item.results:
            self.to_submit.put((item, seconds))

    def _count_tokens(self, tokens: int, seconds: float) -> None:
        self._window[0] += tokens
        self._window[1] += seconds
        if self._window[1] >= TOKENS_PER_S_WINDOW_S or (self.tokens_per_s == 0.0 and tokens):
            self.tokens_per_s = self._window[0] / max(self._window[1], 1e-9)
            self._window = [0, 0.0]

    # ------------------------------------------------------------------ policy

    def _update_policy(self) -> None:
        """Download the hub's latest version and load it (engine start on the first one). Needs an idle engine."""
        manifest = self.client.policy()  # 503 until a first version is published: retried
        if self.engine is not None and manifest.version == self.loaded_version:
            # Nothing newer yet (e.g. a lease asked for a version still being published): pause briefly.
            if self.target_version != manifest.version:
                self.target_version = manifest.version
                self._wait(0.5)
            return
        self.target_version = manifest.version
        held, prefetched = self.loaded_version, self.prefetch.take(manifest.version, self.loaded_version)
        if self.engine is not None and (took := load_in_place(self.engine, self.sync, manifest, held, prefetched)):
            (self.fetch_s, self.load_s), self.loaded_version = took, manifest.version
            log.info("applied policy v%d in place (fetch %.2f s, apply %.2f s)", manifest.version, *took)
            return
        start = time.perf_counter()
        local = self.sync.fetch(manifest)
        loaded = time.perf_counter()
        self.fetch_s = loaded - start
        reg = self.client.registration
        if self.engine is None:
            log.info("starting %s engine for policy v%d (%s)", self.spec.kind, local.version, local.model_dir)
            self.engine = make_engine(self.spec, local.model_dir, max_model_len=reg.max_model_len, dtype=reg.dtype)
            self.engine_shape = (reg.max_model_len, reg.dtype)
        else:
            self.engine.load_weights(local.weight_files)
            self.load_s = time.perf_counter() - loaded
        self.loaded_version = local.version
        log.info("loaded policy v%d (fetch %.2f s, load %.2f s)", local.version, self.fetch_s, self.load_s)
        self.sync.prune(keep={local.version})

    # ------------------------------------------------------------------ leasing (lease thread)

    def inflight_target(self) -> int:
        """Prompts to keep leased and unfinished: what the engine runs side by side, plus one lease waiting."""
        if self.max_inflight_prompts is not None:
            return self.max_inflight_prompts
        n = self.client.registration.sampling.n
        return self.engine.concurrency(n) + self.prompts_per_lease

    def _may_lease(self) -> bool:
        """Lease only with a loaded, current policy and room under the in-flight target and --max-prompts."""
        if self.stop.is_set() or self.engine is None or self.target_version != self.loaded_version:
            return False
        if self.max_prompts is not None and self.prompts_leased >= self.max_prompts:
            return False
        unfinished = self.prompts_unfinished  # idle: always (whatever the pacing's count says)
        return unfinished < self.inflight_target() and (unfinished == 0 or self.pacing.room(self.tokens_per_s))

    def _lease_loop(self) -> None:
        while not self.stop.is_set():
            with self._count:
                if not self._may_lease():
                    self._count.wait(timeout=0.5)
                    continue
                idle = self.prompts_unfinished == 0
                want = self.prompts_per_lease
                if self.max_prompts is not None:
                    want = min(want, self.max_prompts - self.prompts_leased)
            version = self.loaded_version
            pause = self._lease_once(version, want, LEASE_WAIT_S if idle else 0.0)
            if pause:
                self.stop.wait(pause)

    def _lease_once(self, version: int, want: int, wait_s: float) -> float:
        """One lease request; returns how long to pause before the next."""
        try:
            lease = self.client.lease(version, want, wait_s=wait_s)
        except HubError as e:
            if isinstance(e, AuthError):
                raise
            log.warning("lease refused: %s", e)
            self.target_version = -1  # re-read the hub's version before asking again
            return 1.0
        if lease.lease_id is None:
            if lease.min_policy_version > version:
                log.info("the hub needs policy >= v%d (have v%d); updating", lease.min_policy_version, version)
                self.target_version = max(self.target_version, lease.min_policy_version)
                return 0.0
            log.debug("no work (%s); retrying in %.1f s", lease.reason or "queue empty", lease.retry_after_s)
            return max(lease.retry_after_s, MIN_LEASE_RETRY_S)
        if not lease.tasks:
            return 0.0
        sampling = lease.sampling or self.client.registration.sampling
        with self._count:
            self.prompts_leased += len(lease.tasks)
            self.prompts_unfinished += len(lease.tasks)
            self.pacing.leased(lease, sampling)
        self.leased.put(InFlight(lease, sampling))
        return 0.0

    # ------------------------------------------------------------------ submitting (submit thread)

    def _submit_loop(self) -> None:
        while (job := self.to_submit.get()) is not None:
            if self.fatal is not None:
                log.warning("not submitting lease %s: the worker is failing", job[0].lease.lease_id)
                continue
            self._submit(*job)

    def _submit(self, item: InFlight, seconds: float) -> None:
        request = SubmitRequest(
            worker_id=self.client.worker_id,
            lease_id=item.lease.lease_id,
            policy_version=item.version,
            results=item.results,
            gen_seconds=seconds,
        )
        try:
            try:
                answer = self.client.submit(request)
            except HubUnavailable:
                if not self.stop.is_set():
                    raise
                # Leaving: the stop ended the retries; these results were generated, so keep trying a while
                # (DRAIN_RETRY_S for all the last submissions together, not each).
                if self._drain_deadline is None:
                    self._drain_deadline = time.monotonic() + DRAIN_RETRY_S
                left = self._drain_deadline - time.monotonic()
                if left <= 0:
                    raise
                answer = self.client.submit(request, max_retry_s=left, stoppable=False)
        except AuthError:
            raise
        except (HubError, HubUnavailable) as e:
            log.warning("submission for lease %s rejected: %s", item.lease.lease_id, e)
            return
        if answer.duplicates:
            log.info("lease %s: tasks %s were already accepted", item.lease.lease_id, answer.duplicates)


def _clamped(completion: Completion) -> Completion:
    """log_softmax can round to a hair above 0; the hub rejects positive logprobs."""
    if all(lp <= 0.0 for lp in completion.logprobs):
        return completion
    return completion.model_copy(update={"logprobs": [min(lp, 0.0) for lp in completion.logprobs]})


def _host() -> str:
    try:
        import torch

        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except Exception:
        device = "?"
    return re.sub(r"[^\x20-\x7e]", "?", f"{socket.gethostname()} ({device})")[:256]


def safe_name(name: str) -> str:
    """`name` in the hub's worker-name alphabet (rl.wire.protocol.SAFE_NAME): other characters become `-`."""
    return re.sub(r"[^A-Za-z0-9._:@+-]", "-", name)[:64] or "worker"


def run_worker(
    hub: str,
    token: str,
    *,
    spec: EngineSpec = EngineSpec(),
    max_prompts: int | None = None,
    name: str | None = None,
    cache_dir: Path | None = None,
    prompts_per_lease: int = 4,
    max_inflight_prompts: int | None = None,
    max_retry_s: float | None = None,
    weights_url: str | None = None,
    base_model: Path | None = None,
    identity: Path | None = None,
) -> int:
    """Join the hub at `hub` as a rollout worker until stopped; returns the process exit code.

    `spec`: how to build the engine. `max_inflight_prompts`: prompts to keep leased and unfinished
    (None: what the engine runs side by side, plus one lease). `max_retry_s`: how long to keep retrying an
    unreachable hub (None: for ever).
    `weights_url`: an HTTP cache or mirror of the hub's `/v1/blobs/` to fetch policy files from first.
    `base_model`: a local directory with the run's base model: matching base shards are not downloaded.
    `identity`: a contributor key file (`rl identity new`): the work is credited to it, not to the token.
    """
    stop = threading.Event()
    previous = install_stop_handlers(stop)
    key = load_key(identity) if identity is not None else None
    client = HubClient(hub, token, identity=key, stop_event=stop, max_retry_s=max_retry_s)
    worker = Worker(
        client,
        spec=spec,
        max_prompts=max_prompts,
        name=name,
        cache_dir=cache_dir,
        prompts_per_lease=prompts_per_lease,
        max_inflight_prompts=max_inflight_prompts,
        weights_url=weights_url,
        base_model=base_model,
    )
    try:
        return worker.run()
    except AuthError as e:
        log.error("the hub at %s refused the token (%d %s): check --token / RL_HUB_TOKEN", hub, e.status, e.reason)
        return EXIT_AUTH
    except HubUnavailable as e:
        log.error("giving up: %s", e)
        return EXIT_ERROR
    except (HubError, WeightSyncError) as e:
        log.error("unrecoverable error: %s", e)
        return EXIT_ERROR
    except Exception:
        log.exception("worker crashed")
        return EXIT_ERROR
    finally:
        client.close()
        for sig, old in (previous or {}).items():
            signal.signal(sig, old)
