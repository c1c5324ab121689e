"""Failures found in review: each must stay a per-workspace error or end the run in time."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from datetime import datetime

import psycopg
import pytest
from helpers import (
    add_cache,
    add_run,
    add_workspace,
    cache_row,
    clean_env,
    make_runtime,
    make_settings,
    run_cli,
)

from availability_cron import errors, lock
from availability_cron.providers import FetchRequest, Provider, RetryableProviderError
from availability_cron.refresh import GRACE_SECONDS, _skipped, refresh_workspace, run_refresh

SOURCE = "availability_workspaces"


class NulProvider(Provider):
    name = "nul"

    def fetch(self, request: FetchRequest) -> Iterable[datetime]:
        raise RetryableProviderError("upstream\x00broken\x07 badly")


def test_a_provider_error_with_a_nul_byte_is_stored_cleaned_and_the_run_succeeds(
    database_url, conn
):
    add_workspace(conn, "ws-nul", provider="nul")
    add_workspace(conn, "ws-ok")
    summary = run_refresh(make_settings(database_url),
                          make_runtime(database_url, providers={"nul": NulProvider}),
                          default_source=SOURCE)
    assert summary.success and summary.refreshed == 1 and summary.errors == 1
    row = cache_row(conn, "ws-nul")
    assert row is not None
    assert row["last_error"] == "[retryable] upstream broken badly"


@pytest.fixture
def release() -> Iterator[threading.Event]:
    event = threading.Event()
    yield event
    event.set()


def test_a_provider_whose_constructor_hangs_blocks_only_its_own_workspaces(
    database_url, conn, release
):
    class Wedged(Provider):
        name = "wedged"

        def __init__(self, context):  # a plugin fetching a token with no timeout
            release.wait()
            super().__init__(context)

        def fetch(self, request: FetchRequest) -> Iterable[datetime]:
            return []

    add_workspace(conn, "ws-a-wedged", provider="wedged")
    for i in range(4):
        add_workspace(conn, f"ws-ok-{i}")
    settings = make_settings(database_url, time_budget_ms=2000, deadline_margin_ms=500,
                             concurrency=2)
    started = time.monotonic()
    summary = run_refresh(settings, make_runtime(database_url, providers={"wedged": Wedged}),
                          default_source=SOURCE)
    elapsed = time.monotonic() - started
    assert summary.refreshed == 4, summary
    assert summary.unfinished == 1
    # budget + grace + at most the bounded close, with slack for a noisy machine
    assert elapsed < 2 + GRACE_SECONDS + 2 + 3, elapsed
    assert lock.find_holder(conn, settings.lock_key) is None


def test_a_row_lock_held_by_the_app_cannot_keep_the_run_past_its_budget(
    database_url, conn, server_url
):
    add_workspace(conn, "ws-1")
    add_cache(conn, "ws-1", stale_at=datetime(2020, 1, 1).astimezone())
    blocker = psycopg.connect(database_url)  # an app transaction holding the row
    try:
        blocker.execute(
            "SELECT 1 FROM workspace_availability_cache WHERE workspace_id = 'ws-1' FOR UPDATE"
        )
        settings = make_settings(database_url, time_budget_ms=2000, deadline_margin_ms=500)
        started = time.monotonic()
        with pytest.raises(errors.DatabaseError, match="time budget") as info:
            run_refresh(settings, make_runtime(database_url), default_source=SOURCE)
        elapsed = time.monotonic() - started
    finally:
        blocker.rollback()
        blocker.close()
    assert elapsed < 2 + GRACE_SECONDS + 3, elapsed
    assert lock.find_holder(conn, settings.lock_key) is None
    # The failure summary still counts what was attempted.
    assert info.value.summary is not None and info.value.summary.attempted == 1


def test_idle_session_timeout_on_the_server_does_not_kill_a_slow_run(
    database_url, conn, server_url
):
    if conn.info.server_version < 140000:
        pytest.skip("idle_session_timeout needs PostgreSQL 14")
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(psycopg.sql.SQL("ALTER DATABASE {} SET idle_session_timeout = '1s'").format(
            psycopg.sql.Identifier(conn.info.dbname)))
    add_workspace(conn, "ws-slow", config={"latency_ms": 2500})
    summary = run_refresh(make_settings(database_url, time_budget_ms=8000,
                                        deadline_margin_ms=1000),
                          make_runtime(database_url), default_source=SOURCE)
    assert summary.success and summary.refreshed == 1


def test_a_lock_holder_older_than_any_run_could_be_is_reported_as_stuck(database_url):
    settings = make_settings(database_url, time_budget_ms=45000)
    runtime = make_runtime(database_url)
    young = lock.LockHolder(4242, "availability-cron lock run=x", None, 30.0, "idle", None, True)
    old = lock.LockHolder(4242, "availability-cron lock run=x", None, 3600.0, "idle", None, True)
    assert _skipped(settings, runtime, young).success is True
    stuck = _skipped(settings, runtime, old)
    assert stuck.success is False and stuck.skipped is True and stuck.reason == "lock-stuck"
    assert "pg_terminate_backend(4242)" in (stuck.error or "")
    invisible = lock.LockHolder(4242, None, None, None, None, None, False)
    assert _skipped(settings, runtime, invisible).success is True


def test_the_lock_age_counts_from_the_runs_start_not_from_an_older_pooled_session(
    database_url, conn
):
    # A session-mode pooler hands a run a server session that may be an hour old: its
    # age must not make a healthy run look stuck (or get it terminated).
    from availability_cron.lock import run_started_at, run_uuid

    key = lock.lock_key("age-test")
    with psycopg.connect(database_url, autocommit=True) as pooled:
        time.sleep(2.5)  # the server session is now 2.5 s old; the run starts now
        run_id = run_uuid(time.time_ns() // 1_000_000, 12345).hex[:12]
        name = f"availability-cron lock run={run_id} pid=4242 host=testhost"
        pooled.execute("SELECT set_config('application_name', %s, false)", (name,))
        with lock.take(pooled, key) as taken:
            assert taken is not None
            seen = lock.find_holder(conn, key)
            assert seen is not None and seen.held_for_seconds is not None
            assert seen.held_for_seconds < 1.5, seen.held_for_seconds
            run = seen.run()
            assert run is not None and run["runId"] == run_id
            assert run["osPid"] == 4242 and run["host"] == "testhost"
            assert run["runStartedAt"] is not None
    # A holder that is not one of our runs gets its session's age.
    with psycopg.connect(database_url, autocommit=True, application_name="psql") as other:
        time.sleep(1.2)
        other.execute("SELECT pg_advisory_lock(%s)", (key,))
        seen = lock.find_holder(conn, key)
        assert seen is not None and seen.held_for_seconds is not None
        assert seen.held_for_seconds >= 1.2
    # Old-style random run ids decode to nonsense dates and are ignored.
    assert run_started_at("ffffffffffff") is None
    assert run_started_at("not-a-run-id") is None


def test_run_ids_are_uuid7_prefixes_carrying_the_run_start():
    from availability_cron.lock import run_started_at, run_uuid

    ms = 1_795_907_256_789
    value = run_uuid(ms, (1 << 74) - 1)
    assert value.version == 7 and value.variant == "specified in RFC 4122"
    started = run_started_at(value.hex[:12])
    assert started is not None and int(started.timestamp() * 1000) == ms


# --- database and role settings the job must not depend on (issue 8) ------------------------


def alter_database(server_url: str, dbname: str, setting: str, value: str) -> None:
    """ALTER DATABASE ... SET, as a DBA would: every new session of it starts with it."""
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(psycopg.sql.SQL("ALTER DATABASE {} SET {} = {}").format(
            psycopg.sql.Identifier(dbname), psycopg.sql.Identifier(setting),
            psycopg.sql.Literal(value)))


@pytest.mark.parametrize("datestyle", ["German, DMY", "SQL, DMY"])
def test_a_non_iso_datestyle_on_the_database_changes_nothing_the_job_reads(
    database_url, conn, server_url, datestyle
):
    from availability_cron import db, metrics, readers, show
    from availability_cron.refresh import dry_run

    add_workspace(conn, "ws-due")
    add_cache(conn, "ws-due", stale_at=datetime(2020, 1, 1).astimezone(),
              refreshed_at=datetime(2019, 12, 31).astimezone())
    add_workspace(conn, "ws-new")
    add_run(conn, started_at=datetime.now().astimezone(), refreshed=1)
    alter_database(server_url, conn.info.dbname, "DateStyle", datestyle)
    alter_database(server_url, conn.info.dbname, "IntervalStyle", "sql_standard")
    settings = make_settings(database_url)
    runtime = make_runtime(database_url)

    planned = dry_run(settings, runtime, default_source=SOURCE)
    assert [item.workspace_id for item in planned.plan.queue] == ["ws-new", "ws-due"]
    # A run's lock holder (backend_start) is read too, by dry-run and `lock status`.
    with psycopg.connect(database_url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (settings.lock_key,))
        with db.connect(database_url, application_name="t", secrets=[]) as fresh:
            assert fresh.execute("SHOW DateStyle").fetchone() == (datestyle,)
            status = lock.status(fresh, settings.lock_name, now=datetime.now().astimezone())
            assert status.holder is not None and status.holder.backend_start is not None
    summary = run_refresh(settings, runtime, default_source=SOURCE)
    assert summary.success and summary.refreshed == 2, summary
    one = refresh_workspace(settings, runtime, "ws-due", default_source=SOURCE)
    assert one.success and one.refreshed == 1, one
    with db.connect(database_url, application_name="t", secrets=[]) as fresh:
        now = datetime.now().astimezone()
        report = metrics.staleness(fresh, SOURCE, now)
        assert report.caches == 2 and report.runs.runs_24h == 1
        assert report.runs.last_completed_run_at is not None
        assert report.oldest_success_age_seconds is not None
        assert len(metrics.workspace_staleness(fresh, SOURCE, now)) == 2
        view = show.describe(fresh, SOURCE, "ws-due", now=now, environ={}, secrets=[])
        assert view.as_json()["cache"] is not None
        assert db.server_identity(fresh).server_started_at.tzinfo is not None
        # The app-side reader too: apps on European installations read the cache with it.
        cache = readers.get_cache(fresh, "ws-due")
        assert cache is not None and cache.refreshed_at is not None


class CountingProvider(Provider):
    """Counts its calls; every call succeeds with no slots."""

    name = "counting"
    calls = 0

    def fetch(self, request: FetchRequest) -> Iterable[datetime]:
        type(self).calls += 1
        return []


@pytest.mark.parametrize("scope", ["DATABASE", "ROLE"])
def test_a_read_only_default_is_refused_before_any_provider_is_called_naming_the_setting(
    database_url, conn, server_url, scope
):
    add_workspace(conn, "ws-1", provider="counting")
    role = None
    if scope == "DATABASE":
        alter_database(server_url, conn.info.dbname, "default_transaction_read_only", "on")
        url = database_url
    else:  # the role the job connects as; the database stays writable for others
        role = f"avc_ro_{conn.info.backend_pid}"
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(psycopg.sql.SQL(
                "CREATE ROLE {0} LOGIN SUPERUSER; ALTER ROLE {0} SET "
                "default_transaction_read_only = on").format(psycopg.sql.Identifier(role)))
        url = psycopg.conninfo.make_conninfo(database_url, user=role)
    CountingProvider.calls = 0
    try:
        with pytest.raises(errors.ReadOnlySession) as info:
            run_refresh(make_settings(url),
                        make_runtime(url, providers={"counting": CountingProvider}),
                        default_source=SOURCE)
        with pytest.raises(errors.ReadOnlySession):
            refresh_workspace(make_settings(url),
                              make_runtime(url, providers={"counting": CountingProvider}),
                              "ws-1", default_source=SOURCE)
    finally:
        if role is not None:
            with psycopg.connect(server_url, autocommit=True) as admin:
                admin.execute(psycopg.sql.SQL("DROP ROLE {}").format(
                    psycopg.sql.Identifier(role)))
    assert CountingProvider.calls == 0
    message = info.value.message
    assert "default_transaction_read_only" in message
    assert ("ALTER DATABASE" if scope == "DATABASE" else "ALTER ROLE") in message
    assert "standby" not in message


def test_a_run_on_a_read_only_database_exits_1_naming_the_setting(
    database_url, conn, server_url
):
    add_workspace(conn, "ws-1")
    alter_database(server_url, conn.info.dbname, "default_transaction_read_only", "on")
    result = run_cli("refresh", env=clean_env(DATABASE_URL=database_url))
    assert result.returncode == 1, result
    assert result.json()["attempted"] == 0
    assert "default_transaction_read_only" in result.stderr
    migrate = run_cli("db", "migrate", env=clean_env(DATABASE_URL=database_url))
    assert migrate.returncode == 1 and "default_transaction_read_only" in migrate.stderr
