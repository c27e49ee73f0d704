"""The step watchdog (rl/trainer/watchdog.py) on its own: limits, a stall report with stacks, the end of the run;
the run-level faults are in tests/e2e/test_faults.py."""

from __future__ import annotations

import logging
import time

from rl.config import WatchdogConfig
from rl.rundir import RunDir
from rl.trainer.loop import StopRequest
from rl.trainer.watchdog import EXIT_STALLED, StepWatchdog, hub_view, stall_cause
from rl.wire.protocol import HubStatus, WorkersSummary, WorkerStatus


def _watchdog(tmp_path, **cfg) -> tuple[StepWatchdog, StopRequest]:
    stop = StopRequest()
    dog = StepWatchdog(WatchdogConfig(**cfg), RunDir(tmp_path), stop, None, list, step=0, heartbeat_s=1.0,
                       resume_hint="rl train run.yaml --resume")  # fmt: skip
    return dog, stop


def test_limit_is_a_multiple_of_the_median_step_with_a_floor(tmp_path):
    dog, _ = _watchdog(tmp_path, min_stall_s=5, stall_factor=4, abort_after_s=0)
    try:
        assert dog.limit() == 5  # no step yet: the floor
        for step in range(1, 5):  # the first interval (start-up) is not a step time
            dog._last -= 3.0
            dog.step_done(step)
        assert 11.9 < dog.limit() < 12.1  # 4 x the 3 s median
    finally:
        dog.close()


def test_stall_is_reported_with_stacks_then_the_run_is_ended(tmp_path, caplog):
    dog, stop = _watchdog(tmp_path, min_stall_s=1, abort_after_s=1, exit_grace_s=60)
    try:
        with caplog.at_level(logging.ERROR, logger="rl.trainer.watchdog"):
            deadline = time.monotonic() + 30
            while stop.reason is None and time.monotonic() < deadline:
                time.sleep(0.1)
    finally:
        dog.close()  # before exit_grace_s: the watchdog does not exit the process
    assert stop.exit_code == EXIT_STALLED and stop.reason.startswith("stalled: no step for"), stop.reason
    (stall,) = (tmp_path / "logs").glob("stall-*")
    assert dog.stalls == 1 and dog.last_report == stall
    stacks = (stall / "trainer.txt").read_text()
    assert "rl-step-watchdog" in stacks and "test_stall_is_reported_with_stacks_then_the_run_is_ended" in stacks
    assert "no step completed" in (stall / "report.txt").read_text()
    assert "No checkpoint yet" in caplog.text and "ending the run (exit 3)" in caplog.text


def test_a_step_after_a_stall_lets_the_run_go_on(tmp_path, caplog):
    dog, stop = _watchdog(tmp_path, min_stall_s=1, abort_after_s=0)
    try:
        deadline = time.monotonic() + 30
        while dog.stalls == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        with caplog.at_level(logging.WARNING, logger="rl.trainer.watchdog"):
            dog.step_done(1)
    finally:
        dog.close()
    assert dog.stalls == 1 and stop.reason is None
    assert "step 1 completed" in caplog.text and "the run goes on" in caplog.text


def _status(**kw) -> HubStatus:
    base = dict(policy_version=3, workers=[], queued=0, leased=0, scoring=0, buffered=0, consumed=0, batches=0,
                rejections={}, staleness_histogram={}, stale_dropped=0, zero_variance_skipped=0, submissions=0,
                tokens_generated=0, uptime_s=1.0, worker_summary=WorkersSummary(total=1))  # fmt: skip
    return HubStatus(**(base | kw))


def test_causes_name_the_stuck_part():
    url = "http://hub:8000"
    assert "does not answer" in stall_cause(None, url, 5.0)
    failing = _status(scoring_failures=9, scoring_dropped=3, last_scoring_error="task 4 (attempt 3/3): boom")
    assert "scoring failed 9 times, 3 tasks dropped, last: task 4 (attempt 3/3): boom" in hub_view(failing)
    assert "scoring fails on the hub" in stall_cause(failing, url, 5.0)
    assert "no rollout worker" in stall_cause(_status(worker_summary=WorkersSummary(total=0)), url, 5.0)
    silent = WorkerStatus(worker_id="w-1", name="gpu-7", engine="vllm", policy_version=2, tokens_per_s=0.0,
                          last_seen_s=40.0, leased_tasks=4, completed_tasks=0)  # fmt: skip
    assert "gpu-7 (w-1) silent 40 s holding 4 tasks" in stall_cause(_status(workers=[silent], leased=4), url, 5.0)
