"""Losing the database mid-run: the run stops with exit 1 and says which connection died.

The faults are real: the test ends the run's backends with pg_terminate_backend, as an
operator, a failover or a pooler would.
"""

from __future__ import annotations

import json
import subprocess
import time
from typing import Any

import psycopg
import pytest
from blackhole import blackhole_proxy
from helpers import CLI, add_workspace, clean_env, wait_for_backend, wait_for_caches

from availability_cron import deadline, history, lock

pytestmark = pytest.mark.e2e


def _start_slow_run(database_url: str) -> subprocess.Popen[str]:
    """A run that keeps refreshing for several seconds (40 workspaces x 250 ms, 1 worker)."""
    env = clean_env(DATABASE_URL=database_url, AVAILABILITY_CRON_TIME_BUDGET_MS="20000",
                    AVAILABILITY_CRON_DEADLINE_MARGIN_MS="1000",
                    AVAILABILITY_CRON_CONCURRENCY="1")
    return subprocess.Popen([CLI, "refresh"], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize(
    ("purpose", "expected"),
    [("work", "connection was lost mid-run"), ("lock", "lock connection was lost")],
)
def test_a_run_whose_connection_is_terminated_stops_with_exit_1_and_says_so(
    database_url, conn, purpose, expected
):
    for i in range(40):
        add_workspace(conn, f"ws-{i:02d}", config={"latency_ms": 250})
    proc = _start_slow_run(database_url)
    try:
        pid = wait_for_backend(conn, purpose)
        wait_for_caches(conn, 2)  # so the fault really is mid-run
        started = time.monotonic()
        conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        stdout, stderr = proc.communicate(timeout=30)
        stopped_after = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1, stderr
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert len(lines) == 1
    import json

    summary = json.loads(lines[0])
    assert summary["success"] is False and summary["reason"] == "error"
    assert expected in summary["error"]
    assert expected in stderr
    # It stopped promptly instead of refreshing the other ~35 workspaces (~9 s).
    assert stopped_after < 5, stopped_after
    # The lock is free for the next run either way.
    assert lock.find_holder(conn, lock.lock_key("refresh")) is None


def test_a_read_only_database_is_refused_with_exit_1_naming_the_primary(
    database_url, conn, server_url
):
    # A hot standby cannot be made here cheaply; a database whose transactions are
    # read-only by default fails the same way on the first write and must say so.
    add_workspace(conn, "ws-1")
    dbname = conn.info.dbname
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(
            psycopg.sql.SQL("ALTER DATABASE {} SET default_transaction_read_only = on").format(
                psycopg.sql.Identifier(dbname)
            )
        )
    proc = subprocess.run([CLI, "refresh"], env=clean_env(DATABASE_URL=database_url),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert "read-only" in proc.stderr and "primary" in proc.stderr
    with psycopg.connect(database_url, autocommit=True) as check:
        assert check.execute("SELECT count(*) FROM workspace_availability_cache").fetchone() == (0,)


def test_losing_the_lock_is_noticed_within_seconds_even_while_every_call_is_slow(
    database_url, conn
):
    # Nothing finishes for 8 s, so nothing is written: the check must not ride on writes.
    for i in range(5):
        add_workspace(conn, f"ws-{i}", config={"latency_ms": 8000})
    env = clean_env(DATABASE_URL=database_url, AVAILABILITY_CRON_TIME_BUDGET_MS="20000",
                    AVAILABILITY_CRON_DEADLINE_MARGIN_MS="1000")
    proc = subprocess.Popen([CLI, "refresh"], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        pid = wait_for_backend(conn, "lock")
        time.sleep(0.5)
        started = time.monotonic()
        conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        stdout, stderr = proc.communicate(timeout=30)
        stopped_after = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1, stderr
    assert "lock connection was lost" in stderr
    assert stopped_after < 4, stopped_after


def test_a_run_failing_midway_still_counts_the_work_it_wrote(database_url, conn):
    import json

    for i in range(40):
        add_workspace(conn, f"ws-{i:02d}", config={"latency_ms": 250})
    proc = _start_slow_run(database_url)
    try:
        pid = wait_for_backend(conn, "work")
        wait_for_caches(conn, 3)
        conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        stdout, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    summary = json.loads(stdout)
    written = conn.execute(
        "SELECT count(*) FROM workspace_availability_cache WHERE refreshed_at IS NOT NULL"
    ).fetchone()[0]
    assert summary["success"] is False
    assert summary["planned"] == 40
    assert summary["refreshed"] == written >= 3
    assert summary["attempted"] >= summary["refreshed"]


def assert_summary_adds_up(summary: dict[str, Any]) -> None:
    """The identities the README promises for every summary (see RunSummary)."""
    counts = {k: summary.get(k, 0) for k in (
        "planned", "attempted", "refreshed", "errors", "lost", "interrupted",
        "skippedDeadline", "notStarted")}
    assert counts["attempted"] == (counts["refreshed"] + counts["errors"] + counts["lost"]
                                   + counts["interrupted"]), counts
    assert counts["planned"] == (counts["attempted"] + counts["skippedDeadline"]
                                 + counts["notStarted"]), counts


@pytest.mark.parametrize("purpose", ["work", "lock"])
def test_the_summary_of_a_run_failing_midway_adds_up(database_url, conn, purpose):
    # Four workers, so that calls are in flight when the connection dies; a 20 s budget,
    # so that no entry is left out for the deadline.
    for i in range(40):
        add_workspace(conn, f"ws-{i:02d}", config={"latency_ms": 250})
    env = clean_env(DATABASE_URL=database_url, AVAILABILITY_CRON_TIME_BUDGET_MS="20000",
                    AVAILABILITY_CRON_DEADLINE_MARGIN_MS="1000",
                    AVAILABILITY_CRON_CONCURRENCY="4")
    proc = subprocess.Popen([CLI, "refresh"], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        pid = wait_for_backend(conn, purpose)
        wait_for_caches(conn, 4)
        conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1, stderr
    summary = json.loads(stdout)
    written = conn.execute(
        "SELECT count(*) FROM workspace_availability_cache WHERE refreshed_at IS NOT NULL"
    ).fetchone()[0]
    assert summary["refreshed"] == written
    assert_summary_adds_up(summary)
    # Nothing was left out for the deadline: what did not start, did not because the run
    # stopped.
    assert summary["skippedDeadline"] == 0
    assert summary["notStarted"] > 0
    if purpose == "work":
        # Every write after the kill carries at least one result: those are lost.
        assert summary["lost"] >= 1


@pytest.mark.parametrize(("waiting_on", "latency_ms"), [("a write", 100), ("the lock check", 8000)])
def test_a_database_gone_silent_cannot_keep_a_run_past_its_worst_case(
    database_url, conn, waiting_on, latency_ms
):
    # Between the run and PostgreSQL, a proxy that turns into a blackhole mid-run: the
    # run's writes and lock checks then wait on sockets nobody will ever answer. With
    # 8 s calls nothing is written, and only the lock check talks to the database.
    for i in range(40):
        add_workspace(conn, f"ws-{i:02d}", config={"latency_ms": latency_ms})
    params = psycopg.conninfo.conninfo_to_dict(database_url)
    budget_ms = 2000
    with blackhole_proxy(str(params.get("host") or "127.0.0.1"),
                         int(params.get("port") or 5432)) as proxy:
        url = psycopg.conninfo.make_conninfo(database_url, host="127.0.0.1",
                                             port=str(proxy.port))
        env = clean_env(DATABASE_URL=url, AVAILABILITY_CRON_TIME_BUDGET_MS=str(budget_ms),
                        AVAILABILITY_CRON_DEADLINE_MARGIN_MS="200",
                        AVAILABILITY_CRON_CONCURRENCY="1")
        started = time.monotonic()
        proc = subprocess.Popen([CLI, "refresh"], env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            if waiting_on == "a write":
                wait_for_caches(conn, 2)
            else:
                wait_for_backend(conn, "work")
                time.sleep(0.3)
            proxy.cut()
            stdout, stderr = proc.communicate(timeout=deadline.worst_case_seconds(budget_ms))
            ended_after = time.monotonic() - started
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 1, stderr
    summary = json.loads(stdout)
    assert summary["success"] is False and summary["reason"] == "error"
    assert ("did not answer" if waiting_on == "a write" else "lock connection was lost") in (
        summary["error"])
    assert_summary_adds_up(summary)
    # The run itself ended by budget + grace + wind-down (+ closing the providers), and
    # the whole process, history included, within the documented worst case.
    assert summary["durationMs"] <= (deadline.worst_case_seconds(budget_ms)
                                     - deadline.PING_SECONDS - history.BOUND_SECONDS) * 1000
    assert ended_after < deadline.worst_case_seconds(budget_ms)
