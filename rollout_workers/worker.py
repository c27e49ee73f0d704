"""The rollout worker loop behind `rl rollout --hub URL --token T`.

    register -> download + load the current policy -> loop:
        newer policy announced?  download it, reload in place (between batches)
        POST /v1/leases          long poll (`wait_s`); no work: pause `retry_after_s`; too old: update first
        generate n per task      (vLLM or HF engine)
        POST /v1/rollouts        a 4xx (stale/expired lease, ...) is logged, the loop goes on

A heartbeat thread reports the loaded version, tokens/s and whether the worker
is busy, and learns about new versions from the answers. SIGTERM/SIGINT finish
the current batch, leave the hub (DELETE /v1/workers/{id}: it re-queues our
leases) and return 0; a second signal interrupts at once. Hub restarts are
ridden out by the client (retries, automatic re-registration).

Exit codes: 0 clean exit (signal or --max-prompts), 1 unrecoverable error,
2 the hub refused the token (401/403).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path

from rl.protocol import (
    Completion,
    HeartbeatRequest,
    Lease,
    RegisterRequest,
    RegisterResponse,
    SubmitRequest,
    TaskResult,
)
from rollout_workers.client import AuthError, HubClient, HubError, HubUnavailable
from rollout_workers.engines import Engine, EngineSpec, make_engine
from rollout_workers.weight_sync import WeightSync, WeightSyncError

log = logging.getLogger(__name__)

LEASE_WAIT_S = 2.0
"""Long poll of a lease: the hub answers at once when work appears; short, so SIGTERM is prompt."""
MIN_LEASE_RETRY_S = 0.05
"""Floor of the pause after an empty lease (a hub that neither waits nor asks for a pause is not spun on)."""

EXIT_OK, EXIT_ERROR, EXIT_AUTH = 0, 1, 2


class Stopping(Exception):
    """The worker was asked to stop while it waited."""


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
        weights_url: str | None = None,
        base_model: Path | None = None,
    ) -> None:
        self.client = client
        self.stop = client.stop_event
        self.spec = spec
        self.max_prompts = max_prompts
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.prompts_per_lease = prompts_per_lease
        self.sync = WeightSync(client, cache_dir, weights_url=weights_url, base_model=base_model)
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
        self.busy = False
        self.fatal: BaseException | None = None
        self._heartbeat: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def run(self) -> int:
        request = RegisterRequest(
            name=self.name, engine=self.spec.kind, tensor_parallel=self.spec.tensor_parallel, host=_host()
        )
        try:
            self.client.register(request)
            self._adopt_registration()
            self._heartbeat = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
            self._heartbeat.start()
            while not self._done():
                if self.client.registrations != self.registrations_seen:
                    self._adopt_registration()
                if self.engine is None or self.target_version != self.loaded_version:
                    self._update_policy()
                    continue
                self._lease_and_generate()
        except Stopping:
            pass
        except HubUnavailable:
            if not self.stop.is_set():
                raise
            log.info("stopped while waiting for the hub")
        finally:
            self.stop.set()
            if self._heartbeat is not None:
                self._heartbeat.join(timeout=5.0)
            self.client.leave()
            if self.engine is not None:
                self.engine.close()
        if self.fatal is not None:
            raise self.fatal
        log.info("worker %s done: %d prompts", self.name, self.prompts_done)
        return EXIT_OK

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
            self.engine.close()
            self.engine, self.loaded_version = None, -1

    # ------------------------------------------------------------------ policy

    def _update_policy(self) -> None:
        """Download the hub's latest version and load it (engine start on the first one)."""
        manifest = self.client.policy()  # 503 until a first version is published: retried
        if self.engine is not None and manifest.version == self.loaded_version:
            # Nothing newer yet (e.g. a lease asked for a version still being published): pause briefly.
            if self.target_version != manifest.version:
                self.target_version = manifest.version
                self._wait(0.5)
            return
        self.target_version = manifest.version
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

    # ------------------------------------------------------------------ work

    def _lease_and_generate(self) -> None:
        want = self.prompts_per_lease
        if self.max_prompts is not None:
            want = min(want, self.max_prompts - self.prompts_done)
        try:
            lease = self.client.lease(self.loaded_version, want, wait_s=LEASE_WAIT_S)
        except HubError as e:
            if isinstance(e, AuthError):
                raise
            log.warning("lease refused: %s", e)
            self._wait(1.0)
            self.target_version = -1  # re-read the hub's version before asking again
            return
        if lease.lease_id is None:
            if lease.min_policy_version > self.loaded_version:
                log.info(
                    "the hub needs policy >= v%d (have v%d); updating", lease.min_policy_version, self.loaded_version
                )
                self.target_version = max(self.target_version, lease.min_policy_version)
                return
            log.debug("no work (%s); retrying in %.1f s", lease.reason or "queue empty", lease.retry_after_s)
            self._wait(max(lease.retry_after_s, MIN_LEASE_RETRY_S))
            return
        if not lease.tasks:
            return
        results, tokens, seconds = self._generate(lease)
        self.prompts_done += len(lease.tasks)
        if seconds > 0:
            self.tokens_per_s = tokens / seconds
        log.info(
            "lease %s: %d prompts, %d tokens in %.1f s (%.0f tokens/s)",
            lease.lease_id,
            len(lease.tasks),
            tokens,
            seconds,
            self.tokens_per_s,
        )
        if lease.expires_in_s and seconds > lease.expires_in_s:
            log.warning("generation took %.0f s, longer than the lease (%.0f s)", seconds, lease.expires_in_s)
        if results:
            self._submit(lease, results, seconds)

    def _generate(self, lease: Lease) -> tuple[list[TaskResult], int, float]:
        sampling = lease.sampling or self.client.registration.sampling
        self.busy = True
        start = time.perf_counter()
        try:
            outputs = self.engine.generate([t.prompt_token_ids for t in lease.tasks], sampling)
        finally:
            self.busy = False
        seconds = time.perf_counter() - start
        results, tokens = [], 0
        for task, completions in zip(lease.tasks, outputs, strict=True):
            if not completions:
                log.warning("task %d produced no completions (prompt too long?); not submitted", task.task_id)
                continue
            completions = [_clamped(c) for c in completions]
            tokens += sum(len(c.token_ids) for c in completions)
            results.append(TaskResult(task_id=task.task_id, completions=completions))
        return results, tokens, seconds

    def _submit(self, lease: Lease, results: list[TaskResult], seconds: float) -> None:
        request = SubmitRequest(
            worker_id=self.client.worker_id,
            lease_id=lease.lease_id,
            policy_version=self.loaded_version,
            results=results,
            gen_seconds=seconds,
        )
        try:
            answer = self.client.submit(request)
        except AuthError:
            raise
        except (HubError, HubUnavailable) as e:
            log.warning("submission for lease %s rejected: %s", lease.lease_id, e)
            return
        if answer.duplicates:
            log.info("lease %s: tasks %s were already accepted", lease.lease_id, answer.duplicates)

    # ------------------------------------------------------------------ heartbeat

    def _heartbeat_loop(self) -> None:
        interval = self.client.registration.heartbeat_interval_s
        while not self.stop.wait(interval):
            beat = HeartbeatRequest(
                policy_version=max(-1, self.loaded_version),
                tokens_per_s=self.tokens_per_s,
                busy=self.busy,
                fetch_s=self.fetch_s,
                load_s=self.load_s,
            )
            try:
                answer = self.client.heartbeat(beat)
            except AuthError as e:
                self.fatal = e
                self.stop.set()
                return
            except (HubError, HubUnavailable) as e:
                if not self.stop.is_set():
                    log.warning("heartbeat failed: %s", e)
                continue
            except Exception:  # keep beating: a dead heartbeat gets the worker dropped
                log.exception("heartbeat failed")
                continue
            if answer.policy_version != self.target_version and answer.policy_version != self.loaded_version:
                log.info("hub announced policy v%d", answer.policy_version)
            self.target_version = answer.policy_version
            interval = self.client.registration.heartbeat_interval_s


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
    return f"{socket.gethostname()} ({device})"[:256]


def _install_signal_handlers(stop: threading.Event) -> dict[int, object] | None:
    """First SIGTERM/SIGINT: stop after the current batch. Second: default behaviour (interrupt now)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = {}

    def handler(signum: int, _frame: object) -> None:
        log.info("%s received: finishing the current batch, then leaving", signal.Signals(signum).name)
        stop.set()
        for sig, old in previous.items():
            signal.signal(sig, old)

    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, handler)
    return previous


def run_worker(
    hub: str,
    token: str,
    *,
    spec: EngineSpec = EngineSpec(),
    max_prompts: int | None = None,
    name: str | None = None,
    cache_dir: Path | None = None,
    prompts_per_lease: int = 4,
    max_retry_s: float | None = None,
    weights_url: str | None = None,
    base_model: Path | None = None,
) -> int:
    """Join the hub at `hub` as a rollout worker until stopped; returns the process exit code.

    `spec`: how to build the engine. `max_retry_s`: how long to keep retrying an unreachable hub
    (None: for ever).
    `weights_url`: an HTTP cache or mirror of the hub's `/v1/blobs/` to fetch policy files from first.
    `base_model`: a local directory with the run's base model: matching base shards are not downloaded.
    """
    stop = threading.Event()
    previous = _install_signal_handlers(stop)
    client = HubClient(hub, token, stop_event=stop, max_retry_s=max_retry_s)
    worker = Worker(
        client,
        spec=spec,
        max_prompts=max_prompts,
        name=name,
        cache_dir=cache_dir,
        prompts_per_lease=prompts_per_lease,
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
