"""The hub's listening socket: bound by `rl hub` itself, or by `rl train` and inherited (no port race)."""

from __future__ import annotations

import socket


def listening_socket(host: str, port: int) -> socket.socket:
    """The hub's bound server socket (uvicorn listens on it), with TCP_NODELAY for every connection.

    Port 0: a free port the kernel picks (`sock.getsockname()[1]`). `rl train` binds it here and hands the
    socket to the hub it starts: picking a free port, closing it and letting the hub bind it seconds later
    (after its imports) let another process take the port in between (seen in a full test run).
    """
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit this. Without it (the event loop only sets it on sockets it made
    # itself) every response, written as headers then body, waited ~40 ms for the client's delayed
    # ACK (Nagle): 44 ms per request on loopback instead of ~2 ms.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock
