"""One bad source row is that row's problem, never every tenant's.

A view may yield NULL keys, and provider_config is written by tenants: a config nested
hundreds of levels deep, megabytes large or not an object is accepted by PostgreSQL. Such
a row must neither fail the run (nor ``show``, ``refresh --workspace``, ``metrics``) nor
take slots of the limit from good rows; a bad config must never reach Python memory.
Every test runs against a real PostgreSQL.
"""

from __future__ import annotations

import hashlib
import logging
import tracemalloc
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from helpers import (
    NOW,
    FakeClock,
    add_cache,
    add_workspace,
    cache_row,
    clean_env,
    make_runtime,
    make_settings,
    run_cli,
)
from psycopg import sql

from availability_cron import metrics, refresh, source
from availability_cron.providers import (
    FetchRequest,
    Provider,
    ProviderContext,
    ProviderRegistry,
    RetryableProviderError,
)

SOURCE = "availability_workspaces"
VIEW = "tenants_v"
SLOTS = ["2026-11-29T09:00:00Z"]
TTL = timedelta(milliseconds=60_000)


class Good(Provider):
    """Answers one slot an hour into the window, and records whom it was asked for."""

    name = "good"
    calls: list[str] = []

    def fetch(self, request: FetchRequest) -> Any:
        Good.calls.append(request.workspace_id)
        return [request.window_start + timedelta(hours=1)]


@pytest.fixture(autouse=True)
def _reset_calls() -> None:
    Good.calls = []


@pytest.fixture
def view(conn: psycopg.Connection[Any]) -> str:
    """A source view over an app table whose columns may all be NULL."""
    conn.execute("CREATE TABLE tenants (id text, calendar text, settings jsonb,"
                 " active boolean, joined timestamptz)")
    conn.execute(sql.SQL("CREATE VIEW {} AS SELECT id AS workspace_id, calendar AS provider,"
                         " settings AS provider_config, active AS enabled,"
                         " joined AS created_at FROM tenants").format(sql.Identifier(VIEW)))
    return VIEW


def add_tenant(conn: psycopg.Connection[Any], tenant_id: str | None, *,
               days_old: float | None = 1, provider: str | None = "good") -> None:
    """A row of the view's table; ``days_old=None`` is a NULL created_at."""
    conn.execute(
        "INSERT INTO tenants VALUES (%s, %s, '{}', true, %s)",
        (tenant_id, provider, None if days_old is None else NOW - timedelta(days=days_old)),
    )


def nested(depth: int) -> str:
    """JSON text of objects nested ``depth`` levels deep: {"a": {"a": ... 1}}."""
    return '{"a": ' * depth + "1" + "}" * depth


def add_config_sql(conn: psycopg.Connection[Any], workspace_id: str, config_sql: str,
                   *, cache: bool = False) -> None:
    """A workspace whose provider_config is computed by PostgreSQL (``config_sql``)."""
    add_workspace(conn, workspace_id, provider="good", created_at=NOW - timedelta(days=2))
    conn.execute(
        sql.SQL("UPDATE availability_workspaces SET provider_config = ({})"
                " WHERE workspace_id = %s").format(sql.SQL(config_sql)), (workspace_id,))
    if cache:
        add_cache(conn, workspace_id, stale_at=NOW - timedelta(minutes=5),
                  refreshed_at=NOW - timedelta(minutes=6), slots=SLOTS)


def run(database_url: str, source_table: str = SOURCE, **settings: Any) -> refresh.RunSummary:
    return refresh.run_refresh(
        make_settings(database_url, source_table=source_table, **settings),
        make_runtime(database_url, providers={"good": Good}, clock=FakeClock(NOW)),
        default_source=SOURCE,
    )


# --- NULL keys in the source ----------------------------------------------------------------


def test_a_null_workspace_id_is_skipped_and_the_batch_with_good_rows_is_written(
    database_url, conn, view
):
    add_tenant(conn, None, days_old=3)
    add_tenant(conn, "t-1", days_old=2)
    add_tenant(conn, "t-2", days_old=1)

    summary = run(database_url, view)

    assert summary.success and summary.error is None
    assert sorted(Good.calls) == ["t-1", "t-2"]
    assert summary.refreshed == 2 and summary.errors == 0
    assert summary.as_json()["invalidSourceRows"] == 1
    assert cache_row(conn, "t-1")["refreshed_at"] is not None
    assert cache_row(conn, "t-2")["refreshed_at"] is not None


