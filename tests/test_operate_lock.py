"""Operating the lock: `lock status`, `lock release`, and the separate lock database URL.

The holders are real `availability-cron refresh` processes refreshing a slow simulated
workspace, as in test_lock.py; the commands under test run as cron or an operator would.
"""

from __future__ import annotations

import logging
import socket
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import psycopg
import pytest
import test_lock
from helpers import add_workspace, clean_env, make_runtime, make_settings, run_cli
from psycopg import sql
from test_lock import finish, wait_for_holder

from availability_cron import lock
from availability_cron.errors import ConfigError
from availability_cron.refresh import _skipped, run_refresh
from availability_cron.settings import parse_duration

pytestmark = pytest.mark.e2e

REFRESH_KEY = lock.lock_key("refresh")
CLOSED_PORT_URL = "postgresql://postgres@127.0.0.1:1/x"

#: The installed command in the background, killed at teardown (test_lock's fixture).
spawn = test_lock.spawn


def holding_env(database_url: str, **extra: str) -> dict[str, str]:
    """A run that holds the lock for ~6 s while its one slow workspace refreshes."""
    return clean_env(DATABASE_URL=database_url, AVAILABILITY_CRON_TIME_BUDGET_MS="12000",
                     AVAILABILITY_CRON_DEADLINE_MARGIN_MS="1000", **extra)


@pytest.fixture
def holder(database_url, conn, spawn):
    """A real refresh process holding the lock: (process, LockHolder)."""
    add_workspace(conn, "ws-slow", config={"latency_ms": 6000})
    proc = spawn("refresh", env=holding_env(database_url))
    return proc, wait_for_holder(conn, REFRESH_KEY, proc)


@pytest.fixture
def plain_role(server_url: str, database_url: str) -> Iterator[str]:
    """A URL of the test database for a new role with no privileges beyond LOGIN."""
    name = f"avc_plain_{uuid.uuid4().hex[:8]}"
    password = uuid.uuid4().hex
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
            sql.Identifier(name), sql.Literal(password)))
    yield psycopg.conninfo.make_conninfo(database_url, user=name, password=password)
    with psycopg.connect(database_url, autocommit=True) as admin:  # grants in the test database
        admin.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


def grant(server_url: str, role_url: str, privilege: str) -> None:
    role = psycopg.conninfo.conninfo_to_dict(role_url)["user"]
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(sql.SQL("GRANT {} TO {}").format(
            sql.Identifier(privilege), sql.Identifier(str(role))))


def wait_until_held_for(conn: psycopg.Connection[Any], seconds: float) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        found = lock.find_holder(conn, REFRESH_KEY)
        if found and found.held_for_seconds and found.held_for_seconds > seconds:
            return
        time.sleep(0.05)
    pytest.fail(f"nobody held the lock for {seconds} s")


# --- lock status ----------------------------------------------------------------------------


def test_lock_status_says_the_lock_is_free_with_exit_0(database_url):
    result = run_cli("lock", "status", env=clean_env(DATABASE_URL=database_url))

    assert result.returncode == 0, result.stderr
    report = result.json()
    assert report["held"] is False
    assert report["holder"] is None
    assert report["lockName"] == "refresh"
    assert report["lockKey"] == REFRESH_KEY


def test_lock_status_names_the_run_host_and_os_pid_of_the_process_holding_the_lock(
    database_url, holder
):
    proc, held_by = holder

    result = run_cli("lock", "status", env=clean_env(DATABASE_URL=database_url))

    assert result.returncode == 0, result.stderr
    report = result.json()
    assert report["held"] is True
    found = report["holder"]
    assert found["pid"] == held_by.pid
    assert found["visible"] is True and found["hint"] is None
    assert found["run"]["osPid"] == proc.pid
    short_host = socket.gethostname().split(".")[0]
    assert found["run"]["host"] and short_host.startswith(found["run"]["host"])
    assert found["heldForSeconds"] >= 0
    assert found["backendStart"].endswith("Z")
    assert found["state"] in {"idle", "active"}
    _, summary, _ = finish(proc)
    assert found["run"]["runId"] == summary["runId"]


def test_lock_status_as_a_table_shows_the_holders_run(database_url, holder):
    proc, _ = holder

    result = run_cli("lock", "status", "--format", "table",
                     env=clean_env(DATABASE_URL=database_url, COLUMNS="200"))

    assert result.returncode == 0, result.stderr
    assert "holder.run.osPid" in result.stdout
    assert str(proc.pid) in result.stdout


