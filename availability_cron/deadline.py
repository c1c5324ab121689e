"""The run's time bounds in one place: the grace after the budget, the wind-down after
that, the bound of a stop on a signal, and the worst case of a whole run.

A run, from process start (monotonic), with the network or the database gone included:

- ``budget``: calls start only while more than the deadline margin is left of it;
- ``+ GRACE_SECONDS``: calls still running then are abandoned (recorded as timeouts);
- ``+ WIND_DOWN_SECONDS``: the last batch's write; every database round trip of the run
  (planning reads, the lock check, the writes, the lock's release) is bounded on the
  client side by what is left until here (:meth:`Deadline.database_left`, enforced by
  :func:`availability_cron.db.answer_within`);
- ``+ CLOSE_SECONDS``: closing the providers (a hung plugin is left behind);
- ``+ PING_SECONDS``: the dead-man's-switch end ping (:mod:`.ping`);
- ``+`` the history bound: recording the run (:mod:`.history`, RECORD_SECONDS).

A SIGTERM or SIGINT (:class:`StopRequest`) shortens this: no call starts after it, its
round trips end within STOP_SECONDS, then the providers close and the run reports as
usual (:func:`stop_seconds` in all).

:func:`worst_case_seconds` is that sum; the deployment timeouts (systemd's
TimeoutStartSec, Kubernetes' activeDeadlineSeconds) must exceed it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .ping import TIMEOUT_SECONDS as PING_SECONDS

#: How long past the budget we wait for calls that ignore their timeout before
#: abandoning them (recorded as timeouts) and ending the run.
GRACE_SECONDS = 2.0
#: After budget + grace: the write of the last batch (the abandoned calls' timeouts).
WIND_DOWN_SECONDS = 1.0
#: The most closing the providers may take (a plugin's close() may hang).
CLOSE_SECONDS = 2.0
#: After a stop signal: every database round trip left (writing what finished, releasing
#: the lock) ends within this; then the run reports as usual.
STOP_SECONDS = 2.0
#: Recording the run (history.py): one connect attempt (libpq's minimum connect timeout is
#: 2 s) and its statements, each bounded to RECORD_STATEMENT_MS (the two that write and
#: the one that sets their bounds).
RECORD_CONNECT_SECONDS = 2
RECORD_STATEMENT_MS = 500
RECORD_SECONDS = RECORD_CONNECT_SECONDS + 3 * RECORD_STATEMENT_MS / 1000

__all__ = ["CLOSE_SECONDS", "GRACE_SECONDS", "PING_SECONDS", "RECORD_SECONDS", "STOP_SECONDS",
           "WIND_DOWN_SECONDS", "Deadline", "StopRequest", "stop_seconds",
           "worst_case_seconds"]


@dataclass(frozen=True)
class Deadline:
    """The end of a run's time budget, as a monotonic instant."""

    budget_end: float
    monotonic: Callable[[], float]

    @classmethod
    def of(cls, started_monotonic: float, time_budget_ms: int,
           monotonic: Callable[[], float]) -> Deadline:
        return cls(started_monotonic + time_budget_ms / 1000, monotonic)

    def time_left(self) -> float:
        """Seconds left of the budget (negative once it is over)."""
        return self.budget_end - self.monotonic()

    def database_left(self) -> float:
        """Seconds left for database round trips: until budget + grace + wind-down, >= 0."""
        return max(0.0, self.time_left() + GRACE_SECONDS + WIND_DOWN_SECONDS)


class StopRequest:
    """A request to stop the run early (a SIGTERM or SIGINT), set once, from a signal
    handler or any thread; read by the sweep and by the database round trips' bounds."""

    def __init__(self, monotonic: Callable[[], float]) -> None:
        self.monotonic = monotonic
        #: What asked (a signal's name), once asked.
        self.reason: str | None = None
        self.at: float | None = None

    def request(self, reason: str) -> None:
        if self.reason is None:
            self.at = self.monotonic()
            self.reason = reason

    def requested(self) -> bool:
        return self.reason is not None


def database_left(deadline: Deadline, stop: StopRequest | None = None) -> float:
    """What a database round trip may still wait: until budget + grace + wind-down, and,
    once a stop was requested, no later than STOP_SECONDS after it."""
    left = deadline.database_left()
    if stop is not None and stop.at is not None:
        left = min(left, max(0.0, stop.at + STOP_SECONDS - deadline.monotonic()))
    return left


def stop_seconds() -> float:
    """The longest a run takes from a stop signal to its exit."""
    return STOP_SECONDS + CLOSE_SECONDS + PING_SECONDS + RECORD_SECONDS


def worst_case_seconds(time_budget_ms: int) -> float:
    """The longest a run takes from process start, whatever the network does."""
    return (time_budget_ms / 1000 + GRACE_SECONDS + WIND_DOWN_SECONDS + CLOSE_SECONDS
            + PING_SECONDS + RECORD_SECONDS)
