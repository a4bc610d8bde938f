"""Loopback ports for test services."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A 127.0.0.1 port nobody listens on right now (bound and released): for a service to take, or to be
    the address of an unreachable peer."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
