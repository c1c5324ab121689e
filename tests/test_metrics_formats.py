"""`metrics` beyond JSON: Prometheus text (stdout or an atomically replaced textfile) and a
Nagios status line with Nagios exit codes.

The renderers and the check are pure functions, tested on hand-made reports; the
Prometheus text is read back with the official parser. A few end-to-end tests run the
installed command against a real database, one per Nagios exit code.
"""

from __future__ import annotations

import dataclasses
import os
import stat
import threading
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from helpers import NOW, add_cache, add_run, add_workspace, clean_env, run_cli
from prometheus_client.parser import text_string_to_metric_families

from availability_cron.errors import ConfigError
from availability_cron.metrics import (
    NagiosStatus,
    RunHistory,
    StalenessReport,
    WorkspaceStaleness,
    nagios_check,
    nagios_unknown,
    render_prometheus,
    validate_thresholds,
    write_textfile,
)

CLOSED_PORT_URL = "postgresql://postgres@127.0.0.1:1/x"

RUNS = RunHistory(
    last_run_at=NOW - timedelta(seconds=20),
    last_completed_run_at=NOW - timedelta(seconds=80),
    last_refreshing_run_at=NOW - timedelta(seconds=140),
    lock_skip_streak=1,
    runs_24h=1440,
    runs_failed_24h=3,
    runs_over_budget_24h=2,
    run_duration_p50_ms=4375.5,
    run_duration_p95_ms=12000.0,
)

REPORT = StalenessReport(
    at=NOW, workspaces=300, caches=290, missing_caches=10, stale_due=12, erroring_caches=5,
    never_succeeded=14, oldest_success_age_seconds=754.25, oldest_range_start_age_seconds=760.0,
    success_age_p50_seconds=31.5, success_age_p95_seconds=58.0, runs=RUNS,
)

EMPTY = StalenessReport(
    at=NOW, workspaces=0, caches=0, missing_caches=0, stale_due=0, erroring_caches=0,
    never_succeeded=0, oldest_success_age_seconds=None, oldest_range_start_age_seconds=None,
    success_age_p50_seconds=None, success_age_p95_seconds=None,
)


def parse(text: str) -> dict[str, Any]:
    """family name -> Metric, through prometheus_client's parser."""
    return {family.name: family for family in text_string_to_metric_families(text)}


def value(families: dict[str, Any], name: str, **labels: str) -> float:
    [sample] = [s for s in families[name].samples if s.labels == labels]
    return float(sample.value)


def report_with(age_minutes: float | None, streak: int | None) -> StalenessReport:
    return replace(
        REPORT,
        oldest_success_age_seconds=None if age_minutes is None else age_minutes * 60,
        runs=replace(RUNS, lock_skip_streak=streak),
    )


# --- Prometheus text --------------------------------------------------------------------------


def test_prometheus_text_has_every_number_as_a_gauge_with_ages_in_seconds():
    families = parse(render_prometheus(dataclasses.replace(
        REPORT, oldest_never_succeeded_age_seconds=300.0, invalid_source_rows=2)))

    assert all(f.type == "gauge" and f.documentation for f in families.values())
    assert all(name.startswith("availability_cron_") for name in families)
    expected = {
        "availability_cron_workspaces": 300,
        "availability_cron_caches": 290,
        "availability_cron_missing_caches": 10,
        "availability_cron_stale_due_caches": 12,
        "availability_cron_erroring_caches": 5,
        "availability_cron_never_succeeded_workspaces": 14,
        "availability_cron_invalid_source_rows": 2,
        "availability_cron_oldest_success_age_seconds": 754.25,
        "availability_cron_oldest_range_start_age_seconds": 760.0,
        "availability_cron_oldest_never_succeeded_age_seconds": 300.0,
        "availability_cron_success_age_p50_seconds": 31.5,
        "availability_cron_success_age_p95_seconds": 58.0,
        "availability_cron_last_run_timestamp_seconds": (NOW - timedelta(seconds=20)).timestamp(),
        "availability_cron_last_completed_run_timestamp_seconds":
            (NOW - timedelta(seconds=80)).timestamp(),
        "availability_cron_last_success_timestamp_seconds":
            (NOW - timedelta(seconds=140)).timestamp(),
        "availability_cron_lock_skip_streak": 1,
        "availability_cron_runs_24h": 1440,
        "availability_cron_runs_failed_24h": 3,
        "availability_cron_runs_over_budget_24h": 2,
        "availability_cron_run_duration_p50_seconds": 4.3755,
        "availability_cron_run_duration_p95_seconds": 12.0,
    }
    assert {name: value(families, name) for name in families} == pytest.approx(expected)
    assert set(families) == set(expected)


