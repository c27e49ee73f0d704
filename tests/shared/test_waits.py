"""Named waits (rl/wire/waits.py): a call that outlasts what it expected is reported with what, how long, since
when; and a hub request's wait goes through it (rl/wire/client.py)."""

from __future__ import annotations

import logging
import re
import time

import rl.wire.waits as waits


def test_a_slow_wait_is_named_while_it_lasts_and_when_it_ends(monkeypatch, caplog):
    monkeypatch.setattr(waits, "SLOW_S", 0.5)
    with caplog.at_level(logging.WARNING, logger="rl.wire.waits"):
        with waits.pending("the hub http://h:1 to answer POST /v1/batches", expect_s=0.5):
            time.sleep(2.5)
        with waits.pending("something quick"):
            pass
    what = re.escape("the hub http://h:1 to answer POST /v1/batches")
    assert re.search(rf"still waiting for {what}: [12] s so far \(since \d\d:\d\d:\d\d\)", caplog.text), caplog.text
    assert re.search(rf"done waiting for {what} after [23] s", caplog.text), caplog.text
    assert "something quick" not in caplog.text


def test_process_state_of_this_process():
    import os

    assert waits.process_state(os.getpid()) in ("R", "S")
    assert waits.process_state(2**22 + 12345) == "?"