def test_a_null_created_at_is_planned_after_every_dated_workspace(database_url, conn, view):
    add_tenant(conn, "t-undated", days_old=None)
    add_tenant(conn, "a-undated", days_old=None)
    add_tenant(conn, "t-1", days_old=2)

    summary = run(database_url, view, concurrency=1)

    assert summary.success and summary.error is None
    assert Good.calls == ["t-1", "a-undated", "t-undated"]  # undated ones by id
    assert summary.refreshed == 3
    assert summary.as_json()["invalidSourceRows"] == 2
    assert cache_row(conn, "t-undated")["refreshed_at"] is not None


def test_plan_puts_missing_workspaces_without_created_at_last_by_id():
    def missing(workspace_id: str, created_at: Any) -> refresh.MissingWorkspace:
        return refresh.MissingWorkspace(workspace_id, "good", {}, created_at)

    the_plan = refresh.plan(
        [], [missing("z-undated", None), missing("new", NOW - timedelta(days=1)),
             missing("a-undated", None), missing("old", NOW - timedelta(days=9))],
        limit=10, reserve=0.2, now=NOW)

    assert [i.workspace_id for i in the_plan.queue] == ["old", "new", "a-undated", "z-undated"]
    assert the_plan.queue[2].due_since == NOW


def test_a_null_created_at_takes_no_slot_a_dated_workspace_needs(database_url, conn, view):
    add_tenant(conn, "a-undated", days_old=None)
    add_tenant(conn, "t-1", days_old=2)

    summary = run(database_url, view, limit=1)

    assert Good.calls == ["t-1"]
    assert summary.as_json()["invalidSourceRows"] == 1


def test_a_null_created_at_of_a_workspace_with_a_cache_row_does_not_stop_its_refresh(
    database_url, conn, view
):
    add_tenant(conn, "t-undated", days_old=None)
    add_cache(conn, "t-undated", stale_at=NOW - timedelta(minutes=1),
              refreshed_at=NOW - timedelta(minutes=2), slots=SLOTS)

    summary = run(database_url, view)

    assert Good.calls == ["t-undated"]
    assert summary.as_json()["invalidSourceRows"] == 0


def test_a_workspace_id_too_long_for_the_cache_index_is_skipped_without_failing_the_run(
    database_url, conn, view
):
    # A btree entry holds at most ~2,700 bytes, after compression: make it incompressible.
    too_long = "t-" + "".join(hashlib.sha256(bytes([i])).hexdigest() for i in range(50))
    add_tenant(conn, too_long, days_old=3)
    add_tenant(conn, "t-1", days_old=2)

    summary = run(database_url, view)

    assert summary.success and summary.error is None
    assert Good.calls == ["t-1"] and summary.refreshed == 1
    assert summary.as_json()["invalidSourceRows"] == 1


def test_invalid_source_rows_take_no_slot_of_the_limit(database_url, conn, view):
    for i in range(3):  # the oldest rows of all: first in line if they were planned
        add_tenant(conn, None, days_old=30 + i)
    add_tenant(conn, "t-old", days_old=2)
    add_tenant(conn, "t-new", days_old=1)

    summary = run(database_url, view, limit=2, concurrency=1)

    assert Good.calls == ["t-old", "t-new"]
    assert summary.planned == 2 and summary.refreshed == 2
    assert summary.as_json()["invalidSourceRows"] == 3


def test_one_warning_per_run_names_the_invalid_rows(database_url, conn, view, caplog):
    add_tenant(conn, None)
    add_tenant(conn, None)
    add_tenant(conn, "t-undated", days_old=None)
    add_tenant(conn, "t-1")

    with caplog.at_level(logging.WARNING, logger="availability_cron"):
        run(database_url, view)

    [warning] = [r for r in caplog.records if "source" in r.getMessage()]
    message = warning.getMessage()
    assert warning.levelno == logging.WARNING
    assert f"source relation {VIEW}: 3 rows breaking the data contract" in message
    assert "skipped 2 with a NULL workspace_id" in message
    assert "planned after every dated workspace: 1 with a NULL created_at" in message
    assert "'t-undated'" in message


def test_a_null_provider_is_that_workspaces_permanent_error(database_url, conn, view):
    add_tenant(conn, "t-no-provider", provider=None)
    add_tenant(conn, "t-1")

    summary = run(database_url, view)

    assert summary.success and summary.errors == 1 and summary.refreshed == 1
    row = cache_row(conn, "t-no-provider")
    assert row["last_error"] == "[permanent] provider is NULL in the source"
    assert row["consecutive_failures"] == 1 and row["stale_at"] > NOW


