"""What the transport counts, and the throttle that keeps refusals from flooding the log.

Every refusal (a frame, a credential, a connection) is counted here and served by ``/status``;
the log gets at most one line per key per :data:`LOG_INTERVAL` seconds, so a hostile or broken
client costs a counter increment per attempt, never a log line each.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Final

LOG_INTERVAL: Final = 10.0  # seconds between repeated warnings about the same kind of refusal


@dataclass
class TransportStats:
    """Counters served by ``/status`` and written to the metrics. Bytes are wire bytes."""

    bytes_sent: int = 0
    bytes_received: int = 0
    frames_sent: int = 0
    frames_received: int = 0
    stream_frames_sent: int = 0  # of frames_sent: frames that went over a frame stream
    stream_frames_received: int = 0  # of frames_received: frames that came over a frame stream
    frames_rejected: Counter[str] = field(default_factory=Counter)
    auth_rejected: Counter[str] = field(default_factory=Counter)
    connections_refused: int = 0
    connections_timed_out: int = 0
    bad_requests: int = 0  # HTTP requests aiohttp could not parse (answered 400 when still possible)

    def as_dict(self) -> dict[str, Any]:
        return {
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "frames_sent": self.frames_sent,
            "frames_received": self.frames_received,
            "stream_frames_sent": self.stream_frames_sent,
            "stream_frames_received": self.stream_frames_received,
            "frames_rejected": {
                "total": sum(self.frames_rejected.values()),
                "by_reason": dict(self.frames_rejected),
            },
            "auth_rejected": {"total": sum(self.auth_rejected.values()), "by_reason": dict(self.auth_rejected)},
            "connections_refused": self.connections_refused,
            "connections_timed_out": self.connections_timed_out,
            "bad_requests": self.bad_requests,
        }


class LogThrottle:
    """Says whether a warning keyed by ``key`` may be logged now: at most once per ``interval`` seconds."""

    def __init__(self, interval: float = LOG_INTERVAL) -> None:
        self.interval = interval  # seconds
        self._last: dict[str, float] = {}

    def allow(self, key: str) -> bool:
        now = time.monotonic()
        if now - self._last.get(key, -self.interval) < self.interval:
            return False
        if len(self._last) >= 4096:  # keys may come from the network: keep the table bounded
            self._last.clear()
        self._last[key] = now
        return True