def test_lock_status_says_when_the_role_cannot_see_the_holders_session(
    holder, plain_role
):
    proc, held_by = holder

    result = run_cli("lock", "status", env=clean_env(DATABASE_URL=plain_role))

    assert result.returncode == 0, result.stderr
    found = result.json()["holder"]
    assert found["pid"] == held_by.pid
    assert found["visible"] is False
    assert "pg_read_all_stats" in found["hint"]
    assert found["heldForSeconds"] is None
    # application_name is visible to every role: the run can still be named.
    assert found["run"]["osPid"] == proc.pid


def test_lock_status_exits_1_when_the_database_cannot_be_reached():
    result = run_cli("lock", "status", env=clean_env(DATABASE_URL=CLOSED_PORT_URL))

    assert result.returncode == 1
    assert result.stdout == ""
    assert "cannot connect" in result.stderr


# --- lock release ---------------------------------------------------------------------------


def test_lock_release_with_nobody_holding_the_lock_says_so_and_exits_0(database_url):
    result = run_cli("lock", "release", "--older-than", "10m", "--yes",
                     env=clean_env(DATABASE_URL=database_url))

    assert result.returncode == 0, result.stderr
    assert result.json()["outcome"] == "free"
    assert result.json()["terminated"] is False
    assert "nobody holds the lock" in result.stderr


def test_lock_release_refuses_a_holder_younger_than_the_bound(database_url, conn, holder):
    _, held_by = holder

    result = run_cli("lock", "release", "--older-than", "1h", "--yes",
                     env=clean_env(DATABASE_URL=database_url))

    assert result.returncode == 1, result.stderr
    assert result.json()["outcome"] == "too-young"
    assert "less than --older-than 1h" in result.stderr
    assert "has held the lock for" in result.stderr
    still = lock.find_holder(conn, REFRESH_KEY)
    assert still is not None and still.pid == held_by.pid


def test_lock_release_ends_a_holder_older_than_the_bound_and_the_holder_exits_1(
    database_url, conn, holder
):
    proc, held_by = holder
    wait_until_held_for(conn, 1.2)

    result = run_cli("lock", "release", "--older-than", "1s", "--yes", "--force",
                     env=clean_env(DATABASE_URL=database_url))

    assert result.returncode == 0, result.stderr
    report = result.json()
    assert report["outcome"] == "terminated" and report["terminated"] is True
    assert report["holder"]["pid"] == held_by.pid
    assert report["holder"]["heldForSeconds"] >= 1
    assert report["nowHeldBy"] is None
    assert lock.find_holder(conn, REFRESH_KEY) is None
    # Logged at WARNING with the pid, the application name and the age.
    warning = next(line for line in result.stderr.splitlines() if " WARNING " in line)
    assert str(held_by.pid) in warning and str(held_by.application_name) in warning
    code, summary, err = finish(proc)
    assert code == 1, err
    assert "lock connection was lost" in err
    assert summary["success"] is False


def test_lock_release_leaves_a_holder_whose_age_the_role_cannot_see(conn, holder, plain_role):
    _, held_by = holder
    wait_until_held_for(conn, 1.2)

    result = run_cli("lock", "release", "--older-than", "1s", "--yes", "--force",
                     env=clean_env(DATABASE_URL=plain_role))

    assert result.returncode == 1
    assert result.json()["outcome"] == "age-unknown"
    assert "pg_read_all_stats" in result.stderr
    still = lock.find_holder(conn, REFRESH_KEY)
    assert still is not None and still.pid == held_by.pid


def test_lock_release_exits_1_with_a_clear_message_when_termination_is_not_permitted(
    server_url, conn, holder, plain_role
):
    _, held_by = holder
    grant(server_url, plain_role, "pg_read_all_stats")  # sees the age, may not terminate
    wait_until_held_for(conn, 1.2)

    result = run_cli("lock", "release", "--older-than", "1s", "--yes", "--force",
                     env=clean_env(DATABASE_URL=plain_role))

    assert result.returncode == 1
    assert f"may not terminate backend pid {held_by.pid}" in result.stderr
    assert "pg_signal_backend" in result.stderr
    still = lock.find_holder(conn, REFRESH_KEY)
    assert still is not None and still.pid == held_by.pid


@pytest.fixture
def foreign(database_url: str) -> Iterator[psycopg.Connection[Any]]:
    """An app's pooled session that took the refresh lock's key (not an availability-cron
    run: its application_name does not parse as one)."""
    with psycopg.connect(database_url, autocommit=True, application_name="app-pool") as app:
        app.execute("SELECT pg_advisory_lock(%s)", (REFRESH_KEY,))
        yield app


