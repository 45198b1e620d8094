"""The phi-accrual failure detector, the adaptive round deadline and the view's use of them (pure, no sockets)."""

from __future__ import annotations

import itertools
import random

import pytest

from p2pdl.config import MembershipConfig, StrategyConfig
from p2pdl.core.deadline import ArrivalWindow, RoundDeadline, phi, silence_for_phi
from p2pdl.errors import ConfigError
from p2pdl.membership.view import Member, MembershipView, Timing

FLOOR, CEILING, THRESHOLD = 5.0, 20.0, 8.0


def jittered_window(mean: float, jitter: float, count: int = 100, seed: int = 0) -> tuple[ArrivalWindow, float]:
    rng = random.Random(seed)
    window, at = ArrivalWindow(), 0.0
    for _ in range(count):
        at += mean + rng.uniform(-jitter, jitter)
        window.arrived(at)
    return window, at


def test_phi_is_low_while_heartbeats_come_with_jitter() -> None:
    window, _ = jittered_window(1.0, 0.3)
    estimate = window.mean_std()
    assert estimate is not None
    mean, std = estimate
    # Every gap the sender actually produced keeps phi far below the threshold.
    assert phi(1.3, mean, std) < 1.0
    assert phi(0.5, mean, std) < 0.1


def test_phi_rises_monotonically_with_silence() -> None:
    values = [phi(t / 10, 1.0, 0.25) for t in range(0, 200)]
    assert all(b >= a for a, b in itertools.pairwise(values))
    assert values[-1] > 30


def test_silence_for_phi_inverts_phi() -> None:
    for threshold in (1.0, 3.0, 8.0, 16.0):
        t = silence_for_phi(threshold, 1.0, 0.25)
        assert phi(t, 1.0, 0.25) == pytest.approx(threshold, rel=1e-3)
        assert phi(t * 0.99, 1.0, 0.25) < threshold


def test_silence_is_declared_dead_within_a_bounded_multiple_of_the_mean_interval() -> None:
    window, _ = jittered_window(1.0, 0.3)
    raw = window.dead_after(THRESHOLD, 0.0 + 1e-9, 1e9)  # unclamped
    # Normal tail at phi 8 is ~5.6 std; std is at least mean / 4 and here about 0.17.
    assert 1.5 <= raw <= 4.0, raw
    assert window.dead_after(THRESHOLD, FLOOR, CEILING) == FLOOR  # the floor holds


def test_irregular_heartbeats_get_a_longer_limit_but_never_past_the_ceiling() -> None:
    regular, _ = jittered_window(1.0, 0.05)
    busy, _ = jittered_window(2.0, 1.9)
    assert busy.dead_after(THRESHOLD, 0.1, 1e9) > regular.dead_after(THRESHOLD, 0.1, 1e9)
    slow, _ = jittered_window(10.0, 5.0)
    assert slow.dead_after(THRESHOLD, FLOOR, CEILING) == CEILING


def test_one_long_gap_is_clipped_and_does_not_make_the_detector_lax() -> None:
    clipped, unclipped = ArrivalWindow(clip=FLOOR), ArrivalWindow()
    at = 0.0
    for gap in [1.0] * 30 + [60.0] + [1.0] * 5:
        at += gap
        clipped.arrived(at)
        unclipped.arrived(at)
    assert unclipped.dead_after(THRESHOLD, FLOOR, CEILING) == CEILING
    assert clipped.dead_after(THRESHOLD, FLOOR, CEILING) < 10.0


def test_a_lone_outage_is_no_sample_but_a_recurring_one_is() -> None:
    kept, dropped = ArrivalWindow(clip=FLOOR), ArrivalWindow(clip=FLOOR)
    at = 0.0
    for gap in [1.0] * 8 + [12.0] + [1.0] * 3:  # a 12 s freeze in a short window (a recent restart)
        at += gap
        kept.arrived(at)
        dropped.arrived(at, outage=gap >= FLOOR)
    assert len(dropped) == len(kept) - 1
    assert kept.dead_after(THRESHOLD, FLOOR, CEILING) > FLOOR  # clipped, it still made the detector lax
    assert dropped.dead_after(THRESHOLD, FLOOR, CEILING) == FLOOR
    # A live member on a loaded machine that stalls past the limit every few beats looks like a
    # freeze each time; its stalls must still count, or it is declared dead at every one of them.
    busy, at = ArrivalWindow(clip=FLOOR), 0.0
    for beat in range(80):
        gap = 6.0 if beat >= 20 and beat % 5 == 4 else 1.0  # regular at first: its limit is the floor
        at += gap
        busy.arrived(at, outage=gap >= busy.dead_after(THRESHOLD, FLOOR, CEILING))
    assert busy.dead_after(THRESHOLD, FLOOR, CEILING) > 6.0


def test_a_thawed_member_is_detected_at_the_floor_when_it_stops_again() -> None:
    view = make_view()
    last = feed_heartbeats(view, 30)
    assert view.dead_limit("b") == FLOOR
    thawed = last + 12.0  # frozen for 12 s: dead at the floor, then its next counter arrives
    assert view.state_of("b", now=thawed) == "dead"
    for beat in range(31, 37):
        view.merge([Member("b", "127.0.0.1:2", 7, beat)], now=thawed + beat - 31)
    assert view.state_of("b", now=thawed + 5) == "alive"
    assert view.dead_limit("b") == FLOOR


