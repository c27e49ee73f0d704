"""`rl train` binds the hub's port itself and hands the socket to the hub (rl/hub/listen.py): no other process can
take the port between choosing it and the hub's start, which once failed a full test run (`Address already in
use` from a hub whose free port was picked seconds earlier). Real processes and sockets."""

from __future__ import annotations

import errno
import socket
import sys
import textwrap
import time
from types import SimpleNamespace

import pytest

from rl.cli.children import Child, LaunchError
from rl.cli.launcher import Launch
from rl.hub.listen import listening_socket

SERVER = textwrap.dedent("""
    import socket, sys
    sock = socket.socket(fileno=int(sys.argv[1]))
    sock.listen()
    conn, _ = sock.accept()
    conn.sendall(b"served on the inherited socket")
    conn.close()
""")


def test_a_child_serves_on_the_socket_bound_for_it_and_the_port_stays_taken(tmp_path):
    reserved = listening_socket("127.0.0.1", 0)
    port, fd = reserved.getsockname()[1], reserved.fileno()
    child = Child("server", [sys.executable, "-c", SERVER, str(fd)], {}, tmp_path / "server.log", pass_fds=(fd,))
    reserved.close()  # as `rl train` does once the hub is started: the child holds the port alone
    try:
        intruder = socket.socket()
        with pytest.raises(OSError) as taken:
            intruder.bind(("127.0.0.1", port))
        intruder.close()
        assert taken.value.errno == errno.EADDRINUSE
        deadline = time.monotonic() + 60
        while True:  # refused until the child listens (its interpreter starting), as a hub's port is
            try:
                conn = socket.create_connection(("127.0.0.1", port), timeout=30)
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline and child.proc.poll() is None, (tmp_path / "server.log").read_text()
                time.sleep(0.1)
        with conn:
            conn.settimeout(30)
            assert conn.recv(100) == b"served on the inherited socket"
        assert child.proc.wait(30) == 0, (tmp_path / "server.log").read_text()
    finally:
        child.proc.kill()
        child.log_file.close()


def test_a_fixed_hub_port_in_use_is_a_clear_launch_error():
    busy = listening_socket("127.0.0.1", 0)
    busy.listen()
    port = busy.getsockname()[1]
    launch = SimpleNamespace(cfg=SimpleNamespace(hub=SimpleNamespace(host="127.0.0.1")))
    try:
        with pytest.raises(LaunchError, match=f"cannot listen on 127.0.0.1:{port} for the hub: Address already in use"):
            Launch._bind_hub_port(launch, port)
    finally:
        busy.close()
    assert Launch._bind_hub_port(launch, port) == port  # free again: bound for the hub
    launch._hub_sock.close()