def test_a_number_without_data_keeps_help_and_type_but_has_no_sample():
    text = render_prometheus(EMPTY)
    families = parse(text)

    assert families["availability_cron_oldest_success_age_seconds"].samples == []
    assert families["availability_cron_last_success_timestamp_seconds"].samples == []
    assert families["availability_cron_lock_skip_streak"].samples == []
    assert value(families, "availability_cron_workspaces") == 0
    assert "# TYPE availability_cron_oldest_success_age_seconds gauge" in text
    assert text.endswith("\n")


def test_per_workspace_series_appear_only_when_asked_for():
    rows = [WorkspaceStaleness("acme", 90.5, 0), WorkspaceStaleness("never-ok", None, 4)]

    without = parse(render_prometheus(REPORT))
    families = parse(render_prometheus(REPORT, rows))

    assert not any("workspace_" in name for name in without)
    assert value(families, "availability_cron_workspace_success_age_seconds",
                 workspace="acme") == 90.5
    assert [s.labels for s in
            families["availability_cron_workspace_success_age_seconds"].samples] == [
        {"workspace": "acme"}]  # no success yet: no age sample
    assert value(families, "availability_cron_workspace_consecutive_failures",
                 workspace="never-ok") == 4
    assert value(families, "availability_cron_workspace_consecutive_failures",
                 workspace="acme") == 0


def test_a_workspace_id_with_quote_backslash_and_newline_is_escaped_and_reads_back_intact():
    tricky = 'we "said"\\no\nthanks'
    text = render_prometheus(REPORT, [WorkspaceStaleness(tricky, 12.0, 1)])

    families = parse(text)

    assert value(families, "availability_cron_workspace_consecutive_failures",
                 workspace=tricky) == 1
    assert 'workspace="we \\"said\\"\\\\no\\nthanks"' in text
    samples = [line for line in text.splitlines()
               if line.startswith("availability_cron_workspace_")]
    assert len(samples) == 2  # the newline did not split a sample line


# --- the textfile -----------------------------------------------------------------------------


def test_the_textfile_is_replaced_atomically_while_a_reader_keeps_reading_it(tmp_path):
    path = tmp_path / "availability_cron.prom"
    versions = [render_prometheus(replace(REPORT, workspaces=i)) for i in range(200)]
    write_textfile(path, versions[0])
    allowed = set(versions)
    seen: list[str] = []
    bad: list[str] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            text = path.read_text()
            (seen if text in allowed else bad).append(text)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for text in versions[1:]:
            write_textfile(path, text)
    finally:
        done.set()
        reader.join()

    assert bad == []
    assert len(seen) > 1
    assert path.read_text() == versions[-1]
    assert os.listdir(tmp_path) == ["availability_cron.prom"]


def test_the_textfile_is_world_readable_whatever_the_umask(tmp_path):
    path = tmp_path / "availability_cron.prom"
    old = os.umask(0o077)
    try:
        write_textfile(path, render_prometheus(REPORT))
    finally:
        os.umask(old)

    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_a_failed_textfile_write_leaves_no_temporary_file_behind(tmp_path):
    target = tmp_path / "is-a-directory.prom"
    target.mkdir()

    with pytest.raises(OSError):
        write_textfile(target, render_prometheus(REPORT))

    assert sorted(os.listdir(tmp_path)) == ["is-a-directory.prom"]
    assert target.is_dir()


