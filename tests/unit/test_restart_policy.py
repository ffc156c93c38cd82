"""Restart policy with a fake clock: backoff doubles up to a cap, flapping quarantines, stability resets."""

from __future__ import annotations

from orchestrator.common.config import RestartSection
from orchestrator.supervisor.restart_policy import Action, RestartTracker

POLICY = RestartSection(
    backoff_initial_s=0.5, backoff_max_s=3.0, flap_window_s=10.0, flap_max_crashes=4, quarantine_s=60.0
)


def test_backoff_doubles_and_caps() -> None:
    t = RestartTracker(RestartSection(backoff_initial_s=0.5, backoff_max_s=3.0, flap_max_crashes=100))
    delays = []
    now = 0.0
    for _ in range(6):
        d = t.on_crash(now)
        assert d.action == Action.RESTART
        delays.append(d.at - now)
        now = d.at
    assert delays == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]
    assert t.restarts == 6


def test_flapping_quarantines_then_allows_a_later_retry() -> None:
    t = RestartTracker(POLICY)
    decisions = [t.on_crash(float(i)) for i in range(4)]
    assert [d.action for d in decisions] == [Action.RESTART] * 3 + [Action.QUARANTINE]
    assert decisions[-1].at == 3.0 + 60.0 and t.quarantines == 1
    # after the quarantine the history starts over
    assert t.on_crash(100.0).action == Action.RESTART


def test_crashes_outside_the_window_do_not_count() -> None:
    t = RestartTracker(POLICY)
    for i in range(10):
        assert t.on_crash(i * 11.0).action == Action.RESTART


def test_long_stable_run_resets_backoff() -> None:
    t = RestartTracker(POLICY)
    t.on_crash(0.0)
    t.on_crash(1.0)
    t.on_ready(2.0)
    d = t.on_crash(50.0)  # ran 48 s > flap window
    assert d.at - 50.0 == 0.5


def test_disabled() -> None:
    t = RestartTracker(RestartSection(enabled=False))
    assert t.on_crash(0.0).action == Action.GIVE_UP
