"""The staleness report: how old is the data apps are showing right now.

Every age is measured from the last *successful* refresh (``refreshed_at``), never
from the last attempt (``fetched_at``): a workspace whose provider has failed for an
hour is an hour stale, however often it was retried. Only enabled workspaces
count; cache rows of removed or disabled workspaces are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg.rows import dict_row

from . import db, queries


@dataclass(frozen=True)
class StalenessReport:
    at: datetime
    #: Enabled workspaces in the source.
    workspaces: int
    #: Enabled workspaces that have a cache row (successful or not).
    caches: int
    #: Enabled workspaces with no cache row at all.
    missing_caches: int
    #: Cache rows due for refresh (stale_at <= at).
    stale_due: int
    #: Cache rows whose last attempt failed (last_error is set).
    erroring_caches: int
    #: Enabled workspaces without any successful refresh: missing, or attempted and failed.
    never_succeeded: int
    oldest_success_age_minutes: float | None
    oldest_range_start_age_minutes: float | None
    success_age_p50_minutes: float | None
    success_age_p95_minutes: float | None

    def as_json(self) -> dict[str, object]:
        return {
            "at": self.at.isoformat().replace("+00:00", "Z"),
            "workspaces": self.workspaces,
            "caches": self.caches,
            "missingCaches": self.missing_caches,
            "staleDue": self.stale_due,
            "erroringCaches": self.erroring_caches,
            "neverSucceeded": self.never_succeeded,
            "oldestSuccessAgeMinutes": self.oldest_success_age_minutes,
            "oldestRangeStartAgeMinutes": self.oldest_range_start_age_minutes,
            "successAgeP50Minutes": self.success_age_p50_minutes,
            "successAgeP95Minutes": self.success_age_p95_minutes,
        }


def _minutes_since(at: datetime, then: datetime | None) -> float | None:
    return None if then is None else round((at - then).total_seconds() / 60, 2)


def _minutes(seconds: Any) -> float | None:
    return None if seconds is None else round(float(seconds) / 60, 2)


def staleness(conn: db.Connection, source_table: str, now: datetime) -> StalenessReport:
    """Compute the report at ``now`` in one statement (one consistent snapshot)."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(queries.with_source(queries.STALENESS, source_table), {"now": now})
        row = cur.fetchone()
    assert row is not None  # an aggregate always returns one row
    workspaces, caches = int(row["workspaces"]), int(row["caches"])
    missing = workspaces - caches
    return StalenessReport(
        at=now,
        workspaces=workspaces,
        caches=caches,
        missing_caches=missing,
        stale_due=int(row["stale_due"]),
        erroring_caches=int(row["erroring_caches"]),
        never_succeeded=missing + int(row["caches_never_succeeded"]),
        oldest_success_age_minutes=_minutes_since(now, row["oldest_success"]),
        oldest_range_start_age_minutes=_minutes_since(now, row["oldest_range_start"]),
        success_age_p50_minutes=_minutes(row["success_age_p50_seconds"]),
        success_age_p95_minutes=_minutes(row["success_age_p95_seconds"]),
    )
