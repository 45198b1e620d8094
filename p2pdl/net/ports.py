"""Free TCP ports for peers started together on one machine (tests, benchmarks, local clusters).

A port is free only at the moment it is probed: another process may take it before the peer binds.
The probes are held open together, so one call never returns the same port twice.
"""

from __future__ import annotations

import socket

__all__ = ["free_ports"]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports that were free on ``host`` a moment ago (the OS picks them)."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            probe = socket.socket()
            sockets.append(probe)
            probe.bind((host, 0))
        return [int(probe.getsockname()[1]) for probe in sockets]
    finally:
        for probe in sockets:
            probe.close()
