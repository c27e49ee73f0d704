"""Stalls the trainer's step watchdog reports reach `/v1/status` (admin only) and `rl status`, and leave when a
step completes again; stalls are counted (the trainer's own, the workers' waits from their heartbeats); the
watchdog's own report path is in tests/trainer/test_watchdog.py."""

from __future__ import annotations

from helpers.hub import WORKER, LiveHub, live_config, publish_initial_policy
from rich.console import Console

from rl.cli.status_view import render
from rl.config import WatchdogConfig
from rl.rundir import RunDir
from rl.trainer.loop import StopRequest
from rl.trainer.watchdog import StepWatchdog
from rl.wire.protocol import HeartbeatRequest, HubStatus, RegisterRequest, WaitingFor
from rl.wire.waits import stall_counts
from rollout_workers.client import HubClient


def test_a_stall_is_listed_by_rl_status_until_a_step_completes(tmp_path, tiny_model_dir):
    publish_initial_policy(tmp_path, tiny_model_dir)
    with LiveHub(live_config(tmp_path, tiny_model_dir)) as live, live.admin() as admin:
        dog = StepWatchdog(WatchdogConfig(min_stall_s=1, abort_after_s=0), RunDir(tmp_path), StopRequest(), admin,
                           list, step=4, heartbeat_s=1.0, resume_hint="rl train run.yaml --resume")  # fmt: skip
        try:
            live.wait_for(lambda: live.status().stalls, timeout=30, what="the stall in /v1/status")
            (stall,) = live.status().stalls
            assert stall.component == "trainer" and stall.since_s >= 1.0 and stall.report == str(dog.last_report)
            assert "waiting for start-up" in stall.what and "likely cause" in stall.what
            console = Console(width=400, record=True)
            console.print(render(live.status()))
            assert "STALLED: trainer" in console.export_text()
            assert live.status().stall_counts["trainer_step"] == 1 and stall_counts()["trainer_step"] >= 1
            with HubClient(live.url, WORKER) as worker:  # a worker's waits reach the counts with its heartbeat
                worker.register(RegisterRequest(name="counted"))
                worker.heartbeat(HeartbeatRequest(policy_version=0, stalls={"hub_post_v1_rollouts": 2}))
                assert live.status().stall_counts["worker_hub_post_v1_rollouts"] == 2
                console = Console(width=400, record=True)
                console.print(render(live.status()))
                assert "worker_hub_post_v1_rollouts 2" in console.export_text()
                worker.heartbeat(HeartbeatRequest(policy_version=0, waiting=[  # a wait in flight is listed live
                    WaitingFor(what="the engine to finish a step [red]x[/red]", since_s=75)]))  # fmt: skip
                (waiting,) = [s for s in live.status().stalls if s.component == "worker counted"]
                assert waiting.since_s >= 75 and waiting.what.startswith("the engine")
                console = Console(width=400, record=True)
                console.print(render(live.status()))
                text = console.export_text()
                assert "waiting: worker counted" in text
                assert "the engine to finish a step [red]x[/red]" in text  # printed as sent, not as markup
                worker.heartbeat(HeartbeatRequest(policy_version=0))  # the wait ended
                assert not [s for s in live.status().stalls if s.component == "worker counted"]
                seen = worker.call("GET", "/v1/status", HubStatus)  # a worker token sees no stall (paths, causes)
                assert seen.stalls == [] and seen.stall_counts == {}
            dog.step_done(5)
            live.wait_for(lambda: not live.status().stalls, timeout=30, what="the stall to clear")
        finally:
            dog.close()
