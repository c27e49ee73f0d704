"""A fault injected into a 2-rank `rl train` (torchrun, DeepSpeed ZeRO-2 on gloo, tiny model): rank 1 SIGSTOPped
mid-run. The step watchdog's report names rank 1 as stopped; rank 0's next collective fails at
`trainer.collective_timeout_s`, the run exits non-zero naming rank 1, and `--resume` completes the run from the
last checkpoint. docs/operations.md has the measured times.
"""

from __future__ import annotations

import contextlib
import time

import helpers.train as h
import psutil
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::FutureWarning")]

COLLECTIVE_TIMEOUT_S = 20
STEPS = 4


def _rank(torchrun_pid: int, rank: int) -> psutil.Process:
    for p in h.descendants(torchrun_pid):
        with contextlib.suppress(psutil.Error):
            if "rl.cli" in p.cmdline() and "train" in p.cmdline() and p.environ().get("RANK") == str(rank):
                return p
    raise AssertionError(f"no rank {rank} under torchrun {torchrun_pid}")


def _stall_report_naming(run_dir, pid: int) -> bool:
    """Whether a step watchdog report lists rank 1 (pid `pid`) as stopped."""
    reports = [d / "report.txt" for d in (run_dir / "logs").glob("stall-*")]
    return any(f"rank 1 (pid {pid}) is STOPPED" in r.read_text() for r in reports if r.is_file())


def test_stopped_rank_is_named_and_the_run_resumes(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    config = h.train_config(run_dir, tiny_model_dir, checkpoint={"every": 1, "keep": 2},
                            trainer={"max_steps": STEPS, "micro_batch_size": 1,
                                     "collective_timeout_s": COLLECTIVE_TIMEOUT_S},
                            watchdog={"min_stall_s": 8, "stall_factor": 2, "abort_after_s": 40,
                                      "exit_grace_s": 10})  # fmt: skip
    log = tmp_path / "train.log"
    proc = h.start_train(config, log, ranks=2)
    h.wait_for(lambda: (run_dir / "checkpoints" / "step_2").is_dir(), "the checkpoint of step 2", proc, log,
               timeout=400)  # fmt: skip
    stopped = _rank(proc.pid, 1)
    try:
        stopped.suspend()
        t0 = time.monotonic()
        h.wait_for(lambda: _stall_report_naming(run_dir, stopped.pid), "the step watchdog's report", proc, log,
                   timeout=COLLECTIVE_TIMEOUT_S + 120)  # fmt: skip
        reported = time.monotonic() - t0
        # The collective's timeout names the rank; gloo's all_reduce has been seen to outlive it (1 run of 4): then
        # the watchdog's abort (40 s later) ends the run, with the stopped rank as the cause.
        ended_by = ("ranks that stopped answering", "ending the run")
        h.wait_for(lambda: any(p in log.read_text() for p in ended_by), "rank 0 to name the stopped rank",
                   proc, log, timeout=COLLECTIVE_TIMEOUT_S + 120)  # fmt: skip
        detected = time.monotonic() - t0
        by = "the collective's timeout" if ended_by[0] in log.read_text() else "the watchdog's abort"
        code = h.finish(proc, log, timeout=180)
        ended = time.monotonic() - t0
    finally:
        with contextlib.suppress(psutil.Error):
            stopped.kill()
    text = log.read_text()
    timing = (f"rank 1 stopped: in the step watchdog's report after {reported:.1f} s (min_stall_s 8 s), named by "
              f"{by} after {detected:.1f} s (collective timeout {COLLECTIVE_TIMEOUT_S} s), the "
              f"run exited {ended:.1f} s after the stop")  # fmt: skip
    assert code != 0, f"{timing}\n{h.tail(log)}"
    named = f"rank 1 (pid {stopped.pid}, STOPPED" in text or f"rank 1 (pid {stopped.pid}) is STOPPED" in text
    assert named and "--resume" in text, f"{timing}\n{h.tail(log)}"
    assert detected < COLLECTIVE_TIMEOUT_S + 60, f"not detected within the collective timeout: {timing}"
    resumed = tmp_path / "resume.log"
    start = time.monotonic()
    code = h.run_train(config, resumed, "--resume", ranks=2, timeout=400)
    timing += f"; --resume completed the run in {time.monotonic() - start:.0f} s"
    assert code == 0, f"{timing}\n{h.tail(resumed)}"
    assert "resumed from" in resumed.read_text(), f"{timing}\n{h.tail(resumed)}"
    assert sorted(h.by_step(h.read_jsonl(run_dir / "metrics.jsonl"))) == list(range(1, STEPS + 1)), timing
    print(timing)
