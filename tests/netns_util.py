"""Network namespaces for multi-process tests: N isolated hosts on one private bridge.

:class:`NetnsLab` creates, for one test, a namespace per host, each with ``lo`` up and one veth
(``eth0``, ``10.231.S.(i+2)/24``) into a Linux bridge that lives in a namespace of its own, so
the root namespace's firewall never sees (or filters) the bridged traffic. With ``host_link`` the
root namespace gets one more veth into the bridge (``10.231.S.1``), so the test process can poll
every host directly. The third octet ``S`` is picked at random among subnets the root namespace
does not route yet, and every name carries a random suffix, so concurrent labs never collide.

``cut(a, b)`` partitions two groups of hosts with nftables ``drop`` rules inside the hosts'
namespaces (a dropped packet is silence, as on a real partition, not a fast RST); the host link
is never cut. ``heal()`` removes the rules. ``rate`` applies a ``tbf`` limit on both directions of
every host link (``tc netem`` is not assumed to exist).

Trade-off: this needs root, ``ip``, ``tc`` and ``nft``; :func:`require_netns` turns their absence
into a clean ``pytest.skip`` on a developer's machine, and into a failure under ``CI=true``, where
``.ci/run`` has installed them and a skip would hide a test that never ran. Everything is torn
down in ``__exit__`` and, should the test process die first, by an ``atexit`` hook.
"""

from __future__ import annotations

import atexit
import ipaddress
import os
import secrets
import shutil
import subprocess
from collections.abc import Sequence
from typing import Any

import pytest

_TABLE = "p2pdl_partition"
_PREFIX = "10.231"


def netns_unavailable() -> str | None:
    """Why namespaces cannot be used here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "nft", "tc"):
        if shutil.which(tool) is None:
            return f"'{tool}' is not installed (packages iproute2, nftables)"
    return None


def missing_prerequisite(reason: str) -> None:
    """Skip with ``reason``; under ``CI=true`` fail instead: CI must run every test."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true and a prerequisite is missing: {reason}")
    pytest.skip(reason)


def require_netns() -> None:
    """Skip (fail under CI) with the reason when namespaces cannot be used on this machine."""
    reason = netns_unavailable()
    if reason is not None:
        missing_prerequisite(reason)


def _ip(*args: str, input_text: str | None = None) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, input=input_text, timeout=30)


