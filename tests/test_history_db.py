"""Run history: one row per refresh run in availability_cron_runs, pruned by age, and the run
numbers `metrics` reads back from it.

The in-process tests write and read rows on a real PostgreSQL; the end-to-end ones run the
installed command, as cron does, and check the row each run leaves behind.
"""

from __future__ import annotations

import json
import logging
import subprocess
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from helpers import (
    CLI,
    NOW,
    add_run,
    add_workspace,
    clean_env,
    make_settings,
    run_cli,
    run_rows,
    wait_for_backend,
    wait_for_caches,
)

from availability_cron import history, lock, metrics
from availability_cron.errors import DatabaseUnavailable
from availability_cron.refresh import RunSummary

PASSWORD = "hunter2-very-secret"


def summary(**overrides: Any) -> RunSummary:
    fields: dict[str, Any] = dict(
        success=True, skipped=False, reason=None, run_id="run000000001", started_at=NOW,
        duration_ms=4375, time_budget_ms=45000, concurrency=5, limit=500, planned=198,
        attempted=198, refreshed=193, errors=5, finished_within_budget=True,
    )
    fields.update(overrides)
    return RunSummary(**fields)


def runs_at(conn: psycopg.Connection[Any], at=NOW) -> dict[str, object]:
    return metrics.run_history(conn, at).as_json()


def minutes_ago(minutes: float):
    return NOW - timedelta(minutes=minutes)


# --- outcome ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("fields", "expected"), [
    pytest.param({}, "completed", id="completed"),
    pytest.param({"success": True, "skipped": True, "reason": "locked"}, "skipped",
                 id="skipped-locked"),
    pytest.param({"success": False, "skipped": True, "reason": "lock-stuck"}, "failed",
                 id="lock-stuck"),
    pytest.param({"success": False, "reason": "error", "error": "connection lost"}, "failed",
                 id="error"),
])
def test_the_outcome_follows_the_exit_code_and_the_skip(fields, expected):
    assert history.outcome_of(summary(**fields)) == expected


# --- record_run and prune ---------------------------------------------------------------------


def test_a_recorded_run_keeps_its_numbers_and_its_printed_summary(conn):
    s = summary()
    finished = NOW + timedelta(milliseconds=4400)

    history.record_run(conn, s, host="cron-1", pid=1234, finished_at=finished)

    [row] = run_rows(conn)
    assert {k: row[k] for k in ("run_id", "host", "pid", "started_at", "finished_at", "outcome",
                                "duration_ms", "within_budget", "refreshed")} == {
        "run_id": "run000000001", "host": "cron-1", "pid": 1234, "started_at": NOW,
        "finished_at": finished, "outcome": "completed", "duration_ms": 4375,
        "within_budget": True, "refreshed": 193,
    }
    assert row["summary"] == s.as_json()


def test_recording_the_same_run_twice_keeps_the_first_row(conn):
    history.record_run(conn, summary(), host="a", pid=1, finished_at=NOW)
    history.record_run(conn, summary(refreshed=0), host="b", pid=2, finished_at=NOW)

    assert [(r["host"], r["refreshed"]) for r in run_rows(conn)] == [("a", 193)]


def test_a_recorded_error_is_scrubbed_of_secrets(conn):
    s = summary(success=False, reason="error", error=f"cannot connect: password {PASSWORD}")

    history.record_run(conn, s, host="h", pid=1, finished_at=NOW, secrets=[PASSWORD])

    [row] = run_rows(conn)
    assert PASSWORD not in json.dumps(row["summary"])
    assert row["summary"]["error"] == "cannot connect: password ***"
    assert row["outcome"] == "failed"


def test_prune_deletes_runs_started_before_the_retention_and_keeps_the_rest(conn):
    retention = timedelta(days=7)
    old = [add_run(conn, started_at=NOW - retention - timedelta(seconds=s)) for s in (1, 86400)]
    kept = [add_run(conn, started_at=NOW - retention),
            add_run(conn, started_at=NOW - timedelta(days=1)),
            add_run(conn, started_at=NOW)]

    deleted = history.prune(conn, 7, NOW)

    assert deleted == len(old)
    assert sorted(r["run_id"] for r in run_rows(conn)) == sorted(kept)


def test_a_pruning_backlog_is_worked_off_oldest_first_a_batch_per_run(conn, monkeypatch):
    monkeypatch.setattr(history, "PRUNE_BATCH", 3)
    old = [add_run(conn, started_at=NOW - timedelta(days=30, minutes=m)) for m in range(7)]
    recent = add_run(conn, started_at=NOW)

    assert [history.prune(conn, 7, NOW) for _ in range(4)] == [3, 3, 1, 0]
    assert [r["run_id"] for r in run_rows(conn)] == [recent]
    assert len(old) == 7


