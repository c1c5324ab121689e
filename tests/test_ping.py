"""The dead-man's switch (Healthchecks protocol) against a real loopback HTTP server.

The end-to-end tests run the installed command exactly as cron does and read what the
server received. The ping URL's path is the check's secret: no test output may show it.
"""

from __future__ import annotations

import json
import socket
import time
import uuid

import pytest
from helpers import CliResult, add_workspace, cache_row, clean_env, make_settings, run_cli
from httpserver import LocalServer, Reply, Seen

from availability_cron.ping import MAX_BODY_BYTES, TIMEOUT_SECONDS, Pinger, where

#: The check's UUID, as in https://hc-ping.com/<uuid>: whoever knows it can ping.
SECRET = "3f2b8c1e-9d4a-4e7b-8c21-5a6f0d9e7b14"
PATH = f"/ping/{SECRET}"


def ping_env(database_url: str, ping_url: str) -> dict[str, str]:
    return clean_env(DATABASE_URL=database_url, AVAILABILITY_CRON_PING_URL=ping_url)


def answer_pings(server: LocalServer, reply: Reply | None = None) -> str:
    """Route the start, success and fail pings of the check; return the check's URL."""
    for suffix in ("/start", "", "/fail"):
        server.route(PATH + suffix, reply or Reply(200, "OK"))
    return server.url(PATH)


def pings(server: LocalServer) -> list[tuple[str, str]]:
    """(method, kind) of every request, kind being the path after the check's URL."""
    return [(seen.method, seen.path.removeprefix(PATH) or "success") for seen in server.requests]


def ping_warnings(result: CliResult) -> list[str]:
    return [line for line in result.stderr.splitlines()
            if "WARNING" in line and "dead-man's-switch" in line]


def assert_secret_never_printed(result: CliResult, server_url: str) -> None:
    assert SECRET not in result.stdout
    assert SECRET not in result.stderr
    for line in ping_warnings(result):
        # Named by scheme and host, and never by its path, not even a scrubbed one.
        assert server_url in line, line
        assert "/ping" not in line and "***" not in line, line


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}{PATH}"


# --- the protocol, end to end -----------------------------------------------------------------


@pytest.mark.e2e
def test_a_completed_run_pings_start_then_success_with_one_rid_and_the_summary(
    database_url, conn, http_server
):
    add_workspace(conn, "ws-1")
    url = answer_pings(http_server)

    result = run_cli("refresh", env=ping_env(database_url, url))

    assert result.returncode == 0, result.stderr
    summary = result.json()
    assert pings(http_server) == [("POST", "/start"), ("POST", "success")]
    start, success = http_server.requests
    rid = start.query["rid"]
    assert success.query["rid"] == rid
    assert uuid.UUID(rid).hex.startswith(summary["runId"])  # a log line's run= finds it
    assert json.loads(success.body) == summary
    assert success.headers["content-type"] == "application/json"
    assert_secret_never_printed(result, http_server.base_url)


@pytest.mark.e2e
def test_a_skipped_run_pings_success_because_the_job_is_alive(database_url, conn, http_server):
    conn.execute("SELECT pg_advisory_lock(%s)", (make_settings(database_url).lock_key,))
    url = answer_pings(http_server)

    result = run_cli("refresh", env=ping_env(database_url, url))

    assert result.returncode == 0, result.stderr
    assert result.json()["skipped"] is True
    assert pings(http_server) == [("POST", "/start"), ("POST", "success")]
    assert json.loads(http_server.requests[1].body)["reason"] == "locked"
    assert len({seen.query["rid"] for seen in http_server.requests}) == 1


@pytest.mark.e2e
def test_a_real_failure_pings_start_then_fail_with_the_error(empty_database_url, http_server):
    url = answer_pings(http_server)

    result = run_cli("refresh", env=ping_env(empty_database_url, url))

    assert result.returncode == 1, result.stderr
    # The start ping goes out before the run knows the schema is missing.
    assert pings(http_server) == [("POST", "/start"), ("POST", "/fail")]
    start, fail = http_server.requests
    assert fail.query["rid"] == start.query["rid"]
    body = json.loads(fail.body)
    assert body == result.json()
    assert body["success"] is False
    assert "availability-cron db migrate" in body["error"]
    assert_secret_never_printed(result, http_server.base_url)


@pytest.mark.e2e
@pytest.mark.parametrize("args", [("--dry-run",), ("--workspace", "ws-1")])
def test_dry_runs_and_single_workspace_runs_do_not_ping(database_url, conn, http_server, args):
    add_workspace(conn, "ws-1")
    url = answer_pings(http_server)

    result = run_cli("refresh", *args, env=ping_env(database_url, url))

    assert result.returncode == 0, result.stderr
    assert http_server.requests == []


# --- a monitor that misbehaves changes nothing ---------------------------------------------------


