"""Restart policy for crashed or hung workers: exponential backoff, flapping detection, quarantine.

Pure policy (no processes, no clock of its own): the supervisor's main thread feeds it events with the
current time and executes the decisions, so tests drive it with a fake clock.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import Enum

from orchestrator.common.config import RestartSection


class Action(Enum):
    RESTART = "restart"
    QUARANTINE = "quarantine"
    GIVE_UP = "give_up"  # restarts disabled


@dataclass(frozen=True)
class Decision:
    action: Action
    at: float  # when to (re)start, on the caller's clock
    reason: str


class RestartTracker:
    """Crash history of one worker slot."""

    def __init__(self, policy: RestartSection) -> None:
        self.policy = policy
        self.crashes: deque[float] = deque()
        self.consecutive = 0
        self.restarts = 0
        self.quarantines = 0
        self.ready_since: float | None = None

    def on_ready(self, now: float) -> None:
        """A worker reached READY; a long stable run later resets the backoff (see on_crash)."""
        self.ready_since = now

    def on_crash(self, now: float) -> Decision:
        p = self.policy
        if not p.enabled:
            return Decision(Action.GIVE_UP, now, "restarts are disabled ([restart] enabled = false)")
        if self.ready_since is not None and now - self.ready_since >= p.flap_window_s:
            self.consecutive = 0  # it ran fine for a whole window: start the backoff over
        self.ready_since = None
        self.crashes.append(now)
        while self.crashes and now - self.crashes[0] > p.flap_window_s:
            self.crashes.popleft()
        self.consecutive += 1
        if len(self.crashes) >= p.flap_max_crashes:
            self.crashes.clear()
            self.consecutive = 0
            self.quarantines += 1
            return Decision(
                Action.QUARANTINE,
                now + p.quarantine_s,
                f"{p.flap_max_crashes} crashes within {p.flap_window_s:g}s: quarantined for {p.quarantine_s:g}s",
            )
        delay = min(p.backoff_max_s, p.backoff_initial_s * 2 ** (self.consecutive - 1))
        self.restarts += 1
        return Decision(
            Action.RESTART, now + delay, f"restart in {delay:.2f}s (crash {self.consecutive} in a row)"
        )