# --- the Nagios check -------------------------------------------------------------------------


@pytest.mark.parametrize(("age", "streak", "expected"), [
    pytest.param(0.0, 0, NagiosStatus.OK, id="fresh"),
    pytest.param(30.0, 0, NagiosStatus.OK, id="age-at-warn-is-ok"),
    pytest.param(30.01, 0, NagiosStatus.WARNING, id="age-just-above-warn"),
    pytest.param(60.0, 0, NagiosStatus.WARNING, id="age-at-critical-is-warning"),
    pytest.param(60.01, 0, NagiosStatus.CRITICAL, id="age-just-above-critical"),
    pytest.param(1.0, 30, NagiosStatus.OK, id="streak-at-warn-is-ok"),
    pytest.param(1.0, 31, NagiosStatus.WARNING, id="streak-above-warn"),
    pytest.param(1.0, 60, NagiosStatus.WARNING, id="streak-at-critical-is-warning"),
    pytest.param(1.0, 61, NagiosStatus.CRITICAL, id="streak-above-critical"),
    pytest.param(45.0, 61, NagiosStatus.CRITICAL, id="worse-of-the-two"),
    pytest.param(61.0, 31, NagiosStatus.CRITICAL, id="worse-of-the-two-reversed"),
    pytest.param(None, 0, NagiosStatus.OK, id="no-success-yet-streak-ok"),
    pytest.param(None, 31, NagiosStatus.WARNING, id="no-success-yet-streak-warning"),
    pytest.param(45.0, None, NagiosStatus.WARNING, id="no-run-recorded-age-warning"),
    pytest.param(None, None, NagiosStatus.UNKNOWN, id="no-data-at-all"),
])
def test_nagios_status_at_each_threshold_boundary(age, streak, expected):
    status, line = nagios_check(report_with(age, streak), 30, 60)

    assert status is expected
    assert line.startswith(f"AVAILABILITY-CRON {expected.name} - ")
    assert "\n" not in line


def test_the_status_line_follows_the_plugin_output_format():
    status, line = nagios_check(report_with(1.2, 0), 30, 60)

    assert status is NagiosStatus.OK
    assert line == ("AVAILABILITY-CRON OK - data age 1.2 min, lock-skip streak 0 | "
                    "data_age_minutes=1.2;30;60 lock_skip_streak=0;30;60")


def test_the_status_line_says_which_threshold_was_crossed():
    _, line = nagios_check(report_with(75.5, 31), 30, 60.5)

    assert line.startswith("AVAILABILITY-CRON CRITICAL - data age 75.5 min (> 60.5), "
                           "lock-skip streak 31 (> 30) | ")


def test_a_measure_without_data_is_shown_as_n_a_with_undetermined_perfdata():
    _, line = nagios_check(report_with(None, 2), 30, 60)

    assert "data age n/a" in line
    assert "data_age_minutes=U;30;60" in line


def test_an_unknown_status_line_stays_on_one_line():
    status, line = nagios_unknown("cannot connect:\n  connection refused")

    assert status is NagiosStatus.UNKNOWN
    assert line == "AVAILABILITY-CRON UNKNOWN - cannot connect: connection refused"


@pytest.mark.parametrize(("warn", "crit", "message"), [
    pytest.param(30.0, None, "together", id="warn-alone"),
    pytest.param(None, 60.0, "together", id="critical-alone"),
    pytest.param(0.0, 60.0, "--warn-after must be a number of minutes above 0", id="zero"),
    pytest.param(-1.0, 60.0, "--warn-after", id="negative"),
    pytest.param(30.0, float("nan"), "--critical-after", id="nan"),
    pytest.param(30.0, float("inf"), "--critical-after", id="inf"),
    pytest.param(61.0, 60.0, "must not be above", id="warn-above-critical"),
])
def test_invalid_thresholds_are_refused(warn, crit, message):
    with pytest.raises(ConfigError, match=message):
        validate_thresholds(warn, crit)