@pytest.mark.e2e
def test_a_hanging_ping_server_delays_the_end_of_a_run_by_at_most_the_ping_bound(
    database_url, conn, http_server
):
    add_workspace(conn, "ws-1")
    add_workspace(conn, "ws-2")
    began = time.monotonic()
    baseline = run_cli("refresh", "--limit", "1", env=clean_env(DATABASE_URL=database_url))
    baseline_seconds = time.monotonic() - began
    assert baseline.returncode == 0, baseline.stderr
    url = answer_pings(http_server, Reply(200, "OK", delay=30))

    began = time.monotonic()
    result = run_cli("refresh", "--limit", "1", env=ping_env(database_url, url))
    elapsed = time.monotonic() - began

    assert result.returncode == 0, result.stderr
    summary = result.json()
    assert summary["refreshed"] == 1
    # The start ping runs alongside the run: the run itself did not wait for it...
    assert summary["durationMs"] < TIMEOUT_SECONDS * 1000, summary
    # ...and the end of the process waited at most the bound (plus slack for a busy host).
    assert elapsed < baseline_seconds + TIMEOUT_SECONDS + 3.0, (elapsed, baseline_seconds)
    assert ping_warnings(result), result.stderr
    assert_secret_never_printed(result, http_server.base_url)


@pytest.mark.e2e
def test_a_ping_server_answering_500_changes_nothing_but_a_warning(database_url, conn,
                                                                    http_server):
    add_workspace(conn, "ws-1")
    url = answer_pings(http_server, Reply(500, {"error": "down"}))

    result = run_cli("refresh", env=ping_env(database_url, url))

    assert result.returncode == 0, result.stderr
    assert result.json()["refreshed"] == 1
    row = cache_row(conn, "ws-1")
    assert row is not None and row["refreshed_at"] is not None
    warnings = ping_warnings(result)
    assert any("HTTP 500" in line for line in warnings), result.stderr
    assert_secret_never_printed(result, http_server.base_url)


@pytest.mark.e2e
def test_a_failed_run_still_exits_1_when_the_ping_server_answers_500(empty_database_url,
                                                                     http_server):
    url = answer_pings(http_server, Reply(500))

    result = run_cli("refresh", env=ping_env(empty_database_url, url))

    assert result.returncode == 1, result.stderr
    assert result.json()["success"] is False
    assert pings(http_server) == [("POST", "/start"), ("POST", "/fail")]


@pytest.mark.e2e
def test_a_ping_server_refusing_connections_changes_nothing_but_a_warning(database_url, conn):
    add_workspace(conn, "ws-1")
    url = closed_port_url()

    result = run_cli("refresh", env=ping_env(database_url, url))

    assert result.returncode == 0, result.stderr
    assert result.json()["refreshed"] == 1
    warnings = ping_warnings(result)
    assert any("ConnectError" in line for line in warnings), result.stderr
    assert SECRET not in result.stdout + result.stderr
    assert all("/ping" not in line and "***" not in line for line in warnings), warnings


# --- the Pinger itself (in process, no database) ---------------------------------------------


def test_start_returns_at_once_and_finish_within_its_bound_when_the_monitor_hangs(http_server):
    url = answer_pings(http_server, Reply(200, "OK", delay=30))
    pinger = Pinger(url, uuid.uuid4(), timeout=0.5)

    began = time.monotonic()
    pinger.start()
    started_in = time.monotonic() - began
    pinger.finish("{}", ok=True)
    finished_in = time.monotonic() - began

    assert started_in < 0.2
    assert finished_in < 0.5 + 0.5


def test_the_end_ping_is_sent_only_after_the_start_ping_was_answered(http_server):
    answered: list[float] = []
    received: list[float] = []

    def slow_start(_seen: Seen) -> Reply:
        time.sleep(0.3)
        answered.append(time.monotonic())
        return Reply(200, "OK")

    def success(_seen: Seen) -> Reply:
        received.append(time.monotonic())
        return Reply(200, "OK")

    http_server.route(PATH + "/start", slow_start)
    http_server.route(PATH, success)
    pinger = Pinger(http_server.url(PATH), uuid.uuid4(), timeout=2.0)

    pinger.start()
    pinger.finish("{}", ok=True)

    assert len(answered) == 1 and len(received) == 1
    assert received[0] >= answered[0]


def test_a_body_larger_than_the_monitor_accepts_is_cut_to_its_limit(http_server):
    url = answer_pings(http_server)
    pinger = Pinger(url, uuid.uuid4(), timeout=2.0)

    pinger.finish("x" * (MAX_BODY_BYTES + 5000), ok=False)

    (fail,) = http_server.requests
    assert fail.path == PATH + "/fail"
    assert len(fail.body) == MAX_BODY_BYTES


@pytest.mark.parametrize(("url", "expected"), [
    (f"https://hc-ping.com/{SECRET}", "https://hc-ping.com"),
    (f"https://user:pw@hc.example.org:8443/ping/{SECRET}?x=1", "https://hc.example.org:8443"),
    (f"http://[::1]:8000/ping/{SECRET}", "http://[::1]:8000"),
])
def test_log_lines_name_only_the_scheme_and_host_of_the_ping_url(url: str, expected: str):
    assert where(url) == expected


def test_a_ping_url_path_is_one_of_the_settings_secrets():
    settings = make_settings(None, ping_url=f"https://hc-ping.com/{SECRET}")

    assert SECRET in settings.secrets()


def test_a_ping_url_with_a_query_keeps_start_and_fail_in_the_path():
    from availability_cron.ping import ping_url

    base = "https://hc.example/ping/0123456789abcdef/my-job?create=1"
    assert ping_url(base, "/fail", "r1") == (
        "https://hc.example/ping/0123456789abcdef/my-job/fail?create=1&rid=r1")
    assert ping_url(base, "/start", "r1").split("?")[0].endswith("/my-job/start")
    assert ping_url(base, "", "r1") == (
        "https://hc.example/ping/0123456789abcdef/my-job?create=1&rid=r1")
