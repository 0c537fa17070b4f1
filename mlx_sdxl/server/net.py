"""The server's listening socket."""

from __future__ import annotations

import socket

from ..errors import InputError


def listening_socket(host: str, port: int) -> socket.socket:
    """A bound TCP socket for uvicorn (which listens on it). It has TCP_NODELAY, which the
    connections it accepts inherit: without it a keep-alive client waits about 40 ms for each
    small response (Nagle's algorithm meeting delayed ACKs), so /progress would lag."""
    name = host.strip("[]")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise InputError(f"--host {host}: not an address of this machine ({e.strerror})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock
