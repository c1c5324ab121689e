"""The installed `availability-cron` command, run as a subprocess exactly as cron runs it.

Exit codes are the contract with cron and monitoring: 0 ran or skipped, 1 real
failure (alert), 2 bad usage or configuration (fix the settings). Configuration
errors must be found before the database is touched, so those tests point
DATABASE_URL at a closed port: any connection attempt would end in exit 1, not 2.
"""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from helpers import add_cache, add_workspace, cache_row, clean_env, run_cli

from availability_cron.settings import SPECS

pytestmark = pytest.mark.e2e

#: Nothing listens here: a command that tries to connect fails with exit 1.
CLOSED_PORT_URL = "postgresql://postgres@127.0.0.1:1/x"
PASSWORD = "s3cretpw"
CLOSED_PORT_URL_WITH_PASSWORD = f"postgresql://user:{PASSWORD}@127.0.0.1:1/db"

SUMMARY_KEYS = {
    "success", "skipped", "reason", "runId", "startedAt", "durationMs", "timeBudgetMs",
    "concurrency", "limit", "attempted", "refreshed", "errors", "missingAttempted",
    "staleAttempted", "skippedDeadline", "invalidSourceRows", "finishedWithinBudget",
}

METRICS_KEYS = {
    "at", "workspaces", "caches", "missingCaches", "staleDue", "erroringCaches",
    "neverSucceeded", "oldestSuccessAgeMinutes", "oldestRangeStartAgeMinutes",
    "successAgeP50Minutes", "successAgeP95Minutes", "oldestNeverSucceededAgeMinutes",
    "invalidSourceRows", "lastRunAt", "lastCompletedRunAt",
    "lastRefreshingRunAt", "lockSkipStreak", "runs24h", "runsFailed24h", "runsOverBudget24h",
    "runDurationP50Ms", "runDurationP95Ms",
}

#: At least one invalid value per setting; a new setting without an entry fails
#: test_every_setting_has_bad_values_under_test.
BAD_VALUES: dict[str, list[str]] = {
    "database_url": [
        "mysql://user@db.example/app",
        "postgresql://user@[::1/db",
        "postgresql://user@127.0.0.1:notaport/db",
    ],
    "time_budget_ms": ["abc", "999", "3600001"],
    "deadline_margin_ms": ["-1", "abc"],
    "concurrency": ["0", "257", "abc", "1.5"],
    "cache_ttl_ms": ["999", "abc"],
    "limit": ["-1", "abc"],
    "lookahead_days": ["0", "367"],
    "missing_reserve": ["-0.1", "1.5", "nan", "abc"],
    "max_backoff_ms": ["999", "604800001", "abc"],
    "lock_name": ["x" * 201],
    "source_table": ["a.b.c", "1table", "bad-name", "ws; DROP TABLE x"],
    "log_level": ["LOUD", "trace"],
    "ics_file_root": ["relative/feeds", "feeds"],
    "lock_database_url": ["mysql://user@db.example/app", "nonsense"],
    "run_retention_days": ["0", "367", "abc"],
    "ping_url": ["ftp://hc.example/x", "not a url"],
    "secret_scopes": ["not json", '{"TOKEN_{workspace}": {"hosts": []}}',
                      '{"DB_URL": {"workspaces": "*", "hosts": ["db"]}, "PGPASS": {}}'],
}

BAD_SETTING_CASES = [
    pytest.param(spec.env, value, id=f"{spec.env}={value[:24]}")
    for spec in SPECS
    for value in BAD_VALUES.get(spec.field, [])
]


def closed_port_env(**extra: str) -> dict[str, str]:
    """A clean environment whose DATABASE_URL (unless ``extra`` sets one) refuses connections."""
    return clean_env(**{"DATABASE_URL": CLOSED_PORT_URL, **extra})


