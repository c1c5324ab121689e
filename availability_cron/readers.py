"""Readers for the app side: what an app that shows booking availability calls.

They take the app's own psycopg connection (any mode) and never write::

    from availability_cron.readers import get_cache, get_slots

    with psycopg.connect(DATABASE_URL) as conn:
        slots = get_slots(conn, "acme")          # future free slots, UTC datetimes
        cache = get_cache(conn, "acme")          # the whole row, or None

A cache whose refreshes keep failing still serves its last *successful* slots;
check ``cache.age(now)`` or ``cache.last_error`` to decide whether to show them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg.rows import class_row

from . import queries


@dataclass(frozen=True)
class CacheRow:
    """One row of workspace_availability_cache."""

    workspace_id: str
    slots_utc: list[str] | None
    range_start: datetime | None
    range_end: datetime | None
    fetched_at: datetime
    refreshed_at: datetime | None
    stale_at: datetime
    last_error: str | None
    last_error_at: datetime | None
    consecutive_failures: int
    #: created_at of the workspace it was written for (None for rows from before 0003).
    workspace_created_at: datetime | None = None

    def age(self, now: datetime) -> timedelta | None:
        """Time since the last successful refresh; None if it never succeeded."""
        return None if self.refreshed_at is None else now - self.refreshed_at

    def is_stale(self, now: datetime) -> bool:
        return self.stale_at <= now


#: The source relation the readers check by default (AVAILABILITY_CRON_SOURCE_TABLE's).
DEFAULT_SOURCE = "availability_workspaces"


def get_cache(
    conn: psycopg.Connection[Any], workspace_id: str, *, source_table: str = DEFAULT_SOURCE
) -> CacheRow | None:
    """The cache row of ``workspace_id``, or None when it has never been attempted.

    None too when the row is an older workspace's whose id was reused: ``source_table``
    (the job's AVAILABILITY_CRON_SOURCE_TABLE; pass it when that is a view) has a row for
    the id created after the one the cache was written for.
    """
    # Binary results: timestamps read whatever the DateStyle (see db.py).
    with conn.cursor(row_factory=class_row(CacheRow), binary=True) as cur:
        cur.execute(queries.with_source(queries.CACHE_ROW, source_table),
                    {"workspace_id": workspace_id})
        return cur.fetchone()


def parse_slots(slots_utc: list[str] | None) -> list[datetime]:
    """The stored ISO-8601 strings as timezone-aware UTC datetimes, in order."""
    out = []
    for text in slots_utc or []:
        instant = datetime.fromisoformat(text.replace("Z", "+00:00"))
        out.append(instant.astimezone(UTC))
    return out


def get_slots(
    conn: psycopg.Connection[Any],
    workspace_id: str,
    *,
    now: datetime | None = None,
    include_past: bool = False,
    source_table: str = DEFAULT_SOURCE,
) -> list[datetime]:
    """Free slot starts of ``workspace_id`` in UTC, ready to show; [] if none are cached
    (nor for an older workspace with the same id: see :func:`get_cache`).

    Slots that have already started (before ``now``, default: the current time) are
    left out unless ``include_past``: the cache may be up to a TTL old.
    """
    row = get_cache(conn, workspace_id, source_table=source_table)
    if row is None:
        return []
    slots = parse_slots(row.slots_utc)
    if include_past:
        return slots
    cutoff = now or datetime.now(UTC)
    return [s for s in slots if s >= cutoff]
