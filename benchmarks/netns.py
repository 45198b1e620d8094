#!/usr/bin/env python3
"""A private, rate-limited LAN of network namespaces for benchmarks (Linux, root).

    with NetnsLan(8, rate_mbit=100) as lan:
        proc = lan.popen(0, ["python", "-m", "p2pdl.cli", "peer", ...])  # runs inside namespace 0
        print(lan.addresses)  # ['10.232.0.1', ..., '10.232.0.8']

    python benchmarks/netns.py --peers 2 --rate-mbit 100   # self-check: measures the link rate

:class:`NetnsLan` creates ``count`` namespaces, each with a veth pair whose outer end is a port
of one bridge in the root namespace; the inner end is called ``eth0`` in every namespace (so
``GLOO_SOCKET_IFNAME=eth0`` works everywhere) and gets ``10.232.0.(i+1)/24`` by default. With
``rate_mbit`` set, a ``tbf`` qdisc limits both directions of every peer's link: egress of the
inner ``eth0`` is the peer's upload, egress of the outer (bridge-side) end is its download, so
a peer that talks to seven others still shares one 100 Mbit/s link, as on a real LAN. The root
namespace has no address on the bridge: nothing here can reach or be reached from outside.

Trade-offs: ``tbf`` gives a rate and a bounded queue (``latency_ms``), not delay or loss (this
kernel has no ``netem``); the burst is 10 ms at the configured rate (at least 16 KiB), so short
messages see no extra delay but a multi-megabyte frame goes at the rate. Byte counters come from
the outer veth ends, so they include TCP/IP headers and retransmissions that an application's
own counters do not.

Names carry a random tag and the creating process id (``p2pdlnb-TAG-PID-I``, bridge
``p2pdlbTAG``). Teardown runs in ``__exit__`` even on failure and collects every error; on
entry, namespaces and bridges of this prefix whose creator is no longer alive are removed, so a
run that was SIGKILLed leaves nothing behind for long. Other prefixes are never touched.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

PREFIX = "p2pdlnb"  # namespaces: p2pdlnb-TAG-PID-I
BRIDGE_PREFIX = "p2pdlb"  # bridge: p2pdlbTAG (interface names are at most 15 characters)
VETH_PREFIX = "p2pdlv"  # outer veth ends: p2pdlvTAGI
INNER_IFNAME = "eth0"
DEFAULT_SUBNET = "10.232.0.0/24"
_NAMESPACE_RE = re.compile(rf"^{PREFIX}-([0-9a-f]{{6}})-(\d+)-(\d+)$")


class NetnsError(RuntimeError):
    """A namespace, link or qdisc could not be set up (the message has the failing command)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def _tc(*args: str) -> None:
    result = subprocess.run(["tc", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise NetnsError(f"tc {' '.join(args)}: {result.stderr.strip()}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def list_namespaces() -> list[str]:
    result = _ip("netns", "list", check=False)
    return [line.split()[0] for line in result.stdout.splitlines() if line.strip()]


def cleanup_stale(prefix_re: re.Pattern[str] = _NAMESPACE_RE) -> list[str]:
    """Delete this module's namespaces (and their bridges) whose creating process has exited."""
    removed = []
    stale_tags = set()
    for name in list_namespaces():
        match = prefix_re.match(name)
        if match and not _pid_alive(int(match.group(2))):
            _ip("netns", "delete", name, check=False)  # deleting it deletes its veth pair too
            stale_tags.add(match.group(1))
            removed.append(name)
    live_tags = {m.group(1) for m in map(prefix_re.match, list_namespaces()) if m}
    links = _ip("-o", "link", "show", "type", "bridge", check=False).stdout
    for tag in re.findall(rf"\d+: {BRIDGE_PREFIX}([0-9a-f]{{6}})[:@]", links):
        if tag not in live_tags:
            _ip("link", "delete", f"{BRIDGE_PREFIX}{tag}", check=False)
            removed.append(f"{BRIDGE_PREFIX}{tag}")
    return removed


class NetnsLan:
    """``count`` namespaces on one bridge, optionally rate-limited by tbf in both directions."""

    def __init__(
        self,
        count: int,
        *,
        rate_mbit: float | None = None,
        subnet: str = DEFAULT_SUBNET,
        latency_ms: float = 50.0,
    ) -> None:
        network = ipaddress.ip_network(subnet)
        if not 1 <= count <= min(99, network.num_addresses - 2):
            raise ValueError(f"count must be in 1..{min(99, network.num_addresses - 2)} for {subnet}, got {count}")
        if rate_mbit is not None and rate_mbit <= 0:
            raise ValueError(f"rate_mbit must be > 0, got {rate_mbit}")
        self.count = count
        self.rate_mbit = rate_mbit
        self.latency_ms = latency_ms
        self.prefixlen = network.prefixlen
        self.tag = secrets.token_hex(3)
        self.bridge = f"{BRIDGE_PREFIX}{self.tag}"
        self.namespaces = [f"{PREFIX}-{self.tag}-{os.getpid()}-{i}" for i in range(count)]
        self.outer_links = [f"{VETH_PREFIX}{self.tag}{i}" for i in range(count)]
        hosts = network.hosts()
        self.addresses = [str(next(hosts)) for _ in range(count)]
        self._created: list[tuple[str, str]] = []  # ("netns" | "link", name), in creation order

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> NetnsLan:
        if os.geteuid() != 0:
            raise NetnsError("network namespaces need root")
        cleanup_stale()
        try:
            self._setup()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        errors = self.teardown()
        if errors and exc is None:
            raise NetnsError("teardown failed: " + "; ".join(errors))

    def _setup(self) -> None:
        # nf_call_iptables 0: host firewall rules for bridged traffic (br_netfilter) stay out of
        # this private LAN, for this bridge only; the host's sysctls are left alone.
        _ip("link", "add", self.bridge, "type", "bridge", "stp_state", "0", "nf_call_iptables", "0")
        self._created.append(("link", self.bridge))
        _ip("link", "set", self.bridge, "up")
        for namespace, outer, address in zip(self.namespaces, self.outer_links, self.addresses, strict=True):
            _ip("netns", "add", namespace)
            self._created.append(("netns", namespace))
            inner = f"{outer}i"  # renamed to eth0 once inside the namespace
            _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            self._created.append(("link", outer))
            _ip("link", "set", inner, "netns", namespace)
            _ip("link", "set", outer, "master", self.bridge)
            _ip("link", "set", outer, "up")
            _ip("-n", namespace, "link", "set", inner, "name", INNER_IFNAME)
            _ip("-n", namespace, "addr", "add", f"{address}/{self.prefixlen}", "dev", INNER_IFNAME)
            _ip("-n", namespace, "link", "set", INNER_IFNAME, "up")
            _ip("-n", namespace, "link", "set", "lo", "up")
            if self.rate_mbit is not None:
                self._limit(["ip", "netns", "exec", namespace], INNER_IFNAME)  # upload
                self._limit([], outer)  # download
        self._wait_forwarding()

    def _limit(self, prefix: list[str], device: str) -> None:
        assert self.rate_mbit is not None
        rate_bytes = self.rate_mbit * 1e6 / 8
        burst = max(16 * 1024, int(rate_bytes * 0.010))
        command = [
            *prefix, "tc", "qdisc", "replace", "dev", device, "root", "tbf",
            "rate", f"{self.rate_mbit}mbit", "burst", str(burst), "latency", f"{self.latency_ms}ms",
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise NetnsError(f"{' '.join(command)}: {result.stderr.strip()}")

    def _wait_forwarding(self, timeout: float = 10.0) -> None:
        """Bridge ports may start in a learning state; wait until every port forwards (state 3)."""
        deadline = time.monotonic() + timeout
        states = [Path("/sys/class/net") / outer / "brport" / "state" for outer in self.outer_links]
        while not all(path.read_text().strip() == "3" for path in states):
            if time.monotonic() > deadline:
                raise NetnsError(f"bridge {self.bridge} ports not forwarding after {timeout}s")
            time.sleep(0.1)

    def teardown(self) -> list[str]:
        """Delete what was created, newest first; return the errors instead of stopping at one."""
        errors = []
        while self._created:
            kind, name = self._created.pop()
            if kind == "netns":
                result = _ip("netns", "delete", name, check=False)
            else:
                result = _ip("link", "delete", name, check=False)
                if "Cannot find device" in result.stderr:
                    continue  # a veth goes away with its namespace
            if result.returncode != 0:
                errors.append(f"{kind} {name}: {result.stderr.strip()}")
        return errors

    # ------------------------------------------------------------------ use

    def prefix(self, index: int) -> list[str]:
        """The command prefix that runs a program inside namespace ``index``."""
        return ["ip", "netns", "exec", self.namespaces[index]]

    def popen(self, index: int, command: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen([*self.prefix(index), *command], **kwargs)

    def run(self, index: int, command: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        return subprocess.run([*self.prefix(index), *command], **kwargs)

    def counters(self) -> list[dict[str, int]]:
        """Per namespace: ``sent``/``received`` bytes on its link (from the bridge side, so headers count)."""
        out = []
        for outer in self.outer_links:
            stats = Path("/sys/class/net") / outer / "statistics"
            # The outer end receives what the namespace sends, and transmits what it receives.
            out.append(
                {
                    "sent": int((stats / "rx_bytes").read_text()),
                    "received": int((stats / "tx_bytes").read_text()),
                }
            )
        return out


# --------------------------------------------------------------------------- self-check

_SINK = """
import socket, sys, time
server = socket.create_server((sys.argv[1], 5201))
conn, _ = server.accept()
total, started = 0, None
while chunk := conn.recv(1 << 20):
    started = started or time.perf_counter()
    total += len(chunk)
print(total * 8 / (time.perf_counter() - started) / 1e6)
"""
_SOURCE = """
import socket, sys, time
for _ in range(50):
    try:
        conn = socket.create_connection((sys.argv[1], 5201), timeout=1)
        break
    except OSError:
        time.sleep(0.1)
payload, deadline = bytes(1 << 20), time.perf_counter() + float(sys.argv[2])
while time.perf_counter() < deadline:
    conn.sendall(payload)
conn.close()
"""


def measure_mbit(lan: NetnsLan, source: int, sink: int, seconds: float = 3.0) -> float:
    """TCP goodput in Mbit/s from namespace ``source`` to namespace ``sink``."""
    receiver = lan.popen(sink, [sys.executable, "-c", _SINK, lan.addresses[sink]], stdout=subprocess.PIPE)
    try:
        lan.run(source, [sys.executable, "-c", _SOURCE, lan.addresses[sink], str(seconds)], check=True, timeout=60)
        output, _ = receiver.communicate(timeout=30)
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait()
    return float(output)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, default=2)
    parser.add_argument("--rate-mbit", type=float, default=100.0)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--cleanup", action="store_true", help="only remove stale namespaces of dead runs")
    args = parser.parse_args(argv)
    if args.cleanup:
        print("removed:", cleanup_stale() or "nothing")
        return 0
    with NetnsLan(args.peers, rate_mbit=args.rate_mbit) as lan:
        print(f"namespaces {lan.namespaces[0]}..{lan.namespaces[-1]} on {lan.bridge}, {lan.addresses}")
        one_way = measure_mbit(lan, 0, 1, args.seconds)
        print(f"ns0 -> ns1: {one_way:.1f} Mbit/s (limit {args.rate_mbit})")
        back = measure_mbit(lan, 1, 0, args.seconds)
        print(f"ns1 -> ns0: {back:.1f} Mbit/s")
        print("link counters (bytes):", lan.counters()[:2])
    print("torn down:", [n for n in list_namespaces() if n.startswith(f"{PREFIX}-{lan.tag}")] or "all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
