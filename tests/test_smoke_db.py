from helpers import add_workspace, cache_row, make_runtime, make_settings

from availability_cron.refresh import run_refresh


def test_a_run_refreshes_a_missing_workspace(database_url, conn):
    add_workspace(conn, "ws-1")
    summary = run_refresh(make_settings(database_url), make_runtime(database_url),
                          default_source="availability_workspaces")
    assert summary.refreshed == 1
    row = cache_row(conn, "ws-1")
    assert row is not None and row["refreshed_at"] is not None
