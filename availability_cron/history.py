"""Run history: one row per `availability-cron refresh` in ``availability_cron_runs``.

Every run that produced a summary (completed, skipped on the lock, or failed with exit
1) is appended after its summary is printed; ``--dry-run`` writes nothing, so it is not
recorded. Rows older than ``AVAILABILITY_CRON_RUN_RETENTION_DAYS`` are pruned at the same
time. ``metrics`` reads the table (:func:`availability_cron.metrics.run_history`).

Recording is best effort: the run's own outcome is already decided and printed, and a
history that cannot be written (database down, table missing, read-only) must never
turn a good run into a failed one. :func:`record_best_effort` therefore logs a warning
and returns False instead of raising.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Literal

from psycopg.types.json import Jsonb

from . import db, queries
from .deadline import RECORD_CONNECT_SECONDS, RECORD_SECONDS, RECORD_STATEMENT_MS
from .errors import AvailabilityCronError
from .redact import scrub
from .refresh import RunSummary
from .settings import Settings

log = logging.getLogger(__name__)

Outcome = Literal["completed", "skipped", "failed"]

#: Statement and lock timeout of each history statement: they run after the run itself
#: and must not hold the process (cron starts the next one a minute later) behind a lock.
WRITE_TIMEOUT_MS = RECORD_STATEMENT_MS
#: Most rows one run prunes: a backlog is worked off over the next runs (a day of runs is
#: 1,440 rows, so a run always removes more than it adds).
PRUNE_BATCH = 5000
#: Connect timeout of the history connection (libpq's minimum is 2 s).
CONNECT_TIMEOUT_SECONDS = RECORD_CONNECT_SECONDS
#: The most recording can add to a run (the run's worst case counts it: deadline.py).
BOUND_SECONDS = RECORD_SECONDS


def outcome_of(summary: RunSummary) -> Outcome:
    """``failed`` for any run that exits 1 (a lock-stuck skip included), ``skipped`` for a
    run that found the lock held by a healthy run, ``completed`` otherwise."""
    if not summary.success:
        return "failed"
    if summary.skipped:
        return "skipped"
    return "completed"


def record_run(
    conn: db.Connection,
    summary: RunSummary,
    *,
    host: str,
    pid: int,
    finished_at: datetime,
    secrets: list[str] | None = None,
) -> None:
    """Append one row for ``summary``. A second call for the same run_id changes nothing.

    The summary is stored as printed, except that its ``error`` is scrubbed of
    ``secrets`` once more: the table outlives the log. Raises psycopg errors as they come;
    callers translate them (:func:`record_best_effort` does).
    """
    data = summary.as_json()
    if isinstance(data.get("error"), str):
        data["error"] = scrub(str(data["error"]), secrets or [])
    conn.execute(
        queries.RECORD_RUN,
        {
            "run_id": summary.run_id,
            "host": host,
            "pid": pid,
            "started_at": summary.started_at,
            "finished_at": finished_at,
            "outcome": outcome_of(summary),
            "duration_ms": summary.duration_ms,
            "within_budget": summary.finished_within_budget,
            "refreshed": summary.refreshed,
            "summary": Jsonb(data),
        },
    )


def prune(conn: db.Connection, retention_days: int, now: datetime) -> int:
    """Delete up to PRUNE_BATCH of the runs that started more than ``retention_days`` before
    ``now``, oldest first; return how many."""
    cur = conn.execute(queries.PRUNE_RUNS, {"before": now - timedelta(days=retention_days),
                                            "batch": PRUNE_BATCH})
    return max(cur.rowcount, 0)


def record_best_effort(
    connect: Callable[[], db.Connection],
    summary: RunSummary,
    settings: Settings,
    *,
    host: str,
    pid: int,
    now: Callable[[], datetime],
) -> bool:
    """Record ``summary`` and prune old runs on a fresh connection from ``connect``.

    Never raises (bar KeyboardInterrupt and the like): any failure, from connecting to
    the last statement, is logged at WARNING with secrets removed, and False is
    returned. Both statements are bounded by WRITE_TIMEOUT_MS. The connection is closed
    on return.
    """
    secrets = settings.secrets()
    step = "run not recorded in availability_cron_runs"
    try:
        with db.translate_errors(secrets), connect() as conn:
            # Bounds local to each transaction: DATABASE_URL may be a transaction pooler,
            # whose next client must not inherit them.
            with db.bounded_transaction(conn, WRITE_TIMEOUT_MS):
                record_run(conn, summary, host=host, pid=pid, finished_at=now(),
                           secrets=secrets)
            step = "run recorded; pruning old runs deferred to a later run"
            with db.bounded_transaction(conn, WRITE_TIMEOUT_MS):
                pruned = prune(conn, settings.run_retention_days, now())
    except AvailabilityCronError as exc:
        log.warning("%s: %s", step, scrub(exc.message, secrets))
        return step.startswith("run recorded")
    except Exception as exc:  # best effort: nothing here may change the run's exit code
        log.warning("%s: unexpected %s: %s", step, type(exc).__name__, scrub(str(exc), secrets))
        return step.startswith("run recorded")
    if pruned:
        log.info("pruned %d runs older than %d days from availability_cron_runs",
                 pruned, settings.run_retention_days)
    return True
