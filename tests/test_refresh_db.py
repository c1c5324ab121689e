"""The refresh run against a real PostgreSQL: planning, the budget, the writes, the lock.

Each test gets a fresh migrated database. Providers are small test classes handed to
the registry; the database and the advisory lock are always the real ones.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import psycopg
import pytest
from helpers import NOW, FakeClock, add_cache, add_workspace, cache_row, make_runtime, make_settings
from psycopg import sql

from availability_cron import errors, lock, refresh
from availability_cron.errors import ConfigError
from availability_cron.providers import FetchRequest, Provider, RetryableProviderError
from availability_cron.refresh import GRACE_SECONDS, MAX_ERROR_CHARS, TTL_JITTER
from availability_cron.settings import Settings

SOURCE = "availability_workspaces"
TTL = timedelta(milliseconds=60_000)  # the default AVAILABILITY_CACHE_TTL_MS
OLD_SLOTS = ["2026-11-29T09:00:00Z", "2026-11-29T10:00:00Z"]
SLOT_HOURS = 48


# --- test providers -------------------------------------------------------------------------


def provider_class(fetch: Callable[[FetchRequest], Any]) -> type[Provider]:
    """A provider class whose fetch is ``fetch`` (the registry instantiates it once per run)."""

    class TestProvider(Provider):
        name = "test"

        def fetch(self, request: FetchRequest) -> Any:
            return fetch(request)

    return TestProvider


class Recorder:
    """A healthy provider that records which workspaces it was asked for, in call order.

    Its raw answer is deliberately messy (unsorted, a duplicate, a non-UTC offset and
    instants just outside the window) so that the stored result shows normalisation.
    """

    def __init__(self, step: Callable[[], None] | None = None) -> None:
        self.calls: list[str] = []
        self._step = step

    def __call__(self, request: FetchRequest) -> list[datetime]:
        self.calls.append(request.workspace_id)
        if self._step is not None:
            self._step()
        start, end = request.window_start, request.window_end
        hours = [(7 * k) % SLOT_HOURS + 1 for k in range(SLOT_HOURS)]  # 1..48, scrambled
        slots = [start + timedelta(hours=h) for h in hours]
        slots[5] = slots[5].astimezone(timezone(timedelta(hours=2)))
        return [start - timedelta(hours=1), *slots, start + timedelta(hours=1), end]

    @staticmethod
    def expected_slots(window_start: datetime) -> list[str]:
        return [
            (window_start + timedelta(hours=h)).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            for h in range(1, SLOT_HOURS + 1)
        ]


def failing(message: str) -> Callable[[FetchRequest], Any]:
    def fetch(request: FetchRequest) -> Any:
        raise RetryableProviderError(message)

    return fetch


class SteppedMonotonic:
    """A monotonic clock that moves only when a provider call "takes" time.

    Stands in for real latency where a test needs an exact number of calls to fit
    before the deadline margin.
    """

    def __init__(self) -> None:
        self.value = 1_000.0

    def __call__(self) -> float:
        return self.value

    def advance(self, seconds: float) -> None:
        self.value += seconds


@pytest.fixture
def release() -> Iterator[threading.Event]:
    """Set at teardown, so provider threads a run abandoned can finish."""
    event = threading.Event()
    yield event
    event.set()


# --- small helpers --------------------------------------------------------------------------


def run(settings: Settings, rt: refresh.Runtime) -> refresh.RunSummary:
    return refresh.run_refresh(settings, rt, default_source=SOURCE)


def dump(conn: psycopg.Connection[Any]) -> dict[str, list[Any]]:
    """Every row of both tables, for before/after comparisons."""
    tables = ("availability_workspaces", "workspace_availability_cache")
    return {
        table: conn.execute(
            sql.SQL("SELECT to_jsonb(t) FROM {} AS t ORDER BY workspace_id").format(
                sql.Identifier(table)
            )
        ).fetchall()
        for table in tables
    }


def take_lock(connection: psycopg.Connection[Any], key: int) -> bool:
    row = connection.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
    assert row is not None
    return bool(row[0])


def add_stale(conn: psycopg.Connection[Any], workspace_id: str, minutes_overdue: int,
              provider: str = "good") -> None:
    """An enabled workspace whose successful cache went stale ``minutes_overdue`` ago."""
    add_workspace(conn, workspace_id, provider=provider)
    stale_at = NOW - timedelta(minutes=minutes_overdue)
    add_cache(conn, workspace_id, stale_at=stale_at, refreshed_at=stale_at - TTL,
              slots=OLD_SLOTS)


def add_missing(conn: psycopg.Connection[Any], workspace_id: str, days_old: int,
                provider: str = "good") -> None:
    """An enabled workspace created ``days_old`` days ago that has no cache row yet."""
    add_workspace(conn, workspace_id, provider=provider,
                  created_at=NOW - timedelta(days=days_old))


# --- planning: who gets attempted -----------------------------------------------------------


def test_a_run_attempts_only_the_stalest_due_caches_up_to_the_limit(database_url, conn):
    for workspace_id, overdue in [("s3", 30), ("s1", 50), ("s5", 10), ("s2", 40), ("s4", 20)]:
        add_stale(conn, workspace_id, overdue)
    add_workspace(conn, "not-due", provider="good")
    add_cache(conn, "not-due", stale_at=NOW + timedelta(minutes=5),
              refreshed_at=NOW - timedelta(seconds=30), slots=OLD_SLOTS)
    add_workspace(conn, "disabled-stalest", provider="good", enabled=False)
    add_cache(conn, "disabled-stalest", stale_at=NOW - timedelta(hours=2),
              refreshed_at=NOW - timedelta(hours=3), slots=OLD_SLOTS)
    add_workspace(conn, "disabled-missing", provider="good", enabled=False,
                  created_at=NOW - timedelta(days=30))
    untouched = {ws: cache_row(conn, ws) for ws in ("s4", "s5", "not-due", "disabled-stalest")}
    good = Recorder()

    summary = run(make_settings(database_url, limit=3, concurrency=1),
                  make_runtime(database_url, providers={"good": provider_class(good)},
                               clock=FakeClock(NOW)))

    assert good.calls == ["s1", "s2", "s3"]
    assert (summary.planned, summary.attempted, summary.refreshed) == (3, 3, 3)
    assert summary.stale_attempted == 3 and summary.missing_attempted == 0
    for workspace_id in ("s1", "s2", "s3"):
        assert cache_row(conn, workspace_id)["refreshed_at"] >= NOW
    assert {ws: cache_row(conn, ws) for ws in untouched} == untouched
    assert cache_row(conn, "disabled-missing") is None


def test_missing_workspaces_get_the_reserved_share_of_a_stale_backlog(database_url, conn):
    for i in range(1, 9):
        add_stale(conn, f"s{i}", 60 - i)  # s1 is the stalest
    for i in range(1, 5):
        add_missing(conn, f"m{i}", 10 - i)  # m1 is the oldest workspace
    good = Recorder()
    limit, reserve = 5, 0.3
    reserved = math.ceil(limit * reserve)
    assert reserved == 2  # rounded up: 1.5 -> 2

    summary = run(make_settings(database_url, limit=limit, missing_reserve=reserve, concurrency=1),
                  make_runtime(database_url, providers={"good": provider_class(good)},
                               clock=FakeClock(NOW)))

    # The reserved missing entries go first, then stale ones stalest first.
    assert good.calls == ["m1", "m2", "s1", "s2", "s3"]
    assert summary.as_json()["missingAttempted"] == reserved
    assert summary.as_json()["staleAttempted"] == limit - reserved
    assert cache_row(conn, "m3") is None and cache_row(conn, "m4") is None


def test_reserved_missing_workspaces_start_first_when_the_deadline_cuts_the_queue(
    database_url, conn
):
    for i in range(1, 9):
        add_stale(conn, f"s{i}", 60 - i)
    for i in range(1, 5):
        add_missing(conn, f"m{i}", 10 - i)
    # Each call takes 0.2 s of (simulated) time; with a 1 s budget and a 0.5 s margin,
    # calls start at 0.0, 0.2 and 0.4 s, and the queue stops there.
    monotonic = SteppedMonotonic()
    good = Recorder(step=lambda: monotonic.advance(0.2))
    rt = dataclasses.replace(
        make_runtime(database_url, providers={"good": provider_class(good)},
                     clock=FakeClock(NOW), started_monotonic=monotonic()),
        monotonic=monotonic,
    )
    settings = make_settings(database_url, limit=5, missing_reserve=0.3, concurrency=1,
                             time_budget_ms=1000, deadline_margin_ms=500)

    summary = run(settings, rt).as_json()

    assert good.calls == ["m1", "m2", "s1"]
    assert summary["planned"] == 5 and summary["attempted"] == 3
    assert summary["missingAttempted"] == 2 and summary["staleAttempted"] == 1
    assert summary["skippedDeadline"] == 2
    assert summary["finishedWithinBudget"] is False
    assert cache_row(conn, "m1") is not None and cache_row(conn, "m2") is not None
    assert cache_row(conn, "s2")["slots_utc"] == OLD_SLOTS


@pytest.mark.parametrize(
    ("missing", "stale", "reserve", "expected_calls"),
    [
        pytest.param(1, 8, 0.4, ["m1", "s1", "s2", "s3", "s4"], id="unused-reserve-goes-to-stale"),
        pytest.param(6, 1, 0.2, ["m1", "s1", "m2", "m3", "m4"], id="unused-stale-goes-to-missing"),
    ],
)
def test_capacity_one_side_leaves_unused_goes_to_the_other(
    database_url, conn, missing, stale, reserve, expected_calls
):
    for i in range(1, stale + 1):
        add_stale(conn, f"s{i}", 60 - i)
    for i in range(1, missing + 1):
        add_missing(conn, f"m{i}", 10 - i)
    good = Recorder()

    summary = run(make_settings(database_url, limit=5, missing_reserve=reserve, concurrency=1),
                  make_runtime(database_url, providers={"good": provider_class(good)},
                               clock=FakeClock(NOW)))

    assert good.calls == expected_calls
    assert summary.attempted == 5
    assert summary.missing_attempted == sum(c.startswith("m") for c in expected_calls)
    assert summary.stale_attempted == sum(c.startswith("s") for c in expected_calls)


def test_limit_zero_attempts_nothing_and_writes_nothing(database_url, conn):
    add_stale(conn, "stale", 10)
    add_missing(conn, "missing", 1)
    before = dump(conn)
    good = Recorder()

    summary = run(make_settings(database_url, limit=0),
                  make_runtime(database_url, providers={"good": provider_class(good)},
                               clock=FakeClock(NOW)))

    assert summary.success is True and summary.skipped is False
    assert (summary.planned, summary.attempted, summary.refreshed, summary.errors) == (0, 0, 0, 0)
    assert good.calls == []
    assert dump(conn) == before


# --- the time budget ------------------------------------------------------------------------


def test_a_hung_provider_ends_the_run_at_budget_plus_grace_and_frees_the_lock(
    database_url, conn, release
):
    add_missing(conn, "hung", 2, provider="hanging")
    add_missing(conn, "healthy", 1)
    settings = make_settings(database_url, time_budget_ms=1000, deadline_margin_ms=0,
                             concurrency=2)
    providers = {"hanging": provider_class(lambda request: release.wait()),
                 "good": provider_class(Recorder())}
    budget = settings.time_budget_ms / 1000

    started = time.monotonic()
    summary = run(settings, make_runtime(database_url, providers=providers))
    elapsed = time.monotonic() - started

    assert budget + GRACE_SECONDS <= elapsed < budget + GRACE_SECONDS + 3.0
    assert summary.unfinished == 1
    assert summary.as_json()["finishedWithinBudget"] is False
    assert (summary.attempted, summary.refreshed, summary.errors) == (2, 1, 1)
    hung = cache_row(conn, "hung")
    assert hung is not None
    assert hung["last_error"] == refresh.ABANDONED_ERROR
    assert hung["consecutive_failures"] == 1 and hung["refreshed_at"] is None
    assert cache_row(conn, "healthy")["refreshed_at"] is not None
    assert lock.find_holder(conn, settings.lock_key) is None
    with psycopg.connect(database_url, autocommit=True) as other:
        assert take_lock(other, settings.lock_key)


# --- what a success and a failure write -----------------------------------------------------


def test_success_stores_sorted_slots_window_and_jittered_stale_at(database_url, conn):
    add_workspace(conn, "ws-1", provider="good")
    add_cache(conn, "ws-1", stale_at=NOW - timedelta(minutes=1),
              refreshed_at=NOW - timedelta(hours=2), fetched_at=NOW - timedelta(minutes=5),
              slots=OLD_SLOTS, consecutive_failures=3, last_error="[retryable] 503")
    clock = FakeClock(NOW)

    summary = run(make_settings(database_url),
                  make_runtime(database_url, providers={"good": provider_class(Recorder())},
                               clock=clock))

    row = cache_row(conn, "ws-1")
    assert summary.refreshed == 1
    assert row["range_start"] == NOW  # the fetch minute
    assert row["range_end"] - row["range_start"] == timedelta(days=30)
    assert row["slots_utc"] == Recorder.expected_slots(NOW)
    assert row["slots_utc"] == sorted(row["slots_utc"])
    assert row["slot_count"] == len(row["slots_utc"])
    assert NOW <= row["refreshed_at"] <= clock()
    assert row["fetched_at"] == row["refreshed_at"]
    assert (row["refreshed_at"] + TTL * (1 - TTL_JITTER) <= row["stale_at"]
            <= row["refreshed_at"] + TTL)
    assert row["last_error"] is None and row["last_error_at"] is None
    assert row["consecutive_failures"] == 0


def test_failure_leaves_slots_and_refreshed_at_untouched(database_url, conn):
    add_stale(conn, "ws-1", 1, provider="failing")
    before = cache_row(conn, "ws-1")
    message = "calendar API answered 503: " + "x" * 5_000

    summary = run(make_settings(database_url),
                  make_runtime(database_url, clock=FakeClock(NOW),
                               providers={"failing": provider_class(failing(message))}))

    row = cache_row(conn, "ws-1")
    assert (summary.refreshed, summary.errors) == (0, 1)
    for column in ("slots_utc", "slot_count", "range_start", "range_end", "refreshed_at"):
        assert row[column] == before[column], column
    assert row["fetched_at"] >= NOW > before["fetched_at"]
    assert row["last_error_at"] == row["fetched_at"]
    assert row["last_error"].startswith("[retryable] calendar API answered 503: xxx")
    assert len(row["last_error"]) <= MAX_ERROR_CHARS
    assert row["consecutive_failures"] == 1
    assert TTL * 0.8 <= row["stale_at"] - row["fetched_at"] <= TTL


def test_consecutive_failures_back_off_exponentially(database_url, conn):
    add_stale(conn, "ws-1", 1, provider="failing")
    providers = {"failing": provider_class(failing("calendar API answered 503"))}
    settings = make_settings(database_url)

    run(settings, make_runtime(database_url, providers=providers, clock=FakeClock(NOW)))
    first = cache_row(conn, "ws-1")
    run(settings, make_runtime(database_url, providers=providers,
                               clock=FakeClock(first["stale_at"] + timedelta(seconds=1))))
    second = cache_row(conn, "ws-1")

    assert (first["consecutive_failures"], second["consecutive_failures"]) == (1, 2)
    assert TTL * 0.8 <= first["stale_at"] - first["fetched_at"] <= TTL
    assert TTL * 1.6 <= second["stale_at"] - second["fetched_at"] <= TTL * 2


def test_a_broken_workspace_does_not_jump_ahead_of_overdue_healthy_ones(database_url, conn):
    add_stale(conn, "broken", 60, provider="flaky")
    add_stale(conn, "healthy-1", 30)
    add_stale(conn, "healthy-2", 20)
    good = Recorder()
    flaky = Recorder()

    def fail_for_broken(request: FetchRequest) -> Any:
        flaky(request)
        raise RetryableProviderError("calendar API answered 503")

    providers = {"good": provider_class(good), "flaky": provider_class(fail_for_broken)}
    settings = make_settings(database_url, limit=2, concurrency=1)
    run(settings, make_runtime(database_url, providers=providers, clock=FakeClock(NOW)))
    assert flaky.calls == ["broken"] and good.calls == ["healthy-1"]
    assert cache_row(conn, "broken")["stale_at"] > NOW

    good.calls.clear()
    flaky.calls.clear()
    # By the next run the broken workspace is due again, but the healthy ones still
    # waiting have been overdue for longer.
    later = cache_row(conn, "broken")["stale_at"] + timedelta(seconds=1)
    add_stale(conn, "healthy-3", 1)  # due at NOW - 1 min: still overdue longer than broken
    run(settings, make_runtime(database_url, providers=providers, clock=FakeClock(later)))

    assert flaky.calls == []
    assert good.calls == ["healthy-2", "healthy-3"]


def test_a_success_older_than_the_stored_one_is_not_written(database_url, conn):
    add_workspace(conn, "newer", provider="good")
    add_cache(conn, "newer", stale_at=NOW - timedelta(minutes=1),
              refreshed_at=NOW + timedelta(hours=1), slots=OLD_SLOTS)
    add_stale(conn, "other", 1)
    before = cache_row(conn, "newer")

    summary = run(make_settings(database_url, concurrency=2),
                  make_runtime(database_url, providers={"good": provider_class(Recorder())},
                               clock=FakeClock(NOW)))

    assert cache_row(conn, "newer") == before
    assert summary.superseded == 1
    assert cache_row(conn, "other")["slots_utc"] == Recorder.expected_slots(NOW)


def test_a_failure_older_than_the_stored_success_does_not_set_last_error(database_url, conn):
    add_workspace(conn, "ws-1", provider="failing")
    add_cache(conn, "ws-1", stale_at=NOW - timedelta(minutes=1),
              refreshed_at=NOW + timedelta(hours=1), slots=OLD_SLOTS)
    before = cache_row(conn, "ws-1")

    summary = run(make_settings(database_url),
                  make_runtime(database_url,
                               providers={"failing": provider_class(failing("503"))},
                               clock=FakeClock(NOW)))

    assert summary.errors == 1
    assert cache_row(conn, "ws-1") == before


def test_an_abandoned_call_does_not_mark_a_success_stored_during_it_as_failed(
    database_url, conn, release
):
    add_stale(conn, "ws-1", 1, provider="cal")
    before = cache_row(conn, "ws-1")
    settings = make_settings(database_url, time_budget_ms=1000, deadline_margin_ms=0)
    manual_summaries: list[refresh.RunSummary] = []

    def manual_refresh_then_hang(request: FetchRequest) -> Any:
        # An engineer's `refresh --workspace` succeeds while the cron call is in flight.
        manual = make_runtime(database_url, providers={"cal": provider_class(Recorder())})
        manual_summaries.append(
            refresh.refresh_workspace(settings, manual, "ws-1", default_source=SOURCE)
        )
        release.wait()

    summary = run(settings, make_runtime(
        database_url, providers={"cal": provider_class(manual_refresh_then_hang)}))

    assert summary.unfinished == 1
    assert [s.success for s in manual_summaries] == [True]
    row = cache_row(conn, "ws-1")
    assert row["refreshed_at"] > before["refreshed_at"]
    # The abandoned call started before that success, so its timeout must not be
    # recorded on top of it.
    assert row["last_error"] is None
    assert row["consecutive_failures"] == 0


# --- providers that misbehave ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("garbage", "message"),
    [
        pytest.param(lambda r: [datetime(2026, 11, 29, 9, 0)], "naive datetime", id="naive"),
        pytest.param(lambda r: ["2026-11-29T09:00:00Z"], "a str where a datetime", id="strings"),
        pytest.param(
            lambda r: [r.window_start + timedelta(minutes=i) for i in range(50_000)],
            "more than 20000 slots",
            id="50000-slots",
        ),
    ],
)
def test_garbage_from_a_provider_is_a_per_workspace_error_that_keeps_the_good_slots(
    database_url, conn, garbage, message
):
    add_stale(conn, "garbage", 5, provider="garbage")
    add_missing(conn, "healthy", 1)
    before = cache_row(conn, "garbage")

    summary = run(make_settings(database_url),
                  make_runtime(database_url, clock=FakeClock(NOW), providers={
                      "garbage": provider_class(garbage), "good": provider_class(Recorder())}))

    assert (summary.success, summary.refreshed, summary.errors) == (True, 1, 1)
    row = cache_row(conn, "garbage")
    assert row["slots_utc"] == OLD_SLOTS == before["slots_utc"]
    assert row["refreshed_at"] == before["refreshed_at"]
    assert row["last_error"].startswith("[permanent]")
    assert message in row["last_error"]
    assert cache_row(conn, "healthy")["slots_utc"] == Recorder.expected_slots(NOW)


def test_an_unknown_provider_fails_only_its_workspace(database_url, conn):
    add_missing(conn, "unknown", 2, provider="no-such-provider")
    add_missing(conn, "healthy", 1)

    summary = run(make_settings(database_url),
                  make_runtime(database_url, providers={"good": provider_class(Recorder())},
                               clock=FakeClock(NOW)))

    assert (summary.success, summary.attempted, summary.refreshed, summary.errors) == (
        True, 2, 1, 1)
    row = cache_row(conn, "unknown")
    assert row["last_error"].startswith("[permanent] unknown provider 'no-such-provider'")
    assert row["refreshed_at"] is None and row["slots_utc"] is None
    assert cache_row(conn, "healthy")["refreshed_at"] is not None


# --- the lock and the dry run ---------------------------------------------------------------


def test_second_run_skips_when_lock_is_held(database_url, conn):
    add_missing(conn, "ws-1", 1)
    settings = make_settings(database_url)
    good = Recorder()

    with psycopg.connect(database_url, autocommit=True) as other:
        assert take_lock(other, settings.lock_key)
        summary = run(settings, make_runtime(database_url,
                                             providers={"good": provider_class(good)}))

        assert summary.success is True and summary.skipped is True
        assert summary.reason == "locked"
        assert summary.holder is not None
        assert summary.holder["pid"] == other.info.backend_pid
    assert summary.attempted == 0 and good.calls == []
    assert cache_row(conn, "ws-1") is None


def test_dry_run_reports_the_queue_in_plan_order_with_reasons(database_url, conn):
    add_missing(conn, "m-old", 3)
    add_missing(conn, "m-new", 1)
    add_stale(conn, "s-20", 20)
    add_stale(conn, "s-10", 10)
    add_workspace(conn, "s-30", provider="good")
    add_cache(conn, "s-30", stale_at=NOW - timedelta(minutes=30),
              refreshed_at=NOW - timedelta(hours=1), slots=OLD_SLOTS,
              consecutive_failures=2, last_error="[retryable] 503")
    add_workspace(conn, "not-due", provider="good")
    add_cache(conn, "not-due", stale_at=NOW + timedelta(minutes=5), refreshed_at=NOW)

    report = refresh.dry_run(make_settings(database_url, limit=5, missing_reserve=0.2),
                             make_runtime(database_url, clock=lambda: NOW),
                             default_source=SOURCE).as_json()

    assert [
        (e["position"], e["workspaceId"], e["reason"], e["overdueSeconds"],
         e["consecutiveFailures"])
        for e in report["queue"]
    ] == [
        (1, "m-old", "missing", 3 * 86_400.0, 0),
        (2, "s-30", "stale", 1_800.0, 2),
        (3, "s-20", "stale", 1_200.0, 0),
        (4, "s-10", "stale", 600.0, 0),
        (5, "m-new", "missing", 86_400.0, 0),
    ]
    assert (report["planned"], report["missingPlanned"], report["stalePlanned"],
            report["missingReserved"]) == (5, 2, 3, 1)
    assert report["lockHeld"] is False and report["holder"] is None


def test_dry_run_writes_nothing_and_leaves_the_lock_free(database_url, conn):
    add_missing(conn, "missing", 1)
    add_stale(conn, "stale", 10)
    settings = make_settings(database_url)
    before = dump(conn)
    good = Recorder()
    lock_free_mid_run: list[bool] = []

    def probing_clock() -> datetime:
        # Called by dry_run between its schema check and its plan queries.
        lock_free_mid_run.append(lock.find_holder(conn, settings.lock_key) is None)
        lock_free_mid_run.append(take_lock(conn, settings.lock_key))
        conn.execute("SELECT pg_advisory_unlock(%s)", (settings.lock_key,))
        return NOW

    report = refresh.dry_run(settings, make_runtime(database_url, clock=probing_clock,
                                                    providers={"good": provider_class(good)}),
                             default_source=SOURCE)

    assert lock_free_mid_run == [True, True]
    assert len(report.plan.queue) == 2
    assert good.calls == []
    assert dump(conn) == before
    assert lock.find_holder(conn, settings.lock_key) is None


def test_dry_run_reports_the_lock_held_by_another_session(database_url, conn):
    add_missing(conn, "missing", 1)
    settings = make_settings(database_url)
    before = dump(conn)

    with psycopg.connect(database_url, autocommit=True) as other:
        assert take_lock(other, settings.lock_key)
        report = refresh.dry_run(settings, make_runtime(database_url, clock=lambda: NOW),
                                 default_source=SOURCE).as_json()
        holder = lock.find_holder(conn, settings.lock_key)
        other_pid = other.info.backend_pid

    assert report["lockHeld"] is True
    assert report["holder"]["pid"] == other_pid
    assert [e["workspaceId"] for e in report["queue"]] == ["missing"]
    assert holder is not None and holder.pid == other_pid  # the dry run took nothing from it
    assert dump(conn) == before


# --- refresh --workspace --------------------------------------------------------------------


def test_refresh_workspace_refreshes_a_workspace_that_is_not_due(database_url, conn):
    add_workspace(conn, "ws-1", provider="good")
    add_cache(conn, "ws-1", stale_at=NOW + timedelta(minutes=10),
              refreshed_at=NOW - timedelta(seconds=5), slots=OLD_SLOTS)
    good = Recorder()

    summary = refresh.refresh_workspace(
        make_settings(database_url),
        make_runtime(database_url, providers={"good": provider_class(good)},
                     clock=FakeClock(NOW)),
        "ws-1", default_source=SOURCE)

    assert summary.success is True and summary.workspace == "ws-1"
    assert (summary.attempted, summary.refreshed) == (1, 1)
    assert good.calls == ["ws-1"]
    row = cache_row(conn, "ws-1")
    assert row["refreshed_at"] >= NOW
    assert row["slots_utc"] == Recorder.expected_slots(NOW)


def test_refresh_workspace_rejects_an_unknown_workspace(database_url, conn):
    with pytest.raises(ConfigError, match="no workspace 'ghost'"):
        refresh.refresh_workspace(make_settings(database_url), make_runtime(database_url),
                                  "ghost", default_source=SOURCE)


def test_refresh_workspace_rejects_a_disabled_workspace(database_url, conn):
    add_workspace(conn, "off", provider="good", enabled=False)
    good = Recorder()

    with pytest.raises(ConfigError, match="'off' is disabled"):
        refresh.refresh_workspace(
            make_settings(database_url),
            make_runtime(database_url, providers={"good": provider_class(good)}),
            "off", default_source=SOURCE)
    assert good.calls == []
    assert cache_row(conn, "off") is None


# --- schema and source ----------------------------------------------------------------------


def test_a_database_without_the_schema_asks_for_db_migrate(empty_database_url):
    with pytest.raises(errors.SchemaMissing, match="db migrate"):
        run(make_settings(empty_database_url), make_runtime(empty_database_url))


def test_a_custom_source_table_that_does_not_exist_is_a_config_error(database_url):
    with pytest.raises(ConfigError, match="'no_such_table'"):
        run(make_settings(database_url, source_table="no_such_table"),
            make_runtime(database_url))


@pytest.mark.parametrize("view", ["workspaces_v", "app.workspaces_v"])
def test_a_view_can_be_the_source_of_workspaces(database_url, conn, view):
    conn.execute("CREATE SCHEMA app")
    conn.execute(
        "CREATE TABLE app.tenants (id text PRIMARY KEY, calendar text NOT NULL,"
        " calendar_settings jsonb NOT NULL DEFAULT '{}', active boolean NOT NULL,"
        " joined timestamptz NOT NULL)"
    )
    conn.execute(
        sql.SQL(
            "CREATE VIEW {} AS SELECT id AS workspace_id, calendar AS provider,"
            " calendar_settings AS provider_config, active AS enabled, joined AS created_at"
            " FROM app.tenants"
        ).format(sql.Identifier(*view.split(".")))
    )
    conn.execute(
        "INSERT INTO app.tenants VALUES ('t-on', 'good', '{}', true, %(at)s),"
        " ('t-off', 'good', '{}', false, %(at)s)",
        {"at": NOW - timedelta(days=1)},
    )
    good = Recorder()

    summary = run(make_settings(database_url, source_table=view),
                  make_runtime(database_url, providers={"good": provider_class(good)},
                               clock=FakeClock(NOW)))

    assert good.calls == ["t-on"]
    assert summary.refreshed == 1
    assert cache_row(conn, "t-on")["slots_utc"] == Recorder.expected_slots(NOW)
    assert cache_row(conn, "t-off") is None


# --- deleted and reused workspaces ------------------------------------------------------------


def run_simulated(database_url: str, **settings: Any) -> refresh.RunSummary:
    return refresh.run_refresh(make_settings(database_url, **settings),
                               make_runtime(database_url), default_source=SOURCE)


def test_a_run_prunes_the_cache_rows_of_workspaces_gone_from_the_source(database_url, conn):
    add_workspace(conn, "ws-kept")
    add_workspace(conn, "ws-disabled", enabled=False)
    for workspace in ("ws-kept", "ws-disabled", "gone-1", "gone-2"):
        add_cache(conn, workspace, stale_at=NOW + timedelta(days=1), refreshed_at=NOW,
                  slots=OLD_SLOTS)

    summary = run_simulated(database_url)

    assert summary.success and summary.as_json()["prunedCaches"] == 2
    kept = conn.execute("SELECT workspace_id FROM workspace_availability_cache"
                        " ORDER BY workspace_id").fetchall()
    assert kept == [("ws-disabled",), ("ws-kept",)]  # a disabled workspace is not gone


def test_orphan_cache_rows_are_pruned_in_bounded_batches(database_url, conn, monkeypatch):
    monkeypatch.setattr(refresh, "ORPHAN_PRUNE_BATCH", 2)
    add_workspace(conn, "ws-kept")
    for i in range(5):
        add_cache(conn, f"gone-{i}", stale_at=NOW, refreshed_at=NOW, slots=OLD_SLOTS)

    pruned = [run_simulated(database_url).as_json()["prunedCaches"] for _ in range(4)]

    assert pruned == [2, 2, 1, 0]


def test_an_empty_source_prunes_nothing(database_url, conn):
    # A view that suddenly yields nothing is more likely broken than every tenant gone.
    add_cache(conn, "ws-1", stale_at=NOW, refreshed_at=NOW, slots=OLD_SLOTS)

    summary = run_simulated(database_url)

    assert summary.as_json()["prunedCaches"] == 0
    assert cache_row(conn, "ws-1") is not None


@pytest.mark.parametrize("fails", [False, True], ids=["success", "failure"])
@pytest.mark.parametrize("cached", [False, True], ids=["missing", "stale"])
def test_a_workspace_deleted_mid_run_gets_no_cache_row_back(database_url, conn, fails, cached):
    def delete_then_answer(request: FetchRequest) -> Any:
        with psycopg.connect(database_url, autocommit=True) as app:
            app.execute("DELETE FROM availability_workspaces WHERE workspace_id = %s",
                        (request.workspace_id,))
            app.execute("DELETE FROM workspace_availability_cache WHERE workspace_id = %s",
                        (request.workspace_id,))
        if fails:
            raise RetryableProviderError("upstream is down")
        return [request.window_start + timedelta(hours=1)]

    add_workspace(conn, "ws-deleted", provider="test")
    if cached:
        add_cache(conn, "ws-deleted", stale_at=NOW - timedelta(minutes=1),
                  refreshed_at=NOW - timedelta(minutes=2), slots=OLD_SLOTS)

    summary = refresh.run_refresh(
        make_settings(database_url),
        make_runtime(database_url, providers={"test": provider_class(delete_then_answer)},
                     clock=FakeClock(NOW)),
        default_source=SOURCE)

    assert summary.success and summary.attempted == 1
    assert cache_row(conn, "ws-deleted") is None


def reuse(conn: psycopg.Connection[Any], workspace_id: str, **fields: Any) -> None:
    """Delete ``workspace_id`` and create a new workspace with the same id, created now."""
    conn.execute("DELETE FROM availability_workspaces WHERE workspace_id = %s", (workspace_id,))
    add_workspace(conn, workspace_id, created_at=datetime.now(UTC), **fields)


def test_a_reused_workspace_id_is_planned_as_missing_despite_the_old_tenants_fresh_cache(
    database_url, conn
):
    add_workspace(conn, "acme", created_at=datetime.now(UTC) - timedelta(days=10))
    assert run_simulated(database_url).refreshed == 1  # the old tenant's fresh cache
    reuse(conn, "acme", config={"slots_per_day": 1})

    summary = run_simulated(database_url)

    assert (summary.missing_attempted, summary.refreshed) == (1, 1)
    row = cache_row(conn, "acme")
    assert row["workspace_created_at"] > datetime.now(UTC) - timedelta(minutes=5)
    assert len(row["slots_utc"]) <= 31  # the new tenant's one slot a day (8 before)


def test_the_first_failure_of_a_reused_workspace_id_drops_the_old_tenants_slots(
    database_url, conn
):
    add_workspace(conn, "acme", created_at=datetime.now(UTC) - timedelta(days=10))
    assert run_simulated(database_url).refreshed == 1
    conn.execute("UPDATE workspace_availability_cache SET consecutive_failures = 4")
    reuse(conn, "acme", config={"fail": "new tenant's calendar is not shared yet"})

    summary = run_simulated(database_url)

    assert summary.errors == 1
    row = cache_row(conn, "acme")
    assert row["slots_utc"] is None and row["refreshed_at"] is None
    assert row["range_start"] is None and row["slot_count"] is None
    assert row["consecutive_failures"] == 1
    assert "not shared yet" in row["last_error"]
