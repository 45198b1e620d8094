"""free_ports: distinct ports, each one bindable right after the call."""

from __future__ import annotations

import socket

from p2pdl.net.ports import free_ports


def test_free_ports_are_distinct_and_bindable() -> None:
    ports = free_ports(16)
    assert len(set(ports)) == 16
    held = []
    try:
        for port in ports:
            probe = socket.socket()
            held.append(probe)
            probe.bind(("127.0.0.1", port))
    finally:
        for probe in held:
            probe.close()
