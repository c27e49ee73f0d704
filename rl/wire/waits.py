"""Named waits: blocking calls in flight, reported by a daemon thread once they outlast what they asked for.

    with pending("the hub http://h:8000 to answer POST /v1/batches", expect_s=2.0):
        response = http.request(...)

Past `expect_s + SLOW_S` a warning names what is awaited, for how long and since when, and again every
`REPEAT_S` until it returns (the call's own timeout bounds it). One thread per process, started on first use.
`stall_counts()` counts the reported waits of this process by `key` (the trainer's metrics `stalls/<key>`, a
worker's heartbeats, the hub's `/v1/status` `stall_counts`).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

SLOW_S = 10.0
"""Seconds past its expected duration before a wait is reported."""
REPEAT_S = 30.0
"""Seconds between reports of the same wait."""

_lock = threading.Lock()
_open: dict[int, list] = {}  # id -> [what, started, started (wall clock), next report, key, reported]
_counts: Counter[str] = Counter()
_ids = itertools.count()
_thread: threading.Thread | None = None


@contextlib.contextmanager
def pending(what: str, expect_s: float = 0.0, key: str | None = None) -> Iterator[None]:
    """Report the wait for `what` (a phrase: "the hub ... to answer ...") if it outlasts `expect_s` + SLOW_S;
    counted under `key` (a short name, `what` if None) once reported."""
    global _thread
    ident = next(_ids)
    now = time.monotonic()
    with _lock:
        _open[ident] = [what, now, time.time(), now + expect_s + SLOW_S, metric_key(key or what), False]
        if _thread is None:
            _thread = threading.Thread(target=_watch, name="rl-waits", daemon=True)
            _thread.start()
    try:
        yield
    finally:
        with _lock:
            entry = _open.pop(ident)
        if entry[5]:  # it was reported: say that it ended
            log.warning("done waiting for %s after %.0f s", what, time.monotonic() - entry[1])


def metric_key(name: str) -> str:
    """`name` as a metric name: lower case, runs of other characters as one `_` ("hub POST /v1/x" -> hub_post_v1_x)."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")[:64] or "wait"


def count_stall(key: str) -> None:
    """Count a stall found elsewhere (the step watchdog's) with this process's reported waits."""
    with _lock:
        _counts[metric_key(key)] += 1


def stall_counts() -> dict[str, int]:
    """Waits of this process reported so far (each once, at its first report), and counted stalls, by key."""
    with _lock:
        return dict(_counts)


def open_waits() -> list[tuple[str, float]]:
    """Waits of this process in flight and already reported (past their expected time): (what, seconds so far),
    the longest first (a worker's heartbeat, the hub's `/v1/status` stalls)."""
    now = time.monotonic()
    with _lock:
        waits = [(entry[0], now - entry[1]) for entry in _open.values() if entry[5]]
    return sorted(waits, key=lambda w: -w[1])


def printable(what: str, limit: int = 300) -> str:
    """`what` as a wait's description on the wire: printable ASCII only (others as '?'), at most `limit` characters."""
    return "".join(c if " " <= c <= "~" else "?" for c in what[:limit])


def _watch() -> None:
    while True:
        time.sleep(1.0)
        now = time.monotonic()
        with _lock:
            due = [(entry[0], entry[1], entry[2]) for entry in _open.values() if now >= entry[3]]
            for entry in _open.values():
                if now >= entry[3]:
                    if not entry[5]:
                        entry[5] = True
                        _counts[entry[4]] += 1
                    entry[3] = now + REPEAT_S
        for what, started, wall in due:
            since = time.strftime("%H:%M:%S", time.localtime(wall))
            log.warning("still waiting for %s: %.0f s so far (since %s)", what, now - started, since)


def process_state(pid: int) -> str:
    """The kernel's state letter of `pid` (R running, S sleeping, D disk, T stopped, Z zombie); '?' if unknown."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "?"