def test_too_few_samples_fall_back_to_the_ceiling() -> None:
    window = ArrivalWindow()
    for at in (0.0, 1.0, 2.0):
        window.arrived(at)
    assert window.mean_std() is None
    assert window.dead_after(THRESHOLD, FLOOR, CEILING) == CEILING


def test_forget_last_drops_the_gap_across_a_local_pause() -> None:
    window, at = jittered_window(1.0, 0.1, count=10)
    window.forget_last()
    window.arrived(at + 60.0)
    window.arrived(at + 61.0)
    estimate = window.mean_std()
    assert estimate is not None and estimate[0] < 1.5


def test_round_deadline_learns_and_stays_in_bounds() -> None:
    deadline = RoundDeadline(floor=0.5, ceiling=10.0, margin=4.0)
    assert deadline.deadline() == 10.0  # no history: the configured timeout
    for _ in range(20):
        deadline.observe(0.05)
    assert deadline.deadline() == 0.5  # 4 x 0.05 is below the floor
    for _ in range(20):
        deadline.observe(1.0)
    assert deadline.deadline() == pytest.approx(4.0)
    for _ in range(50):
        deadline.observe(30.0)
    assert deadline.deadline() == 10.0
    with pytest.raises(ValueError):
        RoundDeadline(floor=2.0, ceiling=1.0, margin=4.0)


def make_view(phi_threshold: float = THRESHOLD) -> MembershipView:
    timing = Timing(gossip_interval=1.0, suspect_after=FLOOR, dead_after=CEILING, phi_threshold=phi_threshold)
    return MembershipView(
        name="a", address="127.0.0.1:1", configured=[("a", "127.0.0.1:1"), ("b", "127.0.0.1:2")], timing=timing, now=0.0
    )


def feed_heartbeats(view: MembershipView, count: int, interval: float = 1.0) -> float:
    at = 0.0
    for beat in range(1, count + 1):
        at = beat * interval
        view.merge([Member("b", "127.0.0.1:2", 7, beat)], now=at)
    return at


@pytest.mark.parametrize("phi_threshold", [THRESHOLD, 0.0])
def test_view_declares_a_silent_member_dead_within_its_bounds(phi_threshold: float) -> None:
    view = make_view(phi_threshold)
    last = feed_heartbeats(view, 30)
    view.tick(now=last)
    expected = FLOOR if phi_threshold else CEILING
    assert view.dead_limit("b") == expected
    assert view.state_of("b", now=last + FLOOR - 0.1) == "alive"
    assert view.state_of("b", now=last + expected - 0.1) in ("alive", "suspect")
    assert view.state_of("b", now=last + expected + 0.1) == "dead"
    assert view.tick(now=last + expected + 0.1)
    assert view.deaths == {"b": 1}
    # The silence crossed the limit 0.1 s before the tick, which is what the log line reports.
    [(name, silent, limit)] = view.declared_dead
    assert name == "b" and limit == expected and silent - limit == pytest.approx(0.1)
    assert not view.tick(now=last + expected + 0.2) and view.declared_dead == []


def test_a_member_never_heard_is_given_the_ceiling() -> None:
    view = make_view()
    assert view.state_of("b", now=FLOOR + 1) == "suspect"
    assert view.state_of("b", now=CEILING + 0.1) == "dead"


def test_a_member_heard_once_that_never_advances_is_dead_at_the_floor() -> None:
    """A restarted peer learns a crashed member's last entry from the others' digests: that
    counter never advances, so the member is dead after the floor, not the ceiling."""
    view = make_view()
    view.merge([Member("b", "127.0.0.1:2", 7, 40)], now=1.0)
    view.merge([Member("b", "127.0.0.1:2", 7, 40)], now=2.0)  # relayed again, not advanced
    assert view.dead_limit("b") == FLOOR
    assert view.state_of("b", now=1.0 + FLOOR + 0.1) == "dead"
    view.merge([Member("b", "127.0.0.1:2", 7, 41)], now=3.0)  # it advanced: alive, one sample
    assert view.state_of("b", now=3.0) == "alive"
    assert view.dead_limit("b") == CEILING  # too few samples for phi: the ceiling again


def test_a_local_pause_is_not_counted_as_the_others_silence(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [0.0]
    monkeypatch.setattr("p2pdl.membership.view.time.monotonic", lambda: clock[0])
    view = make_view()
    for beat in range(1, 31):
        clock[0] = float(beat)
        view.beat()
        view.merge([Member("b", "127.0.0.1:2", 7, beat)])
        view.tick()
    clock[0] = 30.0 + 14.0  # this process was stopped for 14 s
    view.beat()
    assert view.paused_seconds == pytest.approx(13.0)
    assert view.state_of("b") == "alive"
    assert not view.tick() and not view.deaths
    assert view.dead_limit("b") == FLOOR  # the gap across the pause was no sample


def test_config_validates_the_new_keys() -> None:
    MembershipConfig(phi_threshold=0)
    StrategyConfig(round_timeout=0.3)  # min_round_timeout is capped at round_timeout, not refused
    StrategyConfig(round_margin=0)
    with pytest.raises(ConfigError, match=r"membership\.phi_threshold"):
        MembershipConfig(phi_threshold=0.5)
    with pytest.raises(ConfigError, match=r"strategy\.round_margin"):
        StrategyConfig(round_margin=0.5)
    with pytest.raises(ConfigError, match=r"strategy\.min_round_timeout"):
        StrategyConfig(min_round_timeout=0)