def test_a_dry_run_counts_invalid_rows_and_queues_only_those_it_can(database_url, conn, view):
    add_tenant(conn, None)
    add_tenant(conn, "t-undated", days_old=None)
    add_tenant(conn, "t-1")

    report = refresh.dry_run(make_settings(database_url, source_table=view),
                             make_runtime(database_url, clock=FakeClock(NOW)),
                             default_source=SOURCE).as_json()

    assert report["invalidSourceRows"] == 2
    assert [q["workspaceId"] for q in report["queue"]] == ["t-1", "t-undated"]
    assert report["queue"][1]["overdueSeconds"] == 0  # no created_at to be overdue since


@pytest.mark.e2e
def test_the_cron_run_with_a_null_workspace_id_exits_0_and_says_so(database_url, conn, view):
    add_tenant(conn, None)
    add_tenant(conn, "t-1", provider="simulated")
    env = clean_env(DATABASE_URL=database_url, AVAILABILITY_CRON_SOURCE_TABLE=view)

    result = run_cli("refresh", env=env)

    assert result.returncode == 0, result.stderr
    summary = result.json()
    assert (summary["refreshed"], summary["invalidSourceRows"]) == (1, 1)
    [warning] = [line for line in result.stderr.splitlines() if " WARNING " in line]
    assert f"source relation {view}: 1 row breaking the data contract" in warning
    assert "skipped 1 with a NULL workspace_id" in warning

    table = run_cli("refresh", "--dry-run", "--format", "table", env=env)
    assert table.returncode == 0, table.stderr
    assert "invalid source rows: 1 (see the log)" in table.stdout


def test_metrics_count_no_row_without_a_workspace_id_as_a_workspace(conn, view):
    add_tenant(conn, None)
    add_tenant(conn, "t-undated", days_old=None)
    add_tenant(conn, "t-" + "x" * source.MAX_WORKSPACE_ID_BYTES, days_old=None)
    add_tenant(conn, "t-1")
    add_cache(conn, "t-1", stale_at=NOW + timedelta(minutes=1),
              refreshed_at=NOW - timedelta(minutes=1), slots=SLOTS)

    got = metrics.staleness(conn, view, NOW).as_json()

    assert {k: got[k] for k in ("workspaces", "caches", "missingCaches", "neverSucceeded",
                                "invalidSourceRows")} == {
        "workspaces": 3,  # t-undated, t-xxx..., t-1: a row without an id is no workspace
        "caches": 1,
        "missingCaches": 2,  # t-undated, t-xxx...: enabled, never refreshed
        "neverSucceeded": 2,
        "invalidSourceRows": 3,  # the NULL id, t-undated, t-xxx...
    }
    assert got["oldestNeverSucceededAgeMinutes"] is None  # neither has a created_at
    assert [w.workspace_id for w in metrics.workspace_staleness(conn, view, NOW)] == ["t-1"]


def test_prometheus_metrics_carry_the_invalid_source_rows(conn, view):
    add_tenant(conn, None)

    text = metrics.render_prometheus(metrics.staleness(conn, view, NOW))

    assert "\navailability_cron_invalid_source_rows 1\n" in text


# --- duplicate workspace ids (a join gone wrong) -----------------------------------------------


class Failing(Provider):
    """Always fails (retryable), and records whom it was asked for."""

    name = "failing"
    calls: list[str] = []

    def fetch(self, request: FetchRequest) -> Any:
        Failing.calls.append(request.workspace_id)
        raise RetryableProviderError("upstream is down")


def test_a_duplicated_missing_workspace_is_called_once_and_takes_one_slot_of_the_limit(
    database_url, conn, view
):
    add_tenant(conn, "t-dup", days_old=3)
    add_tenant(conn, "t-dup", days_old=3)
    add_tenant(conn, "t-next", days_old=2)

    summary = run(database_url, view, limit=2, concurrency=1)

    assert Good.calls == ["t-dup", "t-next"]
    assert summary.planned == 2 and summary.refreshed == 2 and summary.superseded == 0