# --- record_best_effort -----------------------------------------------------------------------


def test_recording_best_effort_records_the_run_and_prunes_old_ones(database_url, conn):
    add_run(conn, started_at=NOW - timedelta(days=3))
    settings = make_settings(database_url, run_retention_days=2)

    ok = history.record_best_effort(
        lambda: psycopg.connect(database_url, autocommit=True), summary(), settings,
        host="h", pid=7, now=lambda: NOW + timedelta(seconds=5))

    assert ok is True
    assert [r["run_id"] for r in run_rows(conn)] == ["run000000001"]


def test_recording_best_effort_logs_a_warning_instead_of_raising_when_it_cannot_connect(caplog):
    settings = make_settings(f"postgresql://app:{PASSWORD}@127.0.0.1:1/x")

    def refuse() -> Any:
        raise DatabaseUnavailable(f"cannot connect to the database: password {PASSWORD} refused")

    with caplog.at_level(logging.WARNING, logger="availability_cron.history"):
        ok = history.record_best_effort(refuse, summary(), settings, host="h", pid=1,
                                        now=lambda: NOW)

    assert ok is False
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert "run not recorded" in record.getMessage()
    assert PASSWORD not in record.getMessage()


def test_recording_best_effort_returns_false_when_the_history_table_is_missing(
    database_url, conn, caplog
):
    conn.execute("DROP TABLE availability_cron_runs")

    with caplog.at_level(logging.WARNING, logger="availability_cron.history"):
        ok = history.record_best_effort(
            lambda: psycopg.connect(database_url, autocommit=True), summary(),
            make_settings(database_url), host="h", pid=1, now=lambda: NOW)

    assert ok is False
    assert "availability_cron_runs" in caplog.text and "db migrate" in caplog.text


# --- the run numbers of `metrics` -------------------------------------------------------------


def test_run_numbers_are_null_when_no_run_is_recorded(conn):
    assert runs_at(conn) == {
        "lastRunAt": None, "lastCompletedRunAt": None, "lastRefreshingRunAt": None,
        "lockSkipStreak": None, "runs24h": 0, "runsFailed24h": None,
        "runsOverBudget24h": None, "runDurationP50Ms": None, "runDurationP95Ms": None,
    }


def test_lock_skip_streak_counts_the_newest_skipped_runs_up_to_the_first_that_was_not(conn):
    add_run(conn, started_at=minutes_ago(10), outcome="skipped")
    add_run(conn, started_at=minutes_ago(9), outcome="completed")
    add_run(conn, started_at=minutes_ago(8), outcome="skipped")
    add_run(conn, started_at=minutes_ago(7), outcome="completed")
    for m in (3, 2, 1):
        add_run(conn, started_at=minutes_ago(m), outcome="skipped")

    assert runs_at(conn)["lockSkipStreak"] == 3


def test_a_run_skipped_while_a_healthy_run_was_still_going_is_not_a_streak(conn):
    # Two hosts: the second run each minute starts while the first still holds the lock.
    add_run(conn, started_at=minutes_ago(2), outcome="completed", duration_ms=40_000)
    add_run(conn, started_at=minutes_ago(2) + timedelta(seconds=1), outcome="skipped")
    report = runs_at(conn)
    assert report["lockSkipStreak"] == 0
    # The last finish, not the last start: the completed run finished after the skip.
    assert report["lastRunAt"] == (minutes_ago(2) + timedelta(seconds=40)).isoformat().replace(
        "+00:00", "Z")


def test_lock_stuck_runs_continue_the_streak_but_other_failures_end_it(conn):
    add_run(conn, started_at=minutes_ago(6), outcome="completed")
    add_run(conn, started_at=minutes_ago(5), outcome="failed")  # e.g. database down
    add_run(conn, started_at=minutes_ago(4), outcome="skipped")
    add_run(conn, started_at=minutes_ago(3), outcome="skipped")
    add_run(conn, started_at=minutes_ago(2), outcome="failed", reason="lock-stuck")
    add_run(conn, started_at=minutes_ago(1), outcome="failed", reason="lock-stuck")

    assert runs_at(conn)["lockSkipStreak"] == 4


def test_lock_skip_streak_is_zero_when_the_newest_run_was_not_skipped(conn):
    add_run(conn, started_at=minutes_ago(2), outcome="skipped")
    add_run(conn, started_at=minutes_ago(1), outcome="failed")

    assert runs_at(conn)["lockSkipStreak"] == 0


