"""Named waits: blocking calls in flight, reported by a daemon thread once they outlast what they asked for.

    with pending("the hub http://h:8000 to answer POST /v1/batches", expect_s=2.0):
        response = http.request(...)

Past `expect_s + SLOW_S` a warning names what is awaited, for how long and since when, and again every
`REPEAT_S` until it returns (the call's own timeout bounds it). One thread per process, started on first use.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

SLOW_S = 10.0
"""Seconds past its expected duration before a wait is reported."""
REPEAT_S = 30.0
"""Seconds between reports of the same wait."""

_lock = threading.Lock()
_open: dict[int, list] = {}  # id -> [what, started (monotonic), started (wall clock), next report (monotonic)]
_ids = itertools.count()
_thread: threading.Thread | None = None


@contextlib.contextmanager
def pending(what: str, expect_s: float = 0.0) -> Iterator[None]:
    """Report the wait for `what` (a phrase: "the hub ... to answer ...") if it outlasts `expect_s` + SLOW_S."""
    global _thread
    key = next(_ids)
    now = time.monotonic()
    with _lock:
        _open[key] = [what, now, time.time(), now + expect_s + SLOW_S]
        if _thread is None:
            _thread = threading.Thread(target=_watch, name="rl-waits", daemon=True)
            _thread.start()
    try:
        yield
    finally:
        with _lock:
            entry = _open.pop(key)
        if entry[3] > entry[1] + expect_s + SLOW_S:  # it was reported: say that it ended
            log.warning("done waiting for %s after %.0f s", what, time.monotonic() - entry[1])


def _watch() -> None:
    while True:
        time.sleep(1.0)
        now = time.monotonic()
        with _lock:
            due = [(entry[0], entry[1], entry[2]) for entry in _open.values() if now >= entry[3]]
            for entry in _open.values():
                if now >= entry[3]:
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