def test_equal_thresholds_and_no_thresholds_are_accepted():
    assert validate_thresholds(5.0, 5.0) == (5.0, 5.0)
    assert validate_thresholds(None, None) is None


# --- end to end -------------------------------------------------------------------------------


def fresh_cache(conn: Any, workspace_id: str, age: timedelta) -> None:
    now = datetime.now(UTC)
    add_workspace(conn, workspace_id)
    add_cache(conn, workspace_id, refreshed_at=now - age, stale_at=now + timedelta(minutes=1),
              slots=[])


def db_env(database_url: str, **extra: str) -> dict[str, str]:
    return clean_env(DATABASE_URL=database_url, **extra)


@pytest.mark.e2e
def test_metrics_prints_prometheus_text_from_the_database(database_url, conn):
    fresh_cache(conn, "ws-1", timedelta(minutes=3))
    add_workspace(conn, "ws-missing")
    add_run(conn, started_at=datetime.now(UTC) - timedelta(seconds=30), refreshed=1)

    result = run_cli("metrics", "--format", "prometheus", env=db_env(database_url))

    assert result.returncode == 0, result.stderr
    families = parse(result.stdout)
    assert value(families, "availability_cron_workspaces") == 2
    assert value(families, "availability_cron_missing_caches") == 1
    assert 180 <= value(families, "availability_cron_oldest_success_age_seconds") < 240
    assert value(families, "availability_cron_lock_skip_streak") == 0
    assert not any("workspace_" in name for name in families)


@pytest.mark.e2e
def test_per_workspace_series_from_the_database_escape_awkward_ids(database_url, conn):
    tricky = 'a"b\\c\nd'
    fresh_cache(conn, tricky, timedelta(minutes=3))
    fresh_cache(conn, "plain", timedelta(minutes=1))

    result = run_cli("metrics", "--format", "prometheus", "--per-workspace",
                     env=db_env(database_url))

    assert result.returncode == 0, result.stderr
    families = parse(result.stdout)
    ages = {s.labels["workspace"]: s.value
            for s in families["availability_cron_workspace_success_age_seconds"].samples}
    assert set(ages) == {tricky, "plain"}
    assert 180 <= ages[tricky] < 240


@pytest.mark.e2e
def test_metrics_textfile_writes_the_file_and_prints_nothing(database_url, conn, tmp_path):
    fresh_cache(conn, "ws-1", timedelta(minutes=3))
    path = tmp_path / "availability_cron.prom"
    path.write_text("# old\n")

    result = run_cli("metrics", "--textfile", str(path), env=db_env(database_url))

    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert value(parse(path.read_text()), "availability_cron_workspaces") == 1
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert os.listdir(tmp_path) == ["availability_cron.prom"]


@pytest.mark.e2e
def test_metrics_textfile_keeps_the_old_file_when_the_database_is_down(tmp_path):
    path = tmp_path / "availability_cron.prom"
    path.write_text("# old\n")

    result = run_cli("metrics", "--textfile", str(path),
                     env=clean_env(DATABASE_URL=CLOSED_PORT_URL))

    assert result.returncode == 1
    assert result.stdout == ""
    assert path.read_text() == "# old\n"


@pytest.mark.e2e
@pytest.mark.parametrize(("age_minutes", "expected"), [
    pytest.param(1, NagiosStatus.OK, id="ok"),
    pytest.param(45, NagiosStatus.WARNING, id="warning"),
    pytest.param(90, NagiosStatus.CRITICAL, id="critical"),
])
def test_the_check_exits_with_the_nagios_code_of_the_oldest_success_age(
    database_url, conn, age_minutes, expected
):
    fresh_cache(conn, "ws-1", timedelta(minutes=age_minutes))
    add_run(conn, started_at=datetime.now(UTC) - timedelta(seconds=30), refreshed=1)

    result = run_cli("metrics", "--warn-after", "30", "--critical-after", "60",
                     env=db_env(database_url))

    assert result.returncode == int(expected), result.stderr
    [line] = result.stdout.splitlines()
    assert line.startswith(f"AVAILABILITY-CRON {expected.name} - data age ")
    assert "| data_age_minutes=" in line and "lock_skip_streak=0;30;60" in line


