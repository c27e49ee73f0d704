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
    assert waits.stall_counts()["the_hub_http_h_1_to_answer_post_v1_batches"] == 1  # counted once, at its report
    assert "something_quick" not in waits.stall_counts()


def test_process_state_of_this_process():
    import os

    assert waits.process_state(os.getpid()) in ("R", "S")
    assert waits.process_state(2**22 + 12345) == "?"


def test_a_hub_request_is_counted_by_route(monkeypatch):
    """A hub that accepts the connection and never answers: the read timeout bounds the wait, which is reported
    and counted under its route (no worker id in the key)."""
    import socket

    import pytest

    from rl.wire.client import HubHTTP, HubUnavailable

    monkeypatch.setattr(waits, "SLOW_S", 0.2)
    with socket.socket() as server:  # accepts the connection, never answers
        server.bind(("127.0.0.1", 0))
        server.listen()
        url = f"http://127.0.0.1:{server.getsockname()[1]}"
        with HubHTTP(url, "tok", timeout_s=2.5, max_retry_s=0.0) as client, pytest.raises(HubUnavailable):
            client.send("POST", "/v1/workers/w-123/heartbeat")
    assert waits.stall_counts()["hub_post_v1_workers_heartbeat"] >= 1


def test_waits_in_flight_are_listed_once_reported(monkeypatch):
    """`open_waits` lists a wait only past its expected time (what a heartbeat sends to `rl status`), the longest
    first; a description goes on the wire as printable ASCII."""
    import threading

    monkeypatch.setattr(waits, "SLOW_S", 0.3)
    release = threading.Event()

    def wait(what: str, expect_s: float) -> None:
        with waits.pending(what, expect_s=expect_s):
            release.wait(10)

    threads = [threading.Thread(target=wait, args=a) for a in (("a slow engine step", 0.0), ("a patient one", 60))]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 10
        while not waits.open_waits() and time.monotonic() < deadline:
            time.sleep(0.1)
        listed = waits.open_waits()
        assert [what for what, _ in listed] == ["a slow engine step"], listed
        assert listed[0][1] >= 0.3
    finally:
        release.set()
        for t in threads:
            t.join()
    assert waits.open_waits() == []
    assert waits.printable("hub\x1b[2J\nbad" + "x" * 400) == "hub?[2J?bad" + "x" * 289
