"""The app-side readers return what the job stored, ready to show."""

from datetime import UTC, datetime, timedelta

from helpers import NOW, add_cache, add_workspace, make_runtime, make_settings

from availability_cron.readers import get_cache, get_slots
from availability_cron.refresh import run_refresh


def test_get_cache_is_none_for_a_workspace_never_attempted(conn):
    add_workspace(conn, "ws-new")
    assert get_cache(conn, "ws-new") is None
    assert get_slots(conn, "ws-new") == []


def test_get_slots_returns_future_utc_datetimes_in_order(conn):
    add_workspace(conn, "ws-1")
    add_cache(
        conn, "ws-1", stale_at=NOW, refreshed_at=NOW - timedelta(minutes=1),
        slots=["2026-11-28T11:00:00Z", "2026-11-28T13:00:00Z", "2026-11-29T09:30:00Z"],
    )
    slots = get_slots(conn, "ws-1", now=NOW)
    assert slots == [
        datetime(2026, 11, 28, 13, 0, tzinfo=UTC),
        datetime(2026, 11, 29, 9, 30, tzinfo=UTC),
    ]
    assert all(s.utcoffset() == timedelta(0) for s in slots)
    assert len(get_slots(conn, "ws-1", now=NOW, include_past=True)) == 3


def test_readers_see_what_a_real_run_wrote(database_url, conn):
    add_workspace(conn, "ws-1", config={"slots_per_day": 2})
    run_refresh(make_settings(database_url, lookahead_days=3), make_runtime(database_url),
                default_source="availability_workspaces")
    row = get_cache(conn, "ws-1")
    assert row is not None and row.refreshed_at is not None and row.last_error is None
    assert row.age(datetime.now(UTC)) < timedelta(minutes=1)
    slots = get_slots(conn, "ws-1", include_past=True)
    assert len(slots) == len(row.slots_utc or []) and 4 <= len(slots) <= 6
    assert slots == sorted(slots)
