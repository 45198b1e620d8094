"""Deadlines from measurements: a phi-accrual failure detector and an adaptive round deadline.

Pure arithmetic over observed durations, no clock and no I/O: callers pass the times in.

*Failure detection* (Hayashibara et al. 2004, "The phi accrual failure detector", as in Akka and
Cassandra). Per member, a sliding window of heartbeat inter-arrival times gives a mean and a
standard deviation; after ``t`` seconds of silence the suspicion level is
``phi(t) = -log10(P(next heartbeat later than t))`` under a normal model of the intervals. A
member is dead when ``phi`` reaches a threshold, i.e. after :func:`silence_for_phi` seconds of
silence. The normal tail uses the logistic approximation Akka uses, which has a closed form and
is monotone, so the silence at which ``phi`` crosses a threshold is found by bisection.

Trade-off: a regular sender is declared dead soon after its rhythm breaks, an irregular one (a
busy machine, a loaded event loop) only after proportionally longer. The standard deviation is
never taken below :data:`MIN_STD_FRACTION` of the mean, so a window that happened to be very
regular does not make the detector hair-triggered; callers clamp the result between a floor and
a ceiling (the configured constants), so an empty or poisoned window can never make detection
faster than the floor or slower than the ceiling.

*Round deadline.* A round waits ``margin`` times a high quantile of the recent round durations,
clamped to ``[floor, ceiling]``: a healthy swarm gives up on a frozen partner after a few
typical rounds instead of the full configured timeout, and a slow swarm (big model, busy
machine) gets the longer wait it has shown it needs. With too few observations the deadline
is the ceiling, today's fixed timeout.
"""

from __future__ import annotations

import math
from collections import deque

MIN_STD_FRACTION = 0.25  # the spread assumed is at least a quarter of the mean interval
MIN_SAMPLES = 4  # fewer intervals than this: no estimate, the caller falls back to its ceiling
WINDOW = 100  # intervals kept per member (Akka's and Cassandra's default window is 100 to 1000)


def phi(silence: float, mean: float, std: float) -> float:
    """Suspicion after ``silence`` seconds given intervals of this ``mean`` and ``std`` (seconds).

    0 means "no reason to suspect", 1 a 10 % chance the member is still alive and only late,
    ``k`` a 10**-k chance. Uses the logistic approximation of the normal tail (Akka).
    """
    if std <= 0 or mean <= 0:
        raise ValueError(f"phi needs a positive mean and std, got mean={mean}, std={std}")
    y = (silence - mean) / std
    exponent = -y * (1.5976 + 0.070566 * y * y)
    if exponent > 700:  # far below the mean: P(later) is 1, phi is 0
        return 0.0
    if exponent < -700:  # far beyond: P(later) underflows; phi grows with y, keep it finite
        return -exponent / math.log(10)
    e = math.exp(exponent)
    p_later = e / (1.0 + e) if silence > mean else 1.0 - 1.0 / (1.0 + e)
    return -math.log10(max(p_later, 1e-300))


def silence_for_phi(threshold: float, mean: float, std: float) -> float:
    """The silence (seconds) at which :func:`phi` reaches ``threshold`` (> 0)."""
    if threshold <= 0:
        raise ValueError(f"phi threshold must be > 0, got {threshold}")
    low, high = 0.0, mean + std
    while phi(high, mean, std) < threshold:
        high *= 2.0
    for _ in range(60):  # bisection to well below a millisecond for any sane interval
        middle = (low + high) / 2
        if phi(middle, mean, std) < threshold:
            low = middle
        else:
            high = middle
    return high


OUTAGE_RECUR = 20  # an outage within this many arrivals of the last one left out is kept