def test_a_duplicated_due_workspace_is_called_once_and_its_failures_count_once(
    database_url, conn, view
):
    Failing.calls = []
    for _ in range(2):
        add_tenant(conn, "t-dup", provider="failing")
    add_cache(conn, "t-dup", stale_at=NOW - timedelta(minutes=5),
              refreshed_at=NOW - timedelta(minutes=6), slots=SLOTS, consecutive_failures=2)

    summary = refresh.run_refresh(
        make_settings(database_url, source_table=view),
        make_runtime(database_url, providers={"failing": Failing}, clock=FakeClock(NOW)),
        default_source=SOURCE,
    )

    assert Failing.calls == ["t-dup"]
    assert (summary.planned, summary.errors) == (1, 1)
    assert cache_row(conn, "t-dup")["consecutive_failures"] == 3


def test_duplicates_pick_the_enabled_row_created_last(database_url, conn, view):
    conn.execute("INSERT INTO tenants VALUES ('t-dup', 'nonesuch', '{}', true, %s),"
                 " ('t-dup', 'good', '{}', true, %s), ('t-dup', 'nonesuch', '{}', false, %s)",
                 (NOW - timedelta(days=3), NOW - timedelta(days=2), NOW - timedelta(days=1)))

    summary = run(database_url, view)

    assert Good.calls == ["t-dup"]
    assert (summary.planned, summary.refreshed, summary.errors) == (1, 1, 0)


def test_one_warning_per_run_names_the_duplicated_ids_and_counts_them_once(
    database_url, conn, view, caplog
):
    for tenant, copies in (("t-a", 3), ("t-b", 2), ("t-1", 1)):
        for _ in range(copies):
            add_tenant(conn, tenant)

    with caplog.at_level(logging.WARNING, logger="availability_cron"):
        summary = run(database_url, view)

    assert sorted(Good.calls) == ["t-1", "t-a", "t-b"]
    assert summary.as_json()["invalidSourceRows"] == 3  # the rows beyond the one used
    [warning] = [r for r in caplog.records if "source" in r.getMessage()]
    assert "ignored 3 duplicate rows of 2 workspace ids ('t-a', 't-b')" in warning.getMessage()


def test_metrics_count_a_duplicated_workspace_once(conn, view):
    for _ in range(3):
        add_tenant(conn, "t-dup")
    add_tenant(conn, "t-1")
    add_tenant(conn, "t-2")
    for tenant in ("t-dup", "t-1"):
        add_cache(conn, tenant, stale_at=NOW - timedelta(minutes=1),
                  refreshed_at=NOW - timedelta(minutes=2), slots=SLOTS)

    got = metrics.staleness(conn, view, NOW).as_json()

    assert {k: got[k] for k in ("workspaces", "caches", "missingCaches", "staleDue",
                                "invalidSourceRows")} == {
        "workspaces": 3, "caches": 2, "missingCaches": 1, "staleDue": 2,
        "invalidSourceRows": 2,
    }
    assert [w.workspace_id for w in metrics.workspace_staleness(conn, view, NOW)] == [
        "t-1", "t-dup"]


def test_show_and_refresh_workspace_of_a_duplicated_id_use_the_row_created_last(
    database_url, conn, view
):
    conn.execute("INSERT INTO tenants VALUES ('t-dup', 'nonesuch', '{}', true, %s),"
                 " ('t-dup', 'good', '{}', true, %s)",
                 (NOW - timedelta(days=3), NOW - timedelta(days=2)))
    conn.execute("INSERT INTO tenants VALUES ('t-dup', 'nonesuch', '{}', true, %s)",
                 (NOW - timedelta(days=4),))

    summary = refresh.refresh_workspace(
        make_settings(database_url, source_table=view),
        make_runtime(database_url, providers={"good": Good}, clock=FakeClock(NOW)),
        "t-dup", default_source=SOURCE)

    assert summary.success and Good.calls == ["t-dup"]
    env = clean_env(DATABASE_URL=database_url, AVAILABILITY_CRON_SOURCE_TABLE=view)
    shown = run_cli("show", "t-dup", "--format", "json", env=env)
    assert shown.returncode == 0, shown.stderr
    assert shown.json()["source"]["provider"] == "good"


# --- provider_config over the caps ------------------------------------------------------------


DEEP = nested(980)  # PostgreSQL accepts it; Python's json recursion does not


@pytest.mark.parametrize("cache", [False, True], ids=["missing", "stale"])
def test_a_deeply_nested_config_is_that_workspaces_permanent_error(database_url, conn, cache):
    add_config_sql(conn, "deep", f"'{DEEP}'::jsonb", cache=cache)
    add_workspace(conn, "ok", provider="good", created_at=NOW - timedelta(days=1))

    summary = run(database_url)

    assert summary.success and summary.error is None
    assert Good.calls == ["ok"]
    assert (summary.refreshed, summary.errors) == (1, 1)
    row = cache_row(conn, "deep")
    assert row["last_error"] == (
        f"[permanent] provider_config is nested more than {source.MAX_CONFIG_DEPTH} levels deep")
    assert row["consecutive_failures"] == 1
    assert row["stale_at"] > NOW + TTL / 2  # backed off like any failure


