"""A worker's heartbeat thread: what it tells the hub every `heartbeat_interval_s`, and what it learns back.

It reports the loaded version, speed, weight-update times, its waits and the leases it is generating; the
answer announces the latest version and names the leases the hub no longer holds (expired and re-queued,
or finished by backup leases), which the main loop then drops from the engine (`Worker._drop_gone`).
"""

from __future__ import annotations

import logging
from typing import Any

from rl.wire.base import MAX_TASKS
from rl.wire.protocol import HeartbeatRequest, WaitingFor
from rl.wire.waits import open_waits, printable, stall_counts
from rollout_workers.client import AuthError, HubError, HubUnavailable

log = logging.getLogger("rollout_workers.worker")


def heartbeat_loop(worker: Any) -> None:
    """Until the worker closes: `worker` is a `rollout_workers.worker.Worker` (not imported here: no import circle)."""
    interval = worker.client.registration.heartbeat_interval_s
    while not worker.closing.wait(interval):
        beat = HeartbeatRequest(
            policy_version=max(-1, worker.loaded_version),
            tokens_per_s=worker.tokens_per_s,
            busy=worker.busy,
            fetch_s=worker.fetch_s,
            load_s=worker.load_s,
            stalls=dict(list(stall_counts().items())[:32]),
            waiting=[WaitingFor(what=printable(what), since_s=s) for what, s in open_waits()[:8]],
            leases=list(worker.inflight)[:MAX_TASKS],  # a copy made holding the GIL: safe beside the main thread
        )
        try:
            answer = worker.client.heartbeat(beat)
        except AuthError as e:
            worker.fail(e)
            return
        except (HubError, HubUnavailable) as e:
            if not worker.stop.is_set():
                log.warning("heartbeat failed: %s", e)
            continue
        except Exception:  # keep beating: a dead heartbeat gets the worker dropped
            log.exception("heartbeat failed")
            continue
        if answer.policy_version != worker.target_version and answer.policy_version != worker.loaded_version:
            log.info("hub announced policy v%d", answer.policy_version)
        worker.target_version = answer.policy_version
        for lease_id in answer.gone:
            worker.gone.put(lease_id)
        interval = worker.client.registration.heartbeat_interval_s