@pytest.mark.e2e
def test_the_check_is_critical_when_runs_keep_skipping_on_the_lock(database_url, conn):
    fresh_cache(conn, "ws-1", timedelta(minutes=1))
    now = datetime.now(UTC)
    for minutes in range(10, 0, -1):
        add_run(conn, started_at=now - timedelta(minutes=minutes), outcome="skipped")

    result = run_cli("metrics", "--warn-after", "3", "--critical-after", "5",
                     env=db_env(database_url))

    assert result.returncode == 2, result.stderr
    assert "lock-skip streak 10 (> 5)" in result.stdout


@pytest.mark.e2e
def test_the_check_is_unknown_when_the_database_is_unreachable_and_never_shows_the_password():
    password = "pw-n0t-for-nagios"
    result = run_cli("metrics", "--warn-after", "30", "--critical-after", "60",
                     env=clean_env(DATABASE_URL=f"postgresql://app:{password}@127.0.0.1:1/x"))

    assert result.returncode == 3
    [line] = result.stdout.splitlines()
    assert line.startswith("AVAILABILITY-CRON UNKNOWN - cannot connect to the database")
    assert password not in result.stdout + result.stderr


@pytest.mark.e2e
def test_the_check_is_unknown_when_the_schema_is_missing(empty_database_url):
    result = run_cli("metrics", "--warn-after", "30", "--critical-after", "60",
                     env=db_env(empty_database_url))

    assert result.returncode == 3
    assert result.stdout.startswith("AVAILABILITY-CRON UNKNOWN - ")
    assert "db migrate" in result.stdout


@pytest.mark.e2e
def test_the_check_is_unknown_when_there_is_no_data_at_all(database_url):
    result = run_cli("metrics", "--warn-after", "30", "--critical-after", "60",
                     env=db_env(database_url))

    assert result.returncode == 3
    assert result.stdout.startswith("AVAILABILITY-CRON UNKNOWN - no data")


@pytest.mark.e2e
@pytest.mark.parametrize("args", [
    pytest.param(("--warn-after", "60", "--critical-after", "30"), id="warn-above-critical"),
    pytest.param(("--warn-after", "0", "--critical-after", "30"), id="zero"),
    pytest.param(("--warn-after", "30"), id="warn-alone"),
    pytest.param(("--warn-after", "30", "--critical-after", "60", "--format", "json"),
                 id="check-with-format"),
    pytest.param(("--warn-after", "30", "--critical-after", "60", "--env-file", "/nonexistent"),
                 id="check-with-missing-env-file"),
])
def test_bad_options_in_check_mode_are_unknown_with_a_status_line(args):
    # The plugin guidelines: a usage error is UNKNOWN (3), with one line saying why.
    result = run_cli("metrics", *args, env=clean_env(DATABASE_URL=CLOSED_PORT_URL))

    assert result.returncode == 3, (result.stdout, result.stderr)
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("AVAILABILITY-CRON UNKNOWN - ")


@pytest.mark.e2e
@pytest.mark.parametrize("args", [
    pytest.param(("--warn-after", "x", "--critical-after", "60"), id="not-a-number"),
    pytest.param(("--warn-after", "３", "--critical-after", "60"), id="non-ascii-digit"),
    pytest.param(("--warn-after", "30", "--critical-after", "60", "--bogus"), id="unknown-flag"),
    pytest.param(("--bogus", "--warn-after=30", "--critical-after=60"), id="unknown-flag-first"),
    pytest.param(("--critical-after", "60", "--warn-after"), id="missing-value"),
    pytest.param(("--warn-after", "30", "--critical-after", "60", "--format", "xml"),
                 id="bad-choice"),
    pytest.param(("--warn-after", "30", "--critical-after", "60", "extra"), id="extra-argument"),
])
def test_usage_errors_caught_by_the_option_parser_in_check_mode_are_unknown_with_a_status_line(
    args
):
    # Nagios shows CRITICAL "(No output)" for an exit 2 with nothing on stdout.
    result = run_cli("metrics", *args, env=clean_env(DATABASE_URL=CLOSED_PORT_URL))

    assert result.returncode == 3, (result.stdout, result.stderr)
    [line] = result.stdout.splitlines()
    assert line.startswith("AVAILABILITY-CRON UNKNOWN - "), line