class ArrivalWindow:
    """The last :data:`WINDOW` heartbeat inter-arrival times of one member (seconds).

    ``clip``: intervals longer than this are recorded as this long. One long gap (a stall while
    the receiver started up) says no more about the rhythm than a gap of the floor does, and
    unclipped it would keep the detector lax for the next hundred heartbeats. None: no clipping.

    A gap that the caller calls an *outage* (the member was dead here for part of it) is left out
    when it is the only one among the last :data:`OUTAGE_RECUR` arrivals: even clipped to the
    floor, one freeze in a short window (a member restarted a minute ago) lifted its limit from
    5 s to 7-8 s in the chaos benchmark, so the members that had failed once were detected
    slowest. An outage that recurs is kept (clipped): a live member on a loaded machine that
    stalls past its limit every few beats looks the same as a freeze to the detector, and its
    limit must still grow, or it would be declared dead at every stall.
    """

    def __init__(self, size: int = WINDOW, clip: float | None = None) -> None:
        self._intervals: deque[float] = deque(maxlen=size)
        self._last: float | None = None
        self._clip = clip
        self._since_outage: int | None = None  # arrivals since the last outage left out

    def __len__(self) -> int:
        return len(self._intervals)

    def arrived(self, at: float, *, outage: bool = False) -> None:
        """A fresh heartbeat at local time ``at``; the gap since the previous one is a sample,
        unless ``outage`` and no other outage came in the last :data:`OUTAGE_RECUR` arrivals."""
        if self._last is not None and at > self._last:
            gap = at - self._last
            lone = outage and (self._since_outage is None or self._since_outage >= OUTAGE_RECUR)
            if self._since_outage is not None:
                self._since_outage += 1
            if lone:
                self._since_outage = 0
            else:
                self._intervals.append(gap if self._clip is None else min(gap, self._clip))
        self._last = at

    def forget_last(self) -> None:
        """The next gap is no sample (e.g. this process itself was paused, so it spans the pause)."""
        self._last = None

    def mean_std(self) -> tuple[float, float] | None:
        """Mean and standard deviation of the window, the latter floored; None before MIN_SAMPLES."""
        count = len(self._intervals)
        if count < MIN_SAMPLES:
            return None
        mean = sum(self._intervals) / count
        variance = sum((x - mean) ** 2 for x in self._intervals) / count
        return mean, max(math.sqrt(variance), MIN_STD_FRACTION * mean, 1e-3)

    def dead_after(self, threshold: float, floor: float, ceiling: float) -> float:
        """The silence after which this member is dead: phi reaches ``threshold``, clamped."""
        estimate = self.mean_std()
        if estimate is None:
            return ceiling
        return min(ceiling, max(floor, silence_for_phi(threshold, *estimate)))


def quantile(values: list[float], q: float) -> float:
    """The ``q``-quantile (0..1) of ``values`` by linear interpolation; ``values`` non-empty."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


class RoundDeadline:
    """How long the next round waits: ``margin`` x the ``q``-quantile of recent rounds, clamped.

    Args:
        floor: never wait less than this (seconds).
        ceiling: never wait more (seconds): the configured ``round_timeout``.
        margin: multiplier on the quantile.
        q: the quantile of the window, in (0, 1].
        size: rounds remembered.
    """

    def __init__(self, *, floor: float, ceiling: float, margin: float, q: float = 0.9, size: int = 50) -> None:
        if not 0 < floor <= ceiling:
            raise ValueError(f"round deadline needs 0 < floor <= ceiling, got floor={floor}, ceiling={ceiling}")
        if margin < 1 or not 0 < q <= 1:
            raise ValueError(f"round deadline needs margin >= 1 and q in (0, 1], got {margin}, {q}")
        self.floor, self.ceiling, self.margin, self.q = floor, ceiling, margin, q
        self._seconds: deque[float] = deque(maxlen=size)

    def observe(self, seconds: float) -> None:
        """A round took ``seconds`` (a round that hit its deadline counts with what it waited)."""
        if math.isfinite(seconds) and seconds >= 0:
            self._seconds.append(seconds)

    def deadline(self) -> float:
        if len(self._seconds) < MIN_SAMPLES:
            return self.ceiling
        return min(self.ceiling, max(self.floor, self.margin * quantile(list(self._seconds), self.q)))