def test_a_config_nested_exactly_to_the_cap_is_used_and_one_level_more_is_not(
    database_url, conn
):
    add_config_sql(conn, "at-cap", f"'{nested(source.MAX_CONFIG_DEPTH)}'::jsonb")
    add_config_sql(conn, "over-cap", f"'{nested(source.MAX_CONFIG_DEPTH + 1)}'::jsonb")
    add_config_sql(conn, "deep-array",
                   f"'{{\"a\": {'[' * source.MAX_CONFIG_DEPTH}{']' * source.MAX_CONFIG_DEPTH}}}'"
                   "::jsonb")

    run(database_url)

    assert Good.calls == ["at-cap"]
    assert cache_row(conn, "at-cap")["last_error"] is None
    assert "nested more than" in cache_row(conn, "over-cap")["last_error"]
    assert "nested more than" in cache_row(conn, "deep-array")["last_error"]


@pytest.mark.parametrize(("config_sql", "reason"), [
    ("'[1, 2]'::jsonb", "provider_config must be a JSON object, got list"),
    ("'\"{}\"'::jsonb", "provider_config must be a JSON object, got str"),
    ("'null'::jsonb", "provider_config must be a JSON object, got NoneType"),
])
def test_a_config_within_the_caps_that_is_not_an_object_is_still_a_permanent_error(
    database_url, conn, config_sql, reason
):
    add_config_sql(conn, "odd", config_sql)

    summary = run(database_url)

    assert summary.success and summary.errors == 1
    assert cache_row(conn, "odd")["last_error"] == f"[permanent] {reason}"


#: (SQL building a config of a few MB, what it is) — one that TOAST compresses below the
#: cap (only its JSON text is over it), and one that stays large even compressed.
BIG_CONFIGS = [
    pytest.param("jsonb_build_object('pad', repeat('x', 3 * 1024 * 1024))", id="compressible"),
    pytest.param("(SELECT jsonb_object_agg(i::text, md5(i::text)) FROM generate_series(1, 60000)"
                 " AS i)", id="incompressible"),
]


@pytest.mark.parametrize("config_sql", BIG_CONFIGS)
def test_an_over_cap_config_is_that_workspaces_error_and_never_loaded(
    database_url, conn, config_sql
):
    add_config_sql(conn, "huge", config_sql)
    add_workspace(conn, "ok", provider="good", created_at=NOW - timedelta(days=1))
    size = conn.execute("SELECT octet_length(provider_config::text) FROM"
                        " availability_workspaces WHERE workspace_id = 'huge'").fetchone()[0]
    assert size > 2 * 1024 * 1024

    tracemalloc.start()
    try:
        summary = run(database_url)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert peak < size / 2, f"the run held {peak} bytes at its peak; the config is {size}"
    assert summary.success and Good.calls == ["ok"]
    error = cache_row(conn, "huge")["last_error"]
    assert error.startswith("[permanent] provider_config is too large: ")
    assert f"the limit is {source.MAX_CONFIG_BYTES} bytes" in error


def test_a_config_at_the_size_cap_is_used(database_url, conn):
    # {"pad": "xxx..."} is 11 bytes of JSON text around the padding.
    pad = source.MAX_CONFIG_BYTES - len('{"pad": ""}')
    add_config_sql(conn, "at-cap", f"jsonb_build_object('pad', repeat('x', {pad}))")
    add_config_sql(conn, "over-cap", f"jsonb_build_object('pad', repeat('x', {pad + 1}))")

    run(database_url)

    assert Good.calls == ["at-cap"]
    assert "too large" in cache_row(conn, "over-cap")["last_error"]


def test_the_planning_reads_send_no_over_cap_config(conn):
    add_config_sql(conn, "huge", BIG_CONFIGS[0].values[0], cache=True)
    add_config_sql(conn, "deep", f"'{DEEP}'::jsonb")

    [due] = refresh.fetch_due(conn, SOURCE, NOW, 10)
    [missing] = refresh.fetch_missing(conn, SOURCE, 10)

    assert (due.workspace_id, due.provider_config) == ("huge", None)
    assert due.provider_config_error is not None
    assert "too large" in due.provider_config_error
    assert (missing.workspace_id, missing.provider_config) == ("deep", None)
    assert missing.provider_config_error is not None
    assert "nested" in missing.provider_config_error