def run_in_ns(ns: str, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[Any]:
    """Start ``argv`` inside namespace ``ns``. ``ip netns exec`` execs it: the pid is the command's."""
    return subprocess.Popen(["ip", "netns", "exec", ns, *argv], **popen_kwargs)


def check_in_ns(ns: str, argv: Sequence[str], timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` inside ``ns`` to completion and return its output (raises on failure)."""
    return subprocess.run(
        ["ip", "netns", "exec", ns, *argv], check=True, capture_output=True, text=True, timeout=timeout
    )


def _free_subnet() -> int:
    """A third octet for 10.231.S.0/24 that no route in the root namespace overlaps."""
    routes = subprocess.run(["ip", "-4", "route", "show", "table", "all"], capture_output=True, text=True).stdout
    used = []
    for line in routes.splitlines():
        token = line.split()[0] if line.split() else ""
        if token in ("local", "broadcast", "unreachable", "blackhole", "prohibit") and len(line.split()) > 1:
            token = line.split()[1]
        try:
            used.append(ipaddress.ip_network(token, strict=False))
        except ValueError:
            continue
    candidates = list(range(1, 255))
    secrets.SystemRandom().shuffle(candidates)
    for octet in candidates:
        net = ipaddress.ip_network(f"{_PREFIX}.{octet}.0/24")
        if not any(net.overlaps(u) and u.prefixlen > 0 for u in used):
            return octet
    raise RuntimeError(f"no free /24 under {_PREFIX}.0.0/16")


class NetnsLab:
    """``count`` hosts (namespaces) on one bridge. Use as a context manager.

    Attributes after ``__enter__``: ``names[i]`` (the namespace of host i), ``addresses[i]``
    (its IPv4 address) and ``host_address`` (the root namespace's address on the bridge, or None).
    """

    def __init__(self, count: int, *, rate: str | None = None, host_link: bool = True) -> None:
        if count < 1:
            raise ValueError("a lab needs at least one host")
        self.count = count
        self.rate = rate  # tbf rate, e.g. "100mbit"; None: unlimited
        self.host_link = host_link
        suffix = secrets.token_hex(3)
        self.bridge_ns = f"p2pdl-{suffix}-br"
        self.names = [f"p2pdl-{suffix}-h{i}" for i in range(count)]
        self._host_veth = f"p2pdl{suffix}"  # root-namespace side of the host link (<= 15 chars)
        self.addresses: list[str] = []
        self.host_address: str | None = None
        self._created: list[str] = []
        self._cut: set[int] = set()
        self._closed = False

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> NetnsLab:
        require_netns()
        atexit.register(self.close)
        try:
            self._build()
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, RuntimeError) as exc:
            self.close()
            detail = getattr(exc, "stderr", "") or str(exc)
            missing_prerequisite(f"cannot build network namespaces here: {detail.strip()}")
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _add_ns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._created.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def _build(self) -> None:
        octet = _free_subnet()
        self.addresses = [f"{_PREFIX}.{octet}.{i + 2}" for i in range(self.count)]
        self._add_ns(self.bridge_ns)
        br = self.bridge_ns
        _ip("-n", br, "link", "add", "br0", "type", "bridge")
        _ip("-n", br, "link", "set", "br0", "up")
        for index, (ns, address) in enumerate(zip(self.names, self.addresses, strict=True)):
            self._add_ns(ns)
            port = f"port{index}"
            _ip("-n", br, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("-n", br, "link", "set", port, "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            if self.rate is not None:
                tbf = ["tbf", "rate", self.rate, "burst", "256kb", "latency", "100ms"]
                for where, dev in ((ns, "eth0"), (br, port)):
                    subprocess.run(
                        ["tc", "-n", where, "qdisc", "add", "dev", dev, "root", *tbf],
                        check=True,
                        capture_output=True,
                        text=True,
                        timeout=30,
                    )
        if self.host_link:
            self.host_address = f"{_PREFIX}.{octet}.1"
            _ip("link", "add", self._host_veth, "type", "veth", "peer", "name", "host", "netns", br)
            _ip("-n", br, "link", "set", "host", "master", "br0", "up")
            _ip("addr", "add", f"{self.host_address}/24", "dev", self._host_veth)
            _ip("link", "set", self._host_veth, "up")

    def close(self) -> None:
        """Delete every namespace (and with them every veth, bridge and rule). Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.host_link:
            subprocess.run(["ip", "link", "del", self._host_veth], capture_output=True, timeout=30)
        for name in reversed(self._created):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
        self._created.clear()
        atexit.unregister(self.close)

    # ------------------------------------------------------------------ partitions

    def cut(self, side_a: Sequence[int], side_b: Sequence[int]) -> None:
        """Drop every packet between hosts of ``side_a`` and hosts of ``side_b`` (both ways)."""
        if set(side_a) & set(side_b):
            raise ValueError("the two sides of a cut must be disjoint")
        for mine, theirs in ((side_a, side_b), (side_b, side_a)):
            others = ", ".join(self.addresses[i] for i in theirs)
            for index in mine:
                if index in self._cut:
                    check_in_ns(self.names[index], ["nft", "delete", "table", "inet", _TABLE])
                rules = (
                    f"table inet {_TABLE} {{\n"
                    "  chain input { type filter hook input priority 0; policy accept;\n"
                    f"    ip saddr {{ {others} }} drop\n  }}\n"
                    "  chain output { type filter hook output priority 0; policy accept;\n"
                    f"    ip daddr {{ {others} }} drop\n  }}\n"
                    "}\n"
                )
                subprocess.run(
                    ["ip", "netns", "exec", self.names[index], "nft", "-f", "-"],
                    input=rules,
                    check=True,
                    capture_output=True,
                    text=True,
                    timeout=30,
                )
                self._cut.add(index)

    def heal(self) -> None:
        """Remove every cut made by :meth:`cut`."""
        for index in sorted(self._cut):
            check_in_ns(self.names[index], ["nft", "delete", "table", "inet", _TABLE])
        self._cut.clear()

    def can_connect(self, source: int, target: int, port: int, timeout: float = 1.0) -> bool:
        """Does a TCP connect from host ``source`` to ``target:port`` succeed (or get refused)?"""
        probe = (
            "import socket,sys\n"
            "s=socket.socket(); s.settimeout(float(sys.argv[3]))\n"
            "try:\n s.connect((sys.argv[1], int(sys.argv[2])))\n"
            "except ConnectionRefusedError: pass\n"
            "except OSError: sys.exit(1)\n"
        )
        argv = ["python3", "-c", probe, self.addresses[target], str(port), str(timeout)]
        result = subprocess.run(
            ["ip", "netns", "exec", self.names[source], *argv], capture_output=True, timeout=timeout + 30
        )
        return result.returncode == 0
