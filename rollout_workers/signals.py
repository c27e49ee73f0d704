"""The worker's signals: the first SIGTERM/SIGINT drains (finish and submit what is in flight), a second interrupts."""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger(__name__)


def install_stop_handlers(stop: threading.Event) -> dict[int, object] | None:
    """First SIGTERM/SIGINT: stop after the prompts in flight. Second: default behaviour (interrupt now)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = {}

    def handler(signum: int, _frame: object) -> None:
        log.info("%s received: finishing the prompts in flight, then leaving", signal.Signals(signum).name)
        stop.set()
        for sig, old in previous.items():
            signal.signal(sig, old)

    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, handler)
    return previous