def test_a_view_with_a_json_typed_config_is_checked_the_same(database_url, conn):
    conn.execute("CREATE VIEW json_v AS SELECT workspace_id, provider,"
                 " provider_config::json AS provider_config, enabled, created_at"
                 " FROM availability_workspaces")
    add_config_sql(conn, "deep", f"'{DEEP}'::jsonb")
    add_workspace(conn, "ok", provider="good", config={"calendar_id": "c-1"},
                  created_at=NOW - timedelta(days=1))

    summary = run(database_url, "json_v")

    assert summary.success and Good.calls == ["ok"]
    assert "nested more than" in cache_row(conn, "deep")["last_error"]


def test_a_source_error_fails_the_call_before_any_provider_is_looked_up():
    item = refresh.PlannedRefresh("ws-1", "no-such-provider", None, "stale", NOW,
                                  source_error="provider_config is nested more than 32 levels")
    ctx = refresh.CallContext(
        registry=ProviderRegistry(ProviderContext(environ={})), lookahead=timedelta(days=1),
        deadline=float("inf"), clock=lambda: NOW, monotonic=lambda: 0.0, environ={})

    outcome = refresh.call_provider(item, ctx)

    assert outcome.error == "[permanent] provider_config is nested more than 32 levels"


# --- refresh --workspace and show -----------------------------------------------------------


def test_refresh_workspace_of_a_deep_config_fails_that_refresh_only(database_url, conn):
    add_config_sql(conn, "deep", f"'{DEEP}'::jsonb")

    summary = refresh.refresh_workspace(
        make_settings(database_url),
        make_runtime(database_url, providers={"good": Good}, clock=FakeClock(NOW)),
        "deep", default_source=SOURCE)

    assert not summary.success and summary.errors == 1
    assert Good.calls == []
    assert "nested more than" in cache_row(conn, "deep")["last_error"]


def test_refresh_workspace_of_a_workspace_without_created_at_refreshes_it(
    database_url, conn, view
):
    add_tenant(conn, "t-undated", days_old=None)

    summary = refresh.refresh_workspace(
        make_settings(database_url, source_table=view),
        make_runtime(database_url, providers={"good": Good}, clock=FakeClock(NOW)),
        "t-undated", default_source=SOURCE)

    assert summary.success and Good.calls == ["t-undated"]


def test_the_cli_refresh_workspace_of_a_deep_config_prints_no_traceback(database_url, conn):
    add_config_sql(conn, "deep", f"'{DEEP}'::jsonb")

    result = run_cli("refresh", "--workspace", "deep", env=clean_env(DATABASE_URL=database_url))

    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.json()["success"] is False
    assert "nested more than" in result.stderr


@pytest.mark.parametrize("config_sql", [f"'{DEEP}'::jsonb", BIG_CONFIGS[0].values[0]],
                         ids=["deep", "huge"])
def test_show_of_an_over_cap_config_says_why_it_is_not_shown(database_url, conn, config_sql):
    add_config_sql(conn, "bad", config_sql)

    result = run_cli("show", "bad", "--format", "json",
                     env=clean_env(DATABASE_URL=database_url))

    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    shown = result.json()["source"]
    assert shown["providerConfig"] is None
    assert shown["providerConfigError"].startswith("provider_config is ")
    assert len(result.stdout) < 2000


def test_show_of_a_workspace_with_null_columns_prints_them(database_url, conn, view):
    conn.execute("INSERT INTO tenants VALUES ('t-null', NULL, NULL, NULL, NULL)")

    result = run_cli("show", "t-null", "--format", "json", "--source-table", view,
                     env=clean_env(DATABASE_URL=database_url))

    assert result.returncode == 0, result.stderr
    shown = result.json()["source"]
    assert shown["provider"] is None and shown["createdAt"] is None
    assert shown["providerConfig"] is None and shown["enabled"] is None
    assert result.json()["dueNow"] is False  # a NULL enabled is not enabled


def test_a_good_config_is_read_unchanged(conn):
    config = {"calendar_id": "c-1", "nested": {"list": [1, 2.5, None, True, "x"]}, "tz": "UTC"}
    add_workspace(conn, "fine", provider="good", config=config,
                  created_at=NOW - timedelta(days=1))

    [missing] = refresh.fetch_missing(conn, SOURCE, 10)

    assert missing.provider_config == config and missing.provider_config_error is None
