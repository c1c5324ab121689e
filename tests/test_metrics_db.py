"""The staleness report against a real PostgreSQL, on small hand-made datasets.

Every age is measured at a fixed ``at`` from the last *successful* refresh; only
enabled workspaces count.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import psycopg
from helpers import NOW, FakeClock, add_cache, add_workspace, cache_row, make_runtime, make_settings

from availability_cron import metrics, refresh
from availability_cron.providers import FetchRequest, Provider, RetryableProviderError

SOURCE = "availability_workspaces"
SLOTS = ["2026-11-29T09:00:00Z"]


def report(conn: psycopg.Connection[Any], at: datetime = NOW) -> dict[str, object]:
    return metrics.staleness(conn, SOURCE, at).as_json()


def minutes_ago(minutes: float) -> datetime:
    return NOW - timedelta(minutes=minutes)


def add_success(conn: psycopg.Connection[Any], workspace_id: str, age_minutes: float,
                enabled: bool = True) -> None:
    """A workspace whose last successful refresh was ``age_minutes`` before NOW."""
    add_workspace(conn, workspace_id, enabled=enabled)
    add_cache(conn, workspace_id, refreshed_at=minutes_ago(age_minutes),
              stale_at=minutes_ago(age_minutes) + timedelta(minutes=1), slots=SLOTS)


class FailingProvider(Provider):
    name = "failing"

    def fetch(self, request: FetchRequest) -> Any:
        raise RetryableProviderError("calendar API answered 503")


class GoodProvider(Provider):
    name = "good"

    def fetch(self, request: FetchRequest) -> Any:
        return [request.window_start + timedelta(hours=1)]


def test_counts_cover_enabled_workspaces_only(conn):
    add_workspace(conn, "fresh")
    add_cache(conn, "fresh", refreshed_at=minutes_ago(0.5), stale_at=NOW + timedelta(seconds=30),
              slots=SLOTS)
    add_workspace(conn, "due")
    add_cache(conn, "due", refreshed_at=minutes_ago(5), stale_at=minutes_ago(1), slots=SLOTS)
    add_workspace(conn, "erroring")
    add_cache(conn, "erroring", refreshed_at=minutes_ago(20), stale_at=NOW + timedelta(minutes=1),
              fetched_at=minutes_ago(0.2), slots=SLOTS, consecutive_failures=2,
              last_error="[retryable] 503")
    add_workspace(conn, "never-ok")
    add_cache(conn, "never-ok", stale_at=minutes_ago(2), consecutive_failures=5,
              last_error="[permanent] 401")
    add_workspace(conn, "missing")
    # Each of these would change every count (and the oldest age) if it were included.
    add_workspace(conn, "disabled-erroring", enabled=False)
    add_cache(conn, "disabled-erroring", stale_at=minutes_ago(60), consecutive_failures=9,
              last_error="[permanent] 404")
    add_workspace(conn, "disabled-missing", enabled=False)
    add_cache(conn, "orphan", refreshed_at=minutes_ago(3 * 24 * 60), stale_at=minutes_ago(60),
              slots=SLOTS, consecutive_failures=1, last_error="[retryable] 503")

    got = report(conn)

    assert {k: got[k] for k in ("workspaces", "caches", "missingCaches", "staleDue",
                                "erroringCaches", "neverSucceeded")} == {
        "workspaces": 5,  # fresh, due, erroring, never-ok, missing
        "caches": 4,  # all but missing
        "missingCaches": 1,  # missing
        "staleDue": 2,  # due, never-ok
        "erroringCaches": 2,  # erroring, never-ok
        "neverSucceeded": 2,  # never-ok, missing
    }
    assert got["oldestSuccessAgeMinutes"] == 20.0  # erroring, not the orphan


def test_success_age_counts_from_the_last_success_not_the_last_attempt(database_url, conn):
    add_workspace(conn, "ws-1", provider="failing")
    add_cache(conn, "ws-1", refreshed_at=minutes_ago(90), stale_at=minutes_ago(1), slots=SLOTS)
    settings = make_settings(database_url)
    providers = {"failing": FailingProvider}

    refresh.run_refresh(settings, make_runtime(database_url, providers=providers,
                                               clock=FakeClock(NOW)),
                        default_source=SOURCE)
    retry_at = cache_row(conn, "ws-1")["stale_at"] + timedelta(seconds=1)
    refresh.run_refresh(settings, make_runtime(database_url, providers=providers,
                                               clock=FakeClock(retry_at)),
                        default_source=SOURCE)
    row = cache_row(conn, "ws-1")
    assert row["consecutive_failures"] == 2 and row["fetched_at"] > NOW

    got = report(conn, at=NOW + timedelta(minutes=5))

    assert got["oldestSuccessAgeMinutes"] == 95.0
    assert got["successAgeP50Minutes"] == 95.0
    assert got["successAgeP95Minutes"] == 95.0
    assert got["erroringCaches"] == 1
    assert got["neverSucceeded"] == 0


def test_success_age_percentiles_interpolate_like_percentile_cont(conn):
    for workspace_id, age in [("d", 60), ("a", 5), ("f", 240), ("c", 45), ("b", 15), ("e", 120)]:
        add_success(conn, workspace_id, age)
    add_workspace(conn, "never-ok")  # no success: not part of the distribution
    add_cache(conn, "never-ok", stale_at=minutes_ago(1), last_error="[permanent] 401")
    add_success(conn, "disabled", 10_000, enabled=False)

    got = report(conn)

    # Sorted ages 5, 15, 45, 60, 120, 240 (n = 6): percentile_cont(p) interpolates at
    # position p * (n - 1) of the sorted list (0-based).
    # p50: position 2.5  -> 45 + 0.5 * (60 - 45)    = 52.5
    # p95: position 4.75 -> 120 + 0.75 * (240 - 120) = 210.0
    assert got["successAgeP50Minutes"] == 52.5
    assert got["successAgeP95Minutes"] == 210.0
    assert got["oldestSuccessAgeMinutes"] == 240.0


def test_ages_are_null_when_nothing_ever_succeeded(conn):
    add_workspace(conn, "never-ok")
    add_cache(conn, "never-ok", stale_at=minutes_ago(1), consecutive_failures=3,
              last_error="[retryable] 503")
    add_workspace(conn, "missing")
    add_success(conn, "disabled", 30, enabled=False)

    got = report(conn)

    assert got["oldestSuccessAgeMinutes"] is None
    assert got["oldestRangeStartAgeMinutes"] is None
    assert got["successAgeP50Minutes"] is None
    assert got["successAgeP95Minutes"] is None
    assert (got["workspaces"], got["neverSucceeded"]) == (2, 2)


def test_oldest_range_start_age_is_measured_from_the_fetch_minute(database_url, conn):
    add_workspace(conn, "ws-1", provider="good")
    add_workspace(conn, "never-ok")
    add_cache(conn, "never-ok", stale_at=NOW + timedelta(hours=1), last_error="[permanent] 401")
    add_success(conn, "disabled", 3 * 24 * 60, enabled=False)
    # Fetched 30 s into the minute: the window starts at the minute, NOW.
    refresh.run_refresh(make_settings(database_url),
                        make_runtime(database_url, providers={"good": GoodProvider},
                                     clock=FakeClock(NOW + timedelta(seconds=30))),
                        default_source=SOURCE)
    assert cache_row(conn, "ws-1")["range_start"] == NOW

    got = report(conn, at=NOW + timedelta(hours=1))

    assert got["oldestRangeStartAgeMinutes"] == 60.0
    assert 59.0 < got["oldestSuccessAgeMinutes"] <= 59.5  # refreshed at or after NOW + 30 s


def test_a_workspace_that_never_got_data_is_aged_from_its_creation(database_url, conn):
    from datetime import timedelta

    from helpers import NOW, add_cache, add_workspace

    from availability_cron.metrics import staleness

    add_workspace(conn, "ok", created_at=NOW - timedelta(days=2))
    add_cache(conn, "ok", refreshed_at=NOW - timedelta(minutes=2), slots=[],
              stale_at=NOW + timedelta(minutes=1))
    add_workspace(conn, "failing", created_at=NOW - timedelta(minutes=90))
    add_cache(conn, "failing", stale_at=NOW + timedelta(minutes=5), last_error="[permanent] x",
              consecutive_failures=7)
    add_workspace(conn, "new", created_at=NOW - timedelta(minutes=1))

    report = staleness(conn, "availability_workspaces", NOW).as_json()

    assert report["oldestSuccessAgeMinutes"] == 2.0
    assert report["oldestNeverSucceededAgeMinutes"] == 90.0
    assert report["neverSucceeded"] == 2