def test_lock_skip_streak_counts_every_run_when_all_were_skipped(conn):
    for m in (3, 2, 1):
        add_run(conn, started_at=minutes_ago(m), outcome="skipped")

    assert runs_at(conn)["lockSkipStreak"] == 3


def test_run_durations_cover_the_last_24h_and_leave_out_skipped_runs(conn):
    for ms in (4000, 1000, 3000):
        add_run(conn, started_at=minutes_ago(ms / 100), duration_ms=ms)
    add_run(conn, started_at=minutes_ago(20), outcome="failed", duration_ms=2000)
    add_run(conn, started_at=minutes_ago(5), outcome="skipped", duration_ms=5)
    add_run(conn, started_at=minutes_ago(4), outcome="failed", reason="lock-stuck",
            duration_ms=6)
    add_run(conn, started_at=NOW - timedelta(hours=24), duration_ms=900_000)  # just outside

    got = runs_at(conn)

    # 1000, 2000, 3000, 4000 (n = 4): p50 at position 1.5 -> 2500; p95 at 2.85 -> 3850.
    assert got["runDurationP50Ms"] == 2500.0
    assert got["runDurationP95Ms"] == 3850.0
    assert got["runs24h"] == 6


def test_run_durations_are_null_when_every_recent_run_was_skipped(conn):
    add_run(conn, started_at=minutes_ago(2), outcome="skipped")
    add_run(conn, started_at=NOW - timedelta(hours=25), duration_ms=3000)

    got = runs_at(conn)

    assert (got["runDurationP50Ms"], got["runDurationP95Ms"]) == (None, None)
    assert (got["runs24h"], got["runsFailed24h"], got["runsOverBudget24h"]) == (1, 0, 0)


def test_over_budget_counts_completed_runs_that_missed_their_budget_and_failed_counts_exit_1(
    conn
):
    add_run(conn, started_at=minutes_ago(9), within_budget=False)  # over budget
    add_run(conn, started_at=minutes_ago(8), within_budget=False)  # over budget
    add_run(conn, started_at=minutes_ago(7))
    add_run(conn, started_at=minutes_ago(6), outcome="skipped")
    # A failed run never finishes its work (within_budget false): it counts as failed only.
    add_run(conn, started_at=minutes_ago(5), outcome="failed")
    add_run(conn, started_at=minutes_ago(4), outcome="failed", reason="lock-stuck")
    add_run(conn, started_at=NOW - timedelta(hours=30), within_budget=False)
    add_run(conn, started_at=NOW - timedelta(hours=30), outcome="failed")

    got = runs_at(conn)

    assert (got["runs24h"], got["runsOverBudget24h"], got["runsFailed24h"]) == (6, 2, 2)


def test_counters_are_null_when_no_run_started_in_the_last_24h(conn):
    add_run(conn, started_at=NOW - timedelta(hours=25), outcome="failed")

    got = runs_at(conn)

    assert (got["runs24h"], got["runsFailed24h"], got["runsOverBudget24h"]) == (0, None, None)
    assert got["lastRunAt"] is not None and got["lockSkipStreak"] == 0


def test_last_run_times_are_when_the_newest_run_of_each_kind_finished(conn):
    add_run(conn, started_at=minutes_ago(30), refreshed=5, duration_ms=2000)
    add_run(conn, started_at=minutes_ago(20), refreshed=0, duration_ms=3000)
    add_run(conn, started_at=minutes_ago(10), outcome="failed", refreshed=2, duration_ms=4000)
    add_run(conn, started_at=minutes_ago(5), outcome="skipped", duration_ms=5)

    got = runs_at(conn)

    def finished(minutes: float, ms: int) -> str:
        at = minutes_ago(minutes) + timedelta(milliseconds=ms)
        return at.isoformat().replace("+00:00", "Z")

    assert got["lastRunAt"] == finished(5, 5)
    assert got["lastCompletedRunAt"] == finished(20, 3000)
    assert got["lastRefreshingRunAt"] == finished(10, 4000)  # a failed run that wrote some


def test_manual_workspace_runs_do_not_count_in_the_run_numbers(conn):
    add_run(conn, started_at=minutes_ago(3), outcome="skipped")
    add_run(conn, started_at=minutes_ago(2), outcome="skipped")
    add_run(conn, started_at=minutes_ago(1), outcome="failed", refreshed=0, workspace="ws-1")

    got = runs_at(conn)

    assert got["lockSkipStreak"] == 2
    assert got["runsFailed24h"] == 0
    assert got["runs24h"] == 2


