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


def test_readers_never_serve_the_old_tenants_slots_for_a_reused_workspace_id(
    database_url, conn
):
    add_workspace(conn, "acme", created_at=datetime.now(UTC) - timedelta(days=10))
    run_refresh(make_settings(database_url), make_runtime(database_url),
                default_source="availability_workspaces")
    assert get_slots(conn, "acme", include_past=True)  # the old tenant's
    conn.execute("DELETE FROM availability_workspaces WHERE workspace_id = 'acme'")
    add_workspace(conn, "acme", created_at=datetime.now(UTC))

    assert get_cache(conn, "acme") is None
    assert get_slots(conn, "acme", include_past=True) == []


def test_readers_check_a_source_view_when_told_its_name(database_url, conn):
    conn.execute("CREATE TABLE tenants (id text, joined timestamptz)")
    conn.execute("CREATE VIEW tenants_v AS SELECT id AS workspace_id, 'simulated' AS provider,"
                 " '{}'::jsonb AS provider_config, true AS enabled, joined AS created_at"
                 " FROM tenants")
    conn.execute("INSERT INTO tenants VALUES ('acme', now() - interval '10 days')")
    run_refresh(make_settings(database_url, source_table="tenants_v"),
                make_runtime(database_url), default_source="availability_workspaces")
    conn.execute("UPDATE tenants SET joined = now()")  # deleted and re-created

    assert get_cache(conn, "acme") is not None  # the default source knows nothing of it
    assert get_cache(conn, "acme", source_table="tenants_v") is None


def test_a_cache_row_written_before_the_workspace_was_recorded_in_it_is_served(conn):
    # Rows from before migration 0003 have no workspace_created_at: served as before.
    add_workspace(conn, "ws-1", created_at=datetime.now(UTC))
    add_cache(conn, "ws-1", stale_at=NOW, refreshed_at=NOW, slots=["2026-11-29T09:00:00Z"])

    assert len(get_slots(conn, "ws-1", include_past=True)) == 1