@pytest.mark.e2e
def test_an_unexpected_error_in_check_mode_is_unknown_with_a_status_line(database_url, conn):
    # A source view whose created_at is text breaks the contract for the whole relation:
    # an error that is not one of availability-cron's own must still give Nagios a status
    # line, not a traceback and 1. (The DateStyle crash that once served here is gone.)
    add_workspace(conn, "ws-never-refreshed")  # its age counts from created_at
    conn.execute("CREATE VIEW textual AS SELECT workspace_id, provider, provider_config,"
                 " enabled, created_at::text AS created_at FROM availability_workspaces")

    result = run_cli("metrics", "--warn-after", "30", "--critical-after", "60",
                     env=db_env(database_url, AVAILABILITY_CRON_SOURCE_TABLE="textual"))

    assert result.returncode == 3, (result.stdout, result.stderr)
    [line] = result.stdout.splitlines()
    assert line.startswith("AVAILABILITY-CRON UNKNOWN - unexpected error: "), line


def test_check_mode_reads_a_database_whose_datestyle_is_not_iso(database_url, conn):
    from psycopg import sql

    fresh_cache(conn, "ws-1", timedelta(minutes=1))
    conn.execute(sql.SQL("ALTER DATABASE {} SET DateStyle = 'German'").format(
        sql.Identifier(conn.info.dbname)))

    result = run_cli("metrics", "--warn-after", "30", "--critical-after", "60",
                     env=db_env(database_url))

    assert result.returncode == 0, (result.stdout, result.stderr)
    assert result.stdout.startswith("AVAILABILITY-CRON OK - ")


@pytest.mark.e2e
@pytest.mark.parametrize("args", [
    pytest.param(("--per-workspace",), id="per-workspace-without-prometheus"),
    pytest.param(("--textfile", "/nonexistent-dir/x.prom"), id="textfile-dir-missing"),
    pytest.param(("--textfile", "x.prom", "--format", "table"), id="textfile-with-table"),
])
def test_bad_metrics_options_exit_2_before_touching_the_database(args):
    result = run_cli("metrics", *args, env=clean_env(DATABASE_URL=CLOSED_PORT_URL))

    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stdout == ""
    assert "availability-cron: error:" in result.stderr


@pytest.mark.e2e
def test_metrics_help_says_check_mode_exit_codes_follow_nagios():
    result = run_cli("metrics", "--help", env=clean_env(COLUMNS="100"))

    text = " ".join(result.stdout.split())
    assert result.returncode == 0
    assert "Nagios" in text
    for phrase in ("0 OK", "1 WARNING", "2 CRITICAL", "3 UNKNOWN"):
        assert phrase in text


def test_the_check_counts_workspaces_that_never_got_data_as_stale_since_created():
    # Every workspace has failed since it was created 90 minutes ago: no "last success"
    # to age, yet the apps have had no data for 90 minutes.
    never = StalenessReport(
        at=NOW, workspaces=50, caches=50, missing_caches=0, stale_due=0, erroring_caches=50,
        never_succeeded=50, oldest_success_age_seconds=None,
        oldest_range_start_age_seconds=None, success_age_p50_seconds=None,
        success_age_p95_seconds=None, runs=RUNS, oldest_never_succeeded_age_seconds=90 * 60.0,
    )
    status, line = nagios_check(never, 30, 60)
    assert status is NagiosStatus.CRITICAL
    assert "data age 90 min" in line