def assert_usage_error_naming(result: Any, *names: str) -> None:
    """Exit 2, nothing on stdout, and one stderr line that names every one of ``names``."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if all(n in line for n in names)]
    assert lines, f"no stderr line names {names}: {result.stderr!r}"


def dump_cache(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    return conn.execute(
        "SELECT * FROM workspace_availability_cache ORDER BY workspace_id"
    ).fetchall()


def db_env(database_url: str, **extra: str) -> dict[str, str]:
    return clean_env(DATABASE_URL=database_url, **extra)


# --- configuration errors: exit 2, before the database ----------------------------------------


def test_every_setting_has_bad_values_under_test():
    assert {spec.field for spec in SPECS} <= set(BAD_VALUES)


@pytest.mark.parametrize(("env_name", "value"), BAD_SETTING_CASES)
def test_a_bad_setting_exits_2_naming_the_variable_before_touching_the_database(
    env_name, value
):
    env = closed_port_env(**{env_name: value})

    result = run_cli("refresh", env=env)

    assert_usage_error_naming(result, env_name)


def test_a_bad_value_in_the_env_file_exits_2_naming_the_variable(tmp_path):
    (tmp_path / ".env").write_text("AVAILABILITY_CRON_CONCURRENCY=lots\n")

    result = run_cli("refresh", env=closed_port_env(), cwd=tmp_path)

    assert_usage_error_naming(result, "AVAILABILITY_CRON_CONCURRENCY", "lots")


@pytest.mark.parametrize(("margin", "budget"), [("5000", "5000"), ("9000", "5000")])
def test_a_deadline_margin_not_below_the_budget_exits_2(margin, budget):
    env = closed_port_env(AVAILABILITY_CRON_DEADLINE_MARGIN_MS=margin,
                          AVAILABILITY_CRON_TIME_BUDGET_MS=budget)

    result = run_cli("refresh", env=env)

    assert_usage_error_naming(result, "AVAILABILITY_CRON_DEADLINE_MARGIN_MS",
                              "AVAILABILITY_CRON_TIME_BUDGET_MS")


def test_a_max_backoff_below_the_cache_ttl_exits_2():
    env = closed_port_env(AVAILABILITY_CRON_MAX_BACKOFF_MS="60000",
                          AVAILABILITY_CACHE_TTL_MS="120000")

    result = run_cli("refresh", env=env)

    assert_usage_error_naming(result, "AVAILABILITY_CRON_MAX_BACKOFF_MS",
                              "AVAILABILITY_CACHE_TTL_MS")


def test_a_time_budget_flag_below_the_minimum_exits_2_naming_the_flag():
    result = run_cli("refresh", "--time-budget-ms", "999", env=closed_port_env())

    assert_usage_error_naming(result, "--time-budget-ms", "AVAILABILITY_CRON_TIME_BUDGET_MS")


def test_a_negative_limit_flag_exits_2_naming_the_flag():
    result = run_cli("refresh", "--limit", "-1", env=closed_port_env())

    assert_usage_error_naming(result, "--limit", "AVAILABILITY_CRON_LIMIT")


def test_a_non_integer_concurrency_flag_exits_2():
    result = run_cli("refresh", "--concurrency", "abc", env=closed_port_env())

    assert result.returncode == 2
    assert result.stdout == ""
    assert "--concurrency" in result.stderr


@pytest.mark.parametrize(("flag", "raw"), [("--concurrency", "５"), ("--limit", "٣"),
                                         ("--limit", "1__0"), ("--limit", "_5"),
                                         ("--missing-reserve", "０.５")])
def test_a_number_flag_with_non_ascii_digits_or_odd_underscores_exits_2(flag, raw):
    result = run_cli("config", flag, raw, env=clean_env())

    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stdout == ""
    assert flag in result.stderr


def test_config_shows_a_negative_zero_reserve_as_zero():
    result = run_cli("config", "--format", "json", "--missing-reserve", "-0", env=clean_env())

    assert result.returncode == 0, result.stderr
    [reserve] = [s for s in result.json()["settings"]
                 if s["name"] == "AVAILABILITY_CRON_MISSING_RESERVE"]
    assert (reserve["value"], reserve["source"]) == (0.0, "flag")
    assert '"value":-0' not in result.stdout


@pytest.mark.parametrize("args", [
    pytest.param(("refresh", "--bogus"), id="unknown-option"),
    pytest.param(("refresh", "--format", "xml"), id="bad-choice"),
    pytest.param(("refresh", "--concurrency", "abc"), id="not-an-integer"),
    pytest.param(("refresh", "--limit"), id="missing-value"),
    pytest.param(("lock", "release"), id="missing-required-option"),
    pytest.param(("show", "ws-1", "ws-2"), id="extra-argument"),
    pytest.param(("no-such-command",), id="unknown-command"),
    pytest.param(("metrics", "--warn-afterr", "3"), id="unknown-option-near-check-mode"),
])
def test_a_usage_error_is_one_line_on_stderr_and_exit_2(args):
    result = run_cli(*args, env=closed_port_env())

    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith("availability-cron: error: "), line


def test_no_command_still_prints_the_help():
    result = run_cli(env=closed_port_env())

    assert result.returncode == 2
    assert "Usage: availability-cron" in result.stderr and "refresh" in result.stderr


@pytest.mark.parametrize("args", [("refresh", "--bogus"), ("metrics", "--bogus"),
                                  ("db", "migrate", "--bogus"), ("no-such-command",)])
def test_an_unknown_option_or_command_exits_2(args):
    result = run_cli(*args, env=closed_port_env())

    assert result.returncode == 2
    assert result.stdout == ""
    assert args[-1] in result.stderr


@pytest.mark.parametrize("args", [("refresh",), ("refresh", "--dry-run"), ("metrics",),
                                  ("db", "migrate")])
def test_a_missing_database_url_exits_2_naming_database_url(args):
    result = run_cli(*args, env=clean_env())

    assert_usage_error_naming(result, "DATABASE_URL")


def test_an_unparseable_env_file_line_exits_2_naming_the_line_on_one_line(tmp_path):
    (tmp_path / ".env").write_text(f"AVAILABILITY_CRON_CONCURRENCY=7\nDATABASE_URL {PASSWORD}\n")

    result = run_cli("refresh", env=closed_port_env(), cwd=tmp_path)

    assert_usage_error_naming(result, ".env", "line 2")
    assert result.stderr.count("\n") == 1, result.stderr
    assert PASSWORD not in result.stderr


def test_a_missing_env_file_exits_2(tmp_path):
    missing = tmp_path / "nope.env"

    result = run_cli("refresh", "--env-file", str(missing), env=closed_port_env())

    assert_usage_error_naming(result, "--env-file", "nope.env")


def test_a_malformed_database_url_never_prints_its_password():
    env = clean_env(DATABASE_URL=f"postgresql://user:{PASSWORD}@[::1/db")

    result = run_cli("refresh", env=env)

    assert_usage_error_naming(result, "DATABASE_URL")
    assert PASSWORD not in result.stderr


#: URLs libpq refuses to parse, each with the password pieces its own error message would quote.
UNPARSABLE_URLS = {
    "bad escape under an encoded key": (
        "postgresql://user@127.0.0.1:1/db?pass%77ord=s3cr%zz-et9", ["s3cr", "zz-et9"]),
    "bad escape in the userinfo": ("postgresql://user:pa%zz-ss8@127.0.0.1:1/db", ["zz-ss8"]),
    "unterminated IPv6 host": ("postgresql://user:hunter-77@[::1/db", ["hunter-77"]),
    "key=value with a space": ("host=127.0.0.1 port=1 password=pw-one pw-two", ["pw-two"]),
}


@pytest.mark.parametrize("command", [("refresh",), ("config",), ("metrics",)])
@pytest.mark.parametrize("case", list(UNPARSABLE_URLS))
def test_a_url_libpq_cannot_parse_is_one_exit_2_line_that_quotes_no_part_of_the_password(
    command, case
):
    url, pieces = UNPARSABLE_URLS[case]

    result = run_cli(*command, env=clean_env(DATABASE_URL=url))

    assert_usage_error_naming(result, "DATABASE_URL")
    assert len(result.stderr.splitlines()) == 1, result.stderr
    for piece in pieces:
        assert piece not in result.stderr, result.stderr


@pytest.mark.parametrize("url", [
    "postgresql://u@host1,host2:5440/db",  # libpq: host1 on the default port, host2 on 5440
    "postgresql://u@host1:5433,host2/db",
    "postgresql://u@db.example/app?port=",
    "host=host1,host2 port=,5440 dbname=app",
])
def test_an_empty_port_in_a_host_list_means_the_default_port_as_libpq_reads_it(url):
    result = run_cli("config", "--format", "json", env=clean_env(DATABASE_URL=url))

    assert result.returncode == 0, result.stderr
    assert result.json()["settings"][0]["value"] == url


@pytest.mark.parametrize(("url", "reason"), [
    ("postgresql://u@127.0.0.1,127.0.0.1,127.0.0.1/db?port=1,1", "2 ports for 3 hosts"),
    ("postgresql://u@127.0.0.1,127.0.0.1/db?port=1,%EF%BC%95", "invalid port"),  # fullwidth 5
    ("postgresql://u@127.0.0.1,127.0.0.1/db?port=1,%20", "invalid port"),
])
def test_ports_libpq_would_refuse_when_connecting_are_exit_2_before_any_connection(url, reason):
    result = run_cli("refresh", env=clean_env(DATABASE_URL=url))

    assert_usage_error_naming(result, "DATABASE_URL", reason)


#: URLs whose percent escapes decode to bytes that are not UTF-8, which psycopg cannot read.
NON_UTF8_URLS = {
    "password": "postgresql://user:pw-%FF-nine@127.0.0.1:1/db",
    "database name": "postgresql://user:pw-nine@127.0.0.1:1/d%FFb",
    "application_name": "postgresql://user:pw-nine@127.0.0.1:1/db?application_name=a%C3",
}


@pytest.mark.parametrize("command", [("refresh",), ("config",), ("metrics",)])
@pytest.mark.parametrize("case", list(NON_UTF8_URLS))
def test_a_url_with_a_non_utf8_percent_escape_is_one_exit_2_line_without_the_password(
    command, case
):
    result = run_cli(*command, env=clean_env(DATABASE_URL=NON_UTF8_URLS[case]))

    assert_usage_error_naming(result, "DATABASE_URL", "UTF-8")
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "pw-" not in result.stderr and "nine" not in result.stderr


def test_a_lock_url_with_a_non_utf8_percent_escape_is_named_in_its_exit_2_line():
    env = clean_env(DATABASE_URL=CLOSED_PORT_URL,
                    AVAILABILITY_CRON_LOCK_DATABASE_URL="postgresql://u:lk-%FF@127.0.0.1:1/db")

    result = run_cli("refresh", env=env)

    assert_usage_error_naming(result, "AVAILABILITY_CRON_LOCK_DATABASE_URL", "UTF-8")
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "lk-" not in result.stderr


@pytest.mark.parametrize("url", [
    "postgresql://user:1234/ss-pw6@127.0.0.1:1/db",  # libpq: host user, port 1234
    "postgresql://localhost?password=pw-7@127.0.0.1:1/db",  # user localhost?password=pw-7
])
def test_a_url_libpq_would_misread_is_exit_2_before_any_connection_without_its_password(url):
    result = run_cli("refresh", env=clean_env(DATABASE_URL=url))

    assert_usage_error_naming(result, "DATABASE_URL", "percent-encode")
    for piece in ("1234", "ss-pw6", "pw-7"):
        assert piece not in result.stderr


def test_an_unparsable_lock_url_is_named_in_its_exit_2_line_without_its_password():
    env = clean_env(DATABASE_URL=CLOSED_PORT_URL,
                    AVAILABILITY_CRON_LOCK_DATABASE_URL="postgresql://db/x?pass%77ord=lk%zz-pw5")

    result = run_cli("refresh", env=env)

    assert_usage_error_naming(result, "AVAILABILITY_CRON_LOCK_DATABASE_URL")
    assert "lk%zz" not in result.stderr
    assert "zz-pw5" not in result.stderr


# --- real failures: exit 1 ----------------------------------------------------------------------


def test_a_database_that_is_down_exits_1_quickly_with_one_json_object_and_no_password():
    started = time.monotonic()
    result = run_cli("refresh", env=clean_env(DATABASE_URL=CLOSED_PORT_URL_WITH_PASSWORD))
    elapsed = time.monotonic() - started

    assert result.returncode == 1, result.stderr
    assert elapsed < 15, f"took {elapsed:.1f} s to give up on a closed port"
    summary = result.json()
    assert summary["success"] is False
    assert summary["skipped"] is False
    assert "cannot connect" in summary["error"]
    assert "availability-cron: failed: cannot connect to the database" in result.stderr
    assert PASSWORD not in result.stdout
    assert PASSWORD not in result.stderr


@pytest.mark.parametrize("args", [("metrics",), ("db", "migrate"), ("refresh", "--dry-run"),
                                  ("refresh", "--workspace", "ws-1")])
def test_every_command_reports_a_database_that_is_down_as_exit_1_without_the_password(args):
    result = run_cli(*args, env=clean_env(DATABASE_URL=CLOSED_PORT_URL_WITH_PASSWORD))

    assert result.returncode == 1, result.stderr
    assert "cannot connect to the database" in result.stderr
    assert PASSWORD not in result.stdout
    assert PASSWORD not in result.stderr


@pytest.mark.parametrize("args", [("refresh",), ("refresh", "--dry-run"), ("metrics",),
                                  ("refresh", "--workspace", "ws-1")])
def test_a_database_without_the_schema_exits_1_and_says_to_migrate(empty_database_url, args):
    result = run_cli(*args, env=db_env(empty_database_url))

    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "availability-cron db migrate" in result.stderr


def test_a_refresh_without_the_schema_prints_the_migrate_hint_in_its_json(empty_database_url):
    result = run_cli("refresh", env=db_env(empty_database_url))

    summary = result.json()
    assert summary["success"] is False
    assert "availability-cron db migrate" in summary["error"]


# --- normal runs ------------------------------------------------------------------------------


def test_a_normal_run_prints_exactly_one_json_summary_and_logs_only_on_stderr(database_url, conn):
    add_workspace(conn, "ws-1")
    add_workspace(conn, "ws-2")

    result = run_cli("refresh", env=db_env(database_url))

    assert result.returncode == 0, result.stderr
    summary = result.json()
    assert SUMMARY_KEYS <= set(summary), SUMMARY_KEYS - set(summary)
    assert result.stdout == json.dumps(summary, separators=(",", ":")) + "\n"
    assert summary["success"] is True
    assert summary["skipped"] is False
    assert summary["reason"] is None
    assert summary["attempted"] == 2
    assert summary["refreshed"] == 2
    assert summary["errors"] == 0
    assert summary["missingAttempted"] == 2
    assert summary["staleAttempted"] == 0
    assert summary["skippedDeadline"] == 0
    assert summary["finishedWithinBudget"] is True
    assert summary["timeBudgetMs"] == 45000
    assert summary["concurrency"] == 5
    assert summary["limit"] == 500
    assert 0 <= summary["durationMs"] < summary["timeBudgetMs"]
    started_at = datetime.fromisoformat(summary["startedAt"].replace("Z", "+00:00"))
    assert abs(datetime.now(UTC) - started_at) < timedelta(minutes=1)
    assert f"run={summary['runId']}" in result.stderr
    assert "run finished" in result.stderr
    for workspace_id in ("ws-1", "ws-2"):
        row = cache_row(conn, workspace_id)
        assert row is not None and row["refreshed_at"] is not None


def test_a_limit_of_zero_attempts_nothing_and_exits_0(database_url, conn):
    add_workspace(conn, "ws-1")

    result = run_cli("refresh", env=db_env(database_url, AVAILABILITY_CRON_LIMIT="0"))

    assert result.returncode == 0, result.stderr
    summary = result.json()
    assert summary["success"] is True
    assert summary["limit"] == 0
    assert summary["attempted"] == 0
    assert cache_row(conn, "ws-1") is None


def test_provider_errors_are_counted_but_the_run_still_exits_0(database_url, conn):
    add_workspace(conn, "ws-good")
    add_workspace(conn, "ws-bad", config={"fail": "boom"})

    result = run_cli("refresh", env=db_env(database_url))

    assert result.returncode == 0, result.stderr
    summary = result.json()
    assert summary["success"] is True
    assert summary["attempted"] == 2
    assert summary["refreshed"] == 1
    assert summary["errors"] == 1
    bad = cache_row(conn, "ws-bad")
    assert bad is not None
    assert "boom" in bad["last_error"]
    assert bad["refreshed_at"] is None
    assert bad["consecutive_failures"] == 1


def test_format_table_prints_a_table_instead_of_json(database_url, conn):
    add_workspace(conn, "ws-1")

    result = run_cli("refresh", "--format", "table", env=db_env(database_url))

    assert result.returncode == 0, result.stderr
    assert not result.stdout.lstrip().startswith("{")
    assert "availability-cron refresh" in result.stdout
    assert re.search(r"\brefreshed\b[^\n]*\b1\b", result.stdout), result.stdout
    assert re.search(r"\bsuccess\b[^\n]*\bTrue\b", result.stdout), result.stdout


# --- dry run and single workspace ---------------------------------------------------------------


def test_dry_run_lists_the_queue_in_order_and_writes_nothing(database_url, conn):
    now = datetime.now(UTC)
    add_workspace(conn, "ws-missing")
    add_workspace(conn, "ws-stalest")
    add_workspace(conn, "ws-stale")
    add_workspace(conn, "ws-fresh")
    add_cache(conn, "ws-stalest", stale_at=now - timedelta(hours=2),
              refreshed_at=now - timedelta(hours=3), slots=["2026-01-01T09:00:00Z"])
    add_cache(conn, "ws-stale", stale_at=now - timedelta(hours=1),
              refreshed_at=now - timedelta(hours=2), slots=[])
    add_cache(conn, "ws-fresh", stale_at=now + timedelta(hours=1),
              refreshed_at=now, slots=[])
    before = dump_cache(conn)

    result = run_cli("refresh", "--dry-run", env=db_env(database_url))

    assert result.returncode == 0, result.stderr
    report = result.json()
    assert dump_cache(conn) == before
    assert report["dryRun"] is True
    assert report["lockHeld"] is False
    assert report["planned"] == 3
    assert [(q["workspaceId"], q["reason"]) for q in report["queue"]] == [
        ("ws-missing", "missing"), ("ws-stalest", "stale"), ("ws-stale", "stale"),
    ]
    assert [q["position"] for q in report["queue"]] == [1, 2, 3]


def test_dry_run_as_a_table_lists_the_queued_workspaces(database_url, conn):
    add_workspace(conn, "ws-missing")
    before = dump_cache(conn)

    result = run_cli("refresh", "--dry-run", "--format", "table", env=db_env(database_url))

    assert result.returncode == 0, result.stderr
    assert "dry run at" in result.stdout
    assert "ws-missing" in result.stdout
    assert dump_cache(conn) == before


def test_refresh_of_an_unknown_workspace_exits_2(database_url, conn):
    add_workspace(conn, "ws-1")

    result = run_cli("refresh", "--workspace", "ws-nope", env=db_env(database_url))

    assert_usage_error_naming(result, "ws-nope")
    assert cache_row(conn, "ws-1") is None


def test_refresh_of_a_failing_workspace_exits_1_and_records_the_error(database_url, conn):
    add_workspace(conn, "ws-bad", config={"fail": "boom"})

    result = run_cli("refresh", "--workspace", "ws-bad", env=db_env(database_url))

    assert result.returncode == 1, result.stderr
    summary = result.json()
    assert summary["success"] is False
    assert summary["workspace"] == "ws-bad"
    assert summary["errors"] == 1
    row = cache_row(conn, "ws-bad")
    assert row is not None and "boom" in row["last_error"]


def test_refresh_of_one_workspace_refreshes_it_even_when_not_due(database_url, conn):
    now = datetime.now(UTC)
    old = now - timedelta(minutes=5)
    add_workspace(conn, "ws-1")
    add_workspace(conn, "ws-other")
    add_cache(conn, "ws-1", stale_at=now + timedelta(hours=1), refreshed_at=old, slots=[])

    result = run_cli("refresh", "--workspace", "ws-1", env=db_env(database_url))

    assert result.returncode == 0, result.stderr
    summary = result.json()
    assert summary["success"] is True
    assert summary["workspace"] == "ws-1"
    assert summary["refreshed"] == 1
    row = cache_row(conn, "ws-1")
    assert row is not None
    assert row["refreshed_at"] > old
    assert row["slots_utc"]
    assert row["last_error"] is None
    assert row["stale_at"] > row["refreshed_at"]
    assert cache_row(conn, "ws-other") is None


# --- precedence: flag > environment > .env > default, observed through --dry-run -------------


def dry_run_limit(database_url: str, *args: str, cwd: Any, **env: str) -> int:
    result = run_cli("refresh", "--dry-run", *args, env=db_env(database_url, **env), cwd=cwd)
    assert result.returncode == 0, result.stderr
    return int(result.json()["limit"])


def test_the_default_applies_when_nothing_sets_the_setting(database_url, tmp_path):
    assert dry_run_limit(database_url, cwd=tmp_path) == 500


def test_the_env_file_in_the_working_directory_overrides_the_default(database_url, tmp_path):
    (tmp_path / ".env").write_text("AVAILABILITY_CRON_LIMIT=7\n")

    assert dry_run_limit(database_url, cwd=tmp_path) == 7


def test_the_environment_overrides_the_env_file(database_url, tmp_path):
    (tmp_path / ".env").write_text("AVAILABILITY_CRON_LIMIT=7\n")

    assert dry_run_limit(database_url, cwd=tmp_path, AVAILABILITY_CRON_LIMIT="8") == 8


def test_an_empty_environment_value_falls_through_to_the_env_file(database_url, tmp_path):
    (tmp_path / ".env").write_text("AVAILABILITY_CRON_LIMIT=7\n")

    assert dry_run_limit(database_url, cwd=tmp_path, AVAILABILITY_CRON_LIMIT="") == 7


def test_the_flag_overrides_the_environment_and_the_env_file(database_url, tmp_path):
    (tmp_path / ".env").write_text("AVAILABILITY_CRON_LIMIT=7\n")

    limit = dry_run_limit(database_url, "--limit", "9", cwd=tmp_path, AVAILABILITY_CRON_LIMIT="8")

    assert limit == 9


def test_env_file_option_replaces_the_env_file_in_the_working_directory(database_url, tmp_path):
    (tmp_path / ".env").write_text("AVAILABILITY_CRON_LIMIT=7\n")
    other = tmp_path / "cron.env"
    other.write_text("AVAILABILITY_CRON_LIMIT=11\n")

    assert dry_run_limit(database_url, "--env-file", str(other), cwd=tmp_path) == 11
    assert dry_run_limit(database_url, "--env-file", str(other), cwd=tmp_path,
                         AVAILABILITY_CRON_LIMIT="8") == 8


def test_the_database_url_can_come_from_the_env_file(database_url, tmp_path):
    (tmp_path / ".env").write_text(f"DATABASE_URL={database_url}\nAVAILABILITY_CRON_LIMIT=3\n")

    result = run_cli("refresh", "--dry-run", env=clean_env(), cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert result.json()["limit"] == 3


# --- metrics ----------------------------------------------------------------------------------


def test_metrics_prints_the_staleness_report_as_json(database_url, conn):
    now = datetime.now(UTC)
    add_workspace(conn, "ws-fresh")
    add_workspace(conn, "ws-failing")
    add_workspace(conn, "ws-missing")
    add_workspace(conn, "ws-disabled", enabled=False)
    add_cache(conn, "ws-fresh", stale_at=now + timedelta(minutes=50),
              refreshed_at=now - timedelta(minutes=10), slots=[])
    add_cache(conn, "ws-failing", stale_at=now - timedelta(minutes=1), last_error="boom",
              consecutive_failures=2)
    add_cache(conn, "ws-disabled", stale_at=now - timedelta(days=1),
              refreshed_at=now - timedelta(days=2), slots=[])

    result = run_cli("metrics", env=db_env(database_url))

    assert result.returncode == 0, result.stderr
    report = result.json()
    assert set(report) == METRICS_KEYS
    assert report["workspaces"] == 3
    assert report["caches"] == 2
    assert report["missingCaches"] == 1
    assert report["staleDue"] == 1
    assert report["erroringCaches"] == 1
    assert report["neverSucceeded"] == 2
    assert 9.5 <= report["oldestSuccessAgeMinutes"] <= 12


def test_metrics_as_a_table_lists_every_metric(database_url, conn):
    add_workspace(conn, "ws-1")

    result = run_cli("metrics", "--format", "table", env=db_env(database_url))

    assert result.returncode == 0, result.stderr
    assert "availability caches at" in result.stdout
    for key in METRICS_KEYS - {"at"}:
        assert key in result.stdout, key


# --- help ---------------------------------------------------------------------------------------

ALL_ENV_NAMES = [spec.env for spec in SPECS]


@pytest.mark.parametrize(("args", "env_names"), [
    pytest.param(("refresh",), ALL_ENV_NAMES, id="refresh"),
    pytest.param(("metrics",), ["DATABASE_URL", "AVAILABILITY_CRON_SOURCE_TABLE",
                                "AVAILABILITY_CRON_LOG_LEVEL"], id="metrics"),
    pytest.param(("db", "migrate"), ["DATABASE_URL", "AVAILABILITY_CRON_LOG_LEVEL"],
                 id="db-migrate"),
])
def test_help_of_each_command_names_its_environment_variables_and_exit_codes(args, env_names):
    result = run_cli(*args, "--help", env=closed_port_env(COLUMNS="100"))

    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    missing = [name for name in env_names if name not in text]
    assert not missing, f"`{' '.join(args)} --help` does not mention {missing}"
    assert re.search(r"exit codes?\W.*?\b0\b.*?\b1\b.*?\b2\b", text, re.I), (
        f"`{' '.join(args)} --help` does not document exit codes 0, 1 and 2:\n{result.stdout}"
    )


def test_top_level_help_documents_exit_codes_and_precedence():
    result = run_cli("--help", env=closed_port_env(COLUMNS="100"))

    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert re.search(r"exit codes?\W.*?\b0\b.*?\b1\b.*?\b2\b", text, re.I)
    for command in ("refresh", "metrics", "db"):
        assert command in text


@pytest.mark.e2e
def test_version_prints_the_package_version_and_exits_0():
    from availability_cron import __version__

    result = run_cli("--version", env=closed_port_env())
    assert result.returncode == 0
    assert result.stdout.strip() == f"availability-cron {__version__}"


def test_a_python_warning_in_the_job_is_one_formatted_scrubbed_log_line():
    import subprocess
    import sys

    code = ("import warnings\n"
            "from availability_cron import cli\n"
            "cli._configure_logging('INFO', 'r1', ['s3cret-xyzzy'])\n"
            "warnings.warn('a library says\\nsomething about s3cret-xyzzy', UserWarning)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=30, env=clean_env(), check=True)

    [line] = proc.stderr.splitlines()
    assert re.fullmatch(r"\S+Z WARNING run=r1 py\.warnings: UserWarning: a library says "
                        r"something about \*\*\*", line), proc.stderr
