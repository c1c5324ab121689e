"""A run stopped by SIGTERM or SIGINT (systemctl stop, a start timeout, Kubernetes'
activeDeadlineSeconds, Ctrl-C) still reports: real signals sent to the real command."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from typing import Any

import psycopg
import pytest
from blackhole import blackhole_proxy
from helpers import CLI, add_workspace, clean_env, run_rows, wait_for_caches
from httpserver import LocalServer, Reply
from test_faults import assert_summary_adds_up

from availability_cron import deadline, lock

pytestmark = pytest.mark.e2e

PATH = "/ping/5d0c3a52-7e8b-4c7e-9a57-0f4b1c2d3e4f"


def start_slow_run(database_url: str, ping_url: str) -> subprocess.Popen[str]:
    """A run with ~5 s of work left (40 workspaces x 250 ms on 2 workers) in a 20 s budget."""
    env = clean_env(DATABASE_URL=database_url, AVAILABILITY_CRON_TIME_BUDGET_MS="20000",
                    AVAILABILITY_CRON_DEADLINE_MARGIN_MS="1000",
                    AVAILABILITY_CRON_CONCURRENCY="2", AVAILABILITY_CRON_PING_URL=ping_url)
    return subprocess.Popen([CLI, "refresh"], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_mid_run_stops_it_and_it_still_reports_records_and_pings_fail(
    database_url: str, conn: psycopg.Connection[Any], http_server: LocalServer,
    signum: signal.Signals,
) -> None:
    for suffix in ("/start", "", "/fail"):
        http_server.route(PATH + suffix, Reply(200, "OK"))
    for i in range(40):
        add_workspace(conn, f"ws-{i:02d}", config={"latency_ms": 250})
    proc = start_slow_run(database_url, http_server.url(PATH))
    try:
        wait_for_caches(conn, 2)
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=20)
    finally:
        stop(proc)

    assert proc.returncode == 1, stderr
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert len(lines) == 1, stdout
    summary = json.loads(lines[0])
    assert summary["success"] is False and summary["reason"] == "terminated"
    assert signum.name in summary["error"] and signum.name in stderr
    assert_summary_adds_up(summary)
    assert summary["skippedDeadline"] == 0 and summary["notStarted"] > 0
    written = conn.execute(
        "SELECT count(*) FROM workspace_availability_cache WHERE refreshed_at IS NOT NULL"
    ).fetchone()[0]
    assert summary["refreshed"] == written
    [row] = run_rows(conn)
    assert row["outcome"] == "failed" and row["summary"]["reason"] == "terminated"
    assert [seen.path.removeprefix(PATH) for seen in http_server.requests] == ["/start", "/fail"]
    assert json.loads(http_server.requests[1].body)["reason"] == "terminated"
    assert lock.find_holder(conn, lock.lock_key("refresh")) is None


def test_a_second_signal_ends_the_process_at_once(
    database_url: str, conn: psycopg.Connection[Any], http_server: LocalServer
) -> None:
    # The end ping hangs (up to its 3 s bound): the second SIGTERM arrives while the run
    # waits on it, after the summary is out, and must not wait any longer.
    http_server.route(PATH + "/start", Reply(200, "OK"))
    http_server.route(PATH + "/fail", Reply(200, "OK", delay=10))
    for i in range(40):
        add_workspace(conn, f"ws-{i:02d}", config={"latency_ms": 250})
    proc = start_slow_run(database_url, http_server.url(PATH))
    try:
        wait_for_caches(conn, 2)
        proc.send_signal(signal.SIGTERM)
        assert proc.stdout is not None
        summary = json.loads(proc.stdout.readline())
        deadline = time.monotonic() + 5
        while not any(seen.path.endswith("/fail") for seen in http_server.requests):
            assert time.monotonic() < deadline, "no /fail ping was sent"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=2)  # well within the ping's 3 s bound
    finally:
        stop(proc)
    assert summary["reason"] == "terminated"
    assert proc.returncode == 128 + signal.SIGTERM


def test_a_signal_while_the_database_is_silent_still_ends_within_the_stop_bound(
    database_url: str, conn: psycopg.Connection[Any]
) -> None:
    # The write waiting on the blackhole when SIGTERM arrives must not wait for the rest of
    # the 20 s budget: the stop bounds it too.
    for i in range(40):
        add_workspace(conn, f"ws-{i:02d}", config={"latency_ms": 100})
    params = psycopg.conninfo.conninfo_to_dict(database_url)
    with blackhole_proxy(str(params.get("host") or "127.0.0.1"),
                         int(params.get("port") or 5432)) as proxy:
        url = psycopg.conninfo.make_conninfo(database_url, host="127.0.0.1",
                                             port=str(proxy.port))
        proc = start_slow_run(url, "")
        try:
            wait_for_caches(conn, 2)
            proxy.cut()
            time.sleep(0.3)  # a write is waiting on the blackhole by now
            proc.send_signal(signal.SIGTERM)
            stdout, stderr = proc.communicate(timeout=deadline.stop_seconds())
        finally:
            stop(proc)
    assert proc.returncode == 1, stderr
    summary = json.loads(stdout)
    assert summary["reason"] == "terminated" and "SIGTERM" in summary["error"]
    assert "did not answer" in summary["error"]
    assert_summary_adds_up(summary)