def test_lock_release_refuses_a_bound_below_the_stuck_threshold_without_force(
    database_url, conn, holder
):
    _, held_by = holder
    wait_until_held_for(conn, 1.2)

    result = run_cli("lock", "release", "--older-than", "1s", "--yes",
                     env=clean_env(DATABASE_URL=database_url))

    assert result.returncode == 1, result.stderr
    report = result.json()
    assert report["outcome"] == "below-stuck-threshold" and report["terminated"] is False
    # The default budget, 45 s: 2 x 45 + 60.
    assert "below the lock-stuck threshold of 150s" in result.stderr
    assert "--force" in result.stderr
    still = lock.find_holder(conn, REFRESH_KEY)
    assert still is not None and still.pid == held_by.pid


def test_lock_release_refuses_a_holder_that_is_not_an_availability_cron_run_without_force(
    database_url, conn, foreign
):
    result = run_cli("lock", "release", "--older-than", "3m", "--yes",
                     env=clean_env(DATABASE_URL=database_url))

    assert result.returncode == 1, result.stderr
    assert result.json()["outcome"] == "foreign-holder"
    assert "(app-pool)" in result.stderr and "not an availability-cron run" in result.stderr
    assert "--force" in result.stderr
    still = lock.find_holder(conn, REFRESH_KEY)
    assert still is not None and still.application_name == "app-pool"


def test_lock_release_with_force_ends_a_foreign_holder_older_than_the_bound(
    database_url, conn, foreign
):
    wait_until_held_for(conn, 1.2)

    result = run_cli("lock", "release", "--older-than", "1s", "--yes", "--force",
                     env=clean_env(DATABASE_URL=database_url))

    assert result.returncode == 0, result.stderr
    assert result.json()["outcome"] == "terminated"
    assert lock.find_holder(conn, REFRESH_KEY) is None


def test_a_refresh_skipped_by_a_foreign_holder_reports_locked_naming_it(
    database_url, conn, foreign, caplog
):
    add_workspace(conn, "ws-1")

    with caplog.at_level(logging.WARNING, logger="availability_cron"):
        summary = run_refresh(make_settings(database_url), make_runtime(database_url),
                              default_source="availability_workspaces")

    assert (summary.success, summary.skipped, summary.reason) == (True, True, "locked")
    assert summary.holder is not None and summary.holder["applicationName"] == "app-pool"
    [warning] = [r.getMessage() for r in caplog.records if "app-pool" in r.getMessage()]
    assert "not an availability-cron run" in warning


def test_a_foreign_holders_session_age_does_not_make_the_lock_stuck(database_url):
    # A pooled session may be days old and have taken the key a moment ago: its age is
    # not how long it has held the lock. (Our own runs' age counts from the run's start.)
    settings = make_settings(database_url, time_budget_ms=45000)
    old_app = lock.LockHolder(4242, "app-pool", None, 86400.0, "idle", None, True)
    old_run = lock.LockHolder(4242, "availability-cron lock run=x", None, 86400.0, "idle",
                              None, True)

    verdict = _skipped(settings, make_runtime(database_url), old_app)

    assert (verdict.success, verdict.reason) == (True, "locked")
    assert _skipped(settings, make_runtime(database_url), old_run).reason == "lock-stuck"


@pytest.mark.parametrize("duration", ["5x", "10", "1.5h", "0s", "-1m", "1h30m", " 90s", "m"])
def test_lock_release_with_a_malformed_duration_exits_2_before_touching_the_database(duration):
    result = run_cli("lock", "release", "--older-than", duration, "--yes",
                     env=clean_env(DATABASE_URL=CLOSED_PORT_URL))

    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert "--older-than" in result.stderr


def test_lock_release_without_yes_exits_2_when_nobody_can_confirm():
    result = run_cli("lock", "release", "--older-than", "10m",
                     env=clean_env(DATABASE_URL=CLOSED_PORT_URL))

    assert result.returncode == 2
    assert "--yes" in result.stderr


@pytest.mark.parametrize(("text", "expected"), [
    ("90s", timedelta(seconds=90)), ("10m", timedelta(minutes=10)),
    ("2h", timedelta(hours=2)), ("1d", timedelta(days=1)),
])
def test_durations_take_one_whole_number_and_one_unit(text, expected):
    assert parse_duration("--older-than", text) == expected


@pytest.mark.parametrize("text", ["", "90", "90S", "1.5h", "0m", "1h30m", "90s ", "ninety s"])
def test_anything_else_is_not_a_duration(text):
    with pytest.raises(ConfigError, match="--older-than must be a whole number"):
        parse_duration("--older-than", text)


# --- the separate lock database URL ---------------------------------------------------------


def test_lock_status_asks_the_lock_database_url_when_one_is_set(database_url, holder):
    _, held_by = holder
    env = clean_env(DATABASE_URL=CLOSED_PORT_URL, AVAILABILITY_CRON_LOCK_DATABASE_URL=database_url)

    result = run_cli("lock", "status", env=env)

    assert result.returncode == 0, result.stderr
    assert result.json()["holder"]["pid"] == held_by.pid