def test_the_staleness_report_carries_the_run_numbers(conn):
    add_run(conn, started_at=minutes_ago(1), outcome="skipped")

    got = metrics.staleness(conn, "availability_workspaces", NOW).as_json()

    assert got["lockSkipStreak"] == 1
    assert got["runs24h"] == 1


# --- end to end: the row each real run leaves ------------------------------------------------


@pytest.mark.e2e
def test_a_completed_cron_run_is_recorded_with_its_summary(database_url, conn):
    add_workspace(conn, "ws-1")
    add_workspace(conn, "ws-2")

    result = run_cli("refresh", env=clean_env(DATABASE_URL=database_url))

    assert result.returncode == 0, result.stderr
    printed = result.json()
    [row] = run_rows(conn)
    assert row["run_id"] == printed["runId"]
    assert row["outcome"] == "completed"
    assert row["refreshed"] == printed["refreshed"] == 2
    assert row["duration_ms"] == printed["durationMs"]
    assert row["within_budget"] is printed["finishedWithinBudget"]
    assert row["summary"] == printed
    assert row["host"] and row["pid"] > 0
    assert row["finished_at"] >= row["started_at"]


@pytest.mark.e2e
def test_a_run_skipped_on_the_lock_is_recorded_as_skipped(database_url, conn):
    add_workspace(conn, "ws-1")
    settings = make_settings(database_url)
    with psycopg.connect(database_url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (settings.lock_key,))

        result = run_cli("refresh", env=clean_env(DATABASE_URL=database_url))

    assert result.returncode == 0, result.stderr
    assert result.json()["skipped"] is True
    [row] = run_rows(conn)
    assert (row["outcome"], row["refreshed"], row["within_budget"]) == ("skipped", 0, True)
    assert row["summary"]["reason"] == "locked"
    assert metrics.run_history(conn, row["finished_at"]).lock_skip_streak == 1


@pytest.mark.e2e
def test_a_run_whose_lock_connection_dies_midway_is_recorded_as_failed(database_url, conn):
    for i in range(40):
        add_workspace(conn, f"ws-{i:02d}", config={"latency_ms": 250})
    env = clean_env(DATABASE_URL=database_url, AVAILABILITY_CRON_CONCURRENCY="1",
                    AVAILABILITY_CRON_TIME_BUDGET_MS="20000",
                    AVAILABILITY_CRON_DEADLINE_MARGIN_MS="1000")
    proc = subprocess.Popen([CLI, "refresh"], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        pid = wait_for_backend(conn, "lock")
        wait_for_caches(conn, 2)
        conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()

    assert proc.returncode == 1, stderr
    printed = json.loads(stdout)
    [row] = run_rows(conn)
    assert row["run_id"] == printed["runId"]
    assert row["outcome"] == "failed"
    assert "lock connection was lost" in row["summary"]["error"]
    assert row["refreshed"] == printed["refreshed"] >= 2
    assert lock.find_holder(conn, lock.lock_key("refresh")) is None


@pytest.mark.e2e
def test_a_run_prunes_runs_older_than_the_retention(database_url, conn):
    add_workspace(conn, "ws-1")
    from datetime import UTC, datetime

    now = datetime.now(UTC)
    old = add_run(conn, started_at=now - timedelta(days=3, minutes=1))
    recent = add_run(conn, started_at=now - timedelta(days=1))

    result = run_cli("refresh", env=clean_env(DATABASE_URL=database_url,
                                              AVAILABILITY_CRON_RUN_RETENTION_DAYS="3"))

    assert result.returncode == 0, result.stderr
    ids = {r["run_id"] for r in run_rows(conn)}
    assert old not in ids
    assert ids == {recent, result.json()["runId"]}


@pytest.mark.e2e
def test_a_run_whose_history_cannot_be_written_still_exits_0_with_its_summary(
    database_url, conn
):
    add_workspace(conn, "ws-1")
    conn.execute("DROP TABLE availability_cron_runs")

    result = run_cli("refresh", env=clean_env(DATABASE_URL=database_url))

    assert result.returncode == 0, result.stderr
    assert result.json()["refreshed"] == 1
    warnings = [line for line in result.stderr.splitlines() if " WARNING " in line]
    assert any("run not recorded" in line for line in warnings), result.stderr


@pytest.mark.e2e
def test_a_dry_run_is_not_recorded(database_url, conn):
    add_workspace(conn, "ws-1")

    result = run_cli("refresh", "--dry-run", env=clean_env(DATABASE_URL=database_url))

    assert result.returncode == 0, result.stderr
    assert run_rows(conn) == []