def test_a_run_whose_lock_url_reaches_another_database_exits_2_naming_both(
    database_url, empty_database_url, conn
):
    add_workspace(conn, "ws-1")
    env = clean_env(DATABASE_URL=database_url,
                    AVAILABILITY_CRON_LOCK_DATABASE_URL=empty_database_url)

    result = run_cli("refresh", env=env)

    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stdout == ""
    other = psycopg.conninfo.conninfo_to_dict(empty_database_url)["dbname"]
    assert "AVAILABILITY_CRON_LOCK_DATABASE_URL" in result.stderr
    assert f"database {other!r}" in result.stderr
    assert f"database {conn.info.dbname!r}" in result.stderr
    assert lock.find_holder(conn, REFRESH_KEY) is None
    assert conn.execute("SELECT count(*) FROM workspace_availability_cache").fetchone() == (0,)


def test_a_run_takes_its_lock_through_the_lock_database_url(
    database_url, conn, spawn, plain_role
):
    # The lock URL logs in as another role: the session holding the lock shows which URL
    # it came from. (That role may read the migration ledger, which the run checks.)
    conn.execute(sql.SQL("GRANT SELECT ON availability_cron_migrations TO {}").format(
        sql.Identifier(str(psycopg.conninfo.conninfo_to_dict(plain_role)["user"]))))
    add_workspace(conn, "ws-slow", config={"latency_ms": 3000})
    env = holding_env(database_url, AVAILABILITY_CRON_LOCK_DATABASE_URL=plain_role)

    proc = spawn("refresh", env=env)
    held_by = wait_for_holder(conn, REFRESH_KEY, proc)

    assert held_by.role == psycopg.conninfo.conninfo_to_dict(plain_role)["user"]
    assert str(held_by.application_name).startswith("availability-cron lock run=")
    code, summary, err = finish(proc)
    assert code == 0, err
    assert summary["refreshed"] == 1


@pytest.mark.parametrize("command", ["status", "release"])
def test_help_of_the_lock_commands_documents_exit_codes_and_the_lock_url(command):
    result = run_cli("lock", command, "--help", env=clean_env(COLUMNS="100"))

    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "Exit codes: 0" in text and " 1 " in text and " 2 " in text
    assert "AVAILABILITY_CRON_LOCK_DATABASE_URL" in text


# --- on a hot standby (issue 8) -------------------------------------------------------------
# Advisory locks live in one server's memory: a standby never sees the primary's lock.


@pytest.fixture
def held_on_primary(replicated) -> Iterator[psycopg.Connection[Any]]:
    """The refresh lock, held on the primary by a real session for the test's duration."""
    with psycopg.connect(replicated.primary_url, autocommit=True,
                         application_name="availability-cron lock run=primaryrun") as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (REFRESH_KEY,))
        yield conn


def test_lock_status_on_a_standby_refuses_saying_the_lock_lives_on_the_primary(
    replicated, held_on_primary
):
    for env in (clean_env(DATABASE_URL=replicated.standby_url),
                clean_env(DATABASE_URL=replicated.primary_url,
                          AVAILABILITY_CRON_LOCK_DATABASE_URL=replicated.standby_url)):
        result = run_cli("lock", "status", "--format", "json", env=env)
        assert result.returncode == 1, result
        assert result.stdout == ""
        assert "standby" in result.stderr and "primary" in result.stderr
    on_primary = run_cli("lock", "status", "--format", "json",
                         env=clean_env(DATABASE_URL=replicated.primary_url))
    assert on_primary.returncode == 0, on_primary
    assert on_primary.json()["held"] is True


def test_lock_release_on_a_standby_refuses_instead_of_saying_nobody_holds_the_lock(
    replicated, held_on_primary
):
    result = run_cli("lock", "release", "--older-than", "1s", "--yes",
                     env=clean_env(DATABASE_URL=replicated.standby_url))
    assert result.returncode == 1, result
    assert "nobody holds the lock" not in result.stderr + result.stdout
    assert "standby" in result.stderr and "primary" in result.stderr
    assert held_on_primary.execute(  # untouched
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
    ).fetchone() == (1,)


def test_a_dry_run_on_a_standby_plans_but_warns_that_it_cannot_see_the_lock(
    replicated, held_on_primary
):
    result = run_cli("refresh", "--dry-run", "--format", "json",
                     env=clean_env(DATABASE_URL=replicated.standby_url))
    assert result.returncode == 0, result
    report = result.json()
    assert report["lockHeld"] is None and report["holder"] is None
    assert "standby" in result.stderr and "primary" in result.stderr
