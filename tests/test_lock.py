"""The refresh lock: two real connections, and two real `availability-cron` processes.

Nothing here is mocked: the lock is PostgreSQL's session advisory lock, and the
process tests start the installed command exactly as cron does.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from typing import Any, Protocol

import psycopg
import pytest
from helpers import CLI, add_workspace, cache_row, clean_env, run_cli

from availability_cron import lock

REFRESH_KEY = lock.lock_key("refresh")

#: Long enough for a second process to start, connect and skip while the first still
#: holds the lock; short enough to keep the file fast.
SLOW_CONFIG = {"latency_ms": 3000}


def slow_run_env(database_url: str, **extra: str) -> dict[str, str]:
    """Settings under which a run holds the lock while a SLOW_CONFIG workspace refreshes.

    The margin is lowered from its default (7.5 s) because an 8 s budget would
    otherwise leave only 0.5 s after process start in which a call may begin.
    """
    return clean_env(DATABASE_URL=database_url, AVAILABILITY_CRON_TIME_BUDGET_MS="8000",
                     AVAILABILITY_CRON_DEADLINE_MARGIN_MS="1000", **extra)


@pytest.fixture
def other_conn(database_url: str) -> Iterator[psycopg.Connection[Any]]:
    """A second, independent session on the test database."""
    with psycopg.connect(database_url, autocommit=True) as connection:
        yield connection


class Spawn(Protocol):
    def __call__(self, *args: str, env: dict[str, str]) -> subprocess.Popen[str]: ...


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    """Start the installed command in the background; kill whatever is still running at teardown."""
    started: list[subprocess.Popen[str]] = []

    def start(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [CLI, *args], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def wait_for_holder(
    conn: psycopg.Connection[Any], key: int, proc: subprocess.Popen[str], timeout: float = 15
) -> lock.LockHolder:
    """Poll until some session holds ``key``; fail early if ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        holder = lock.find_holder(conn, key)
        if holder is not None:
            return holder
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the lock holder exited ({proc.returncode}) before taking the lock:\n"
                        f"stdout: {out}\nstderr: {err}")
        time.sleep(0.05)
    pytest.fail(f"nobody took the lock within {timeout} s")


def finish(proc: subprocess.Popen[str], timeout: float = 30) -> tuple[int, dict[str, Any], str]:
    """Wait for ``proc``; return its exit code, its one JSON object and its stderr."""
    out, err = proc.communicate(timeout=timeout)
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected exactly one JSON line on stdout, got {out!r}; stderr {err}"
    return proc.returncode, json.loads(lines[0]), err


def try_lock_once(conn: psycopg.Connection[Any], key: int) -> bool:
    row = conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
    return bool(row and row[0])


# --- two real connections -------------------------------------------------------------------


def test_second_session_cannot_take_the_lock_while_the_first_holds_it(conn, other_conn):
    assert lock.try_acquire(conn, REFRESH_KEY) is True

    assert lock.try_acquire(other_conn, REFRESH_KEY) is False


def test_second_session_takes_the_lock_once_the_first_releases_it(conn, other_conn):
    assert lock.try_acquire(conn, REFRESH_KEY)
    assert not lock.try_acquire(other_conn, REFRESH_KEY)

    lock.release(conn, REFRESH_KEY)

    assert lock.try_acquire(other_conn, REFRESH_KEY) is True


def test_held_releases_the_lock_when_the_block_raises(conn, other_conn):
    with pytest.raises(RuntimeError, match="boom"), lock.held(conn, REFRESH_KEY) as acquired:
        assert acquired is True
        assert not lock.try_acquire(other_conn, REFRESH_KEY)
        raise RuntimeError("boom")

    assert lock.find_holder(other_conn, REFRESH_KEY) is None
    assert lock.try_acquire(other_conn, REFRESH_KEY) is True


def test_held_yields_false_and_leaves_another_sessions_lock_alone(conn, other_conn):
    assert lock.try_acquire(other_conn, REFRESH_KEY)

    with lock.held(conn, REFRESH_KEY) as acquired:
        assert acquired is False

    holder = lock.find_holder(conn, REFRESH_KEY)
    assert holder is not None and holder.pid == other_conn.info.backend_pid


def test_find_holder_returns_the_holders_backend_pid_and_application_name(database_url, conn):
    with psycopg.connect(database_url, autocommit=True,
                         application_name="availability-cron lock run=abc123") as holder_conn:
        assert lock.try_acquire(holder_conn, REFRESH_KEY)

        holder = lock.find_holder(conn, REFRESH_KEY)

        assert holder is not None
        assert holder.pid == holder_conn.info.backend_pid
        assert holder.application_name == "availability-cron lock run=abc123"
        assert holder.visible is True
        assert holder.as_json()["pid"] == holder_conn.info.backend_pid


def test_find_holder_returns_none_when_nobody_holds_the_lock(conn):
    assert lock.find_holder(conn, REFRESH_KEY) is None


@pytest.mark.parametrize("key", [-(2**63), -1, 0, 1, 2**32, 2**63 - 1, REFRESH_KEY])
def test_find_holder_finds_keys_across_the_whole_signed_64_bit_range(conn, other_conn, key):
    assert lock.try_acquire(other_conn, key)

    holder = lock.find_holder(conn, key)

    assert holder is not None and holder.pid == other_conn.info.backend_pid
    # A neighbouring key is a different lock.
    neighbour = key - 1 if key > -(2**63) else key + 1
    assert lock.find_holder(conn, neighbour) is None


def test_lock_key_depends_on_the_lock_name():
    assert lock.lock_key("refresh") == lock.DEFAULT_LOCK_KEY
    assert lock.lock_key("refresh") == lock.lock_key("refresh")
    assert lock.lock_key("refresh") != lock.lock_key("refresh-eu")
    assert -(2**63) <= lock.lock_key("anything") < 2**63


# --- two real processes ---------------------------------------------------------------------


@pytest.mark.e2e
def test_second_run_skips_and_names_the_holder_while_the_first_run_holds_the_lock(
    database_url, conn, spawn
):
    add_workspace(conn, "ws-slow", config=SLOW_CONFIG)
    env = slow_run_env(database_url)
    first = spawn("refresh", env=env)
    held_by = wait_for_holder(conn, REFRESH_KEY, first)

    second = run_cli("refresh", env=env)

    # The first run still held the lock when the second finished: the overlap was real.
    still = lock.find_holder(conn, REFRESH_KEY)
    assert still is not None and still.pid == held_by.pid
    assert second.returncode == 0, second.stderr
    skipped = second.json()
    assert skipped["success"] is True
    assert skipped["skipped"] is True
    assert skipped["reason"] == "locked"
    assert skipped["attempted"] == 0
    assert skipped["holder"]["pid"] == held_by.pid

    code, first_summary, first_err = finish(first)
    assert code == 0, first_err
    assert first_summary["skipped"] is False
    assert first_summary["refreshed"] == 1
    application_name = skipped["holder"]["applicationName"]
    assert application_name.startswith("availability-cron")
    assert f"run={first_summary['runId']}" in application_name
    assert f"pid={first.pid}" in application_name
    assert skipped["runId"] != first_summary["runId"]
    # A run that ends normally leaves the lock free.
    assert lock.find_holder(conn, REFRESH_KEY) is None


@pytest.mark.e2e
def test_a_holder_killed_with_sigkill_frees_the_lock_at_once(database_url, conn, spawn):
    add_workspace(conn, "ws-slow", config=SLOW_CONFIG)
    env = slow_run_env(database_url)
    holder_proc = spawn("refresh", env=env)
    wait_for_holder(conn, REFRESH_KEY, holder_proc)
    assert not try_lock_once(conn, REFRESH_KEY)

    killed_at = time.monotonic()
    os.kill(holder_proc.pid, signal.SIGKILL)
    acquired = False
    while time.monotonic() - killed_at < 3.0:
        if try_lock_once(conn, REFRESH_KEY):
            acquired = True
            break
        time.sleep(0.02)
    released_after = time.monotonic() - killed_at

    print(f"\n[measure] lock free {released_after * 1000:.0f} ms after SIGKILL")
    assert acquired, f"the lock was still held {released_after:.2f} s after SIGKILL"
    assert holder_proc.wait(timeout=10) == -signal.SIGKILL
    # The killed run never wrote a result for the workspace it was refreshing.
    assert cache_row(conn, "ws-slow") is None


@pytest.mark.e2e
def test_a_hung_provider_cannot_keep_the_process_alive_past_budget_and_grace(
    database_url, conn, spawn
):
    add_workspace(conn, "ws-hung", config={"hang": True})
    budget_s, grace_s, slack_s = 3.0, 2.0, 3.0
    env = clean_env(DATABASE_URL=database_url, AVAILABILITY_CRON_TIME_BUDGET_MS="3000",
                    AVAILABILITY_CRON_DEADLINE_MARGIN_MS="500")

    started = time.monotonic()
    proc = spawn("refresh", env=env)
    try:
        proc.wait(timeout=budget_s + grace_s + slack_s)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the process was still running {budget_s + grace_s + slack_s} s after start")
    exited_after = time.monotonic() - started
    code, summary, err = finish(proc)

    print(f"\n[measure] hung run exited {exited_after * 1000:.0f} ms after start "
          f"(budget {budget_s * 1000:.0f} ms + grace {grace_s * 1000:.0f} ms)")
    assert code == 0, err
    assert summary["success"] is True
    assert summary["attempted"] == 1
    assert summary["unfinished"] == 1
    assert summary["errors"] == 1
    assert summary["refreshed"] == 0
    assert summary["finishedWithinBudget"] is False
    # It waited for the grace period instead of giving up at the margin.
    assert exited_after >= budget_s
    assert lock.find_holder(conn, REFRESH_KEY) is None
    assert try_lock_once(conn, REFRESH_KEY)
    row = cache_row(conn, "ws-hung")
    assert row is not None
    assert row["refreshed_at"] is None
    assert row["consecutive_failures"] == 1
    assert "timed out" in row["last_error"]


@pytest.mark.e2e
def test_runs_with_different_lock_names_do_not_block_each_other(database_url, conn, spawn):
    add_workspace(conn, "ws-slow", config=SLOW_CONFIG)
    base = slow_run_env(database_url)
    nightly_key = lock.lock_key("nightly")
    first = spawn("refresh", env={**base, "AVAILABILITY_CRON_LOCK_NAME": "nightly"})
    held_by = wait_for_holder(conn, nightly_key, first)
    assert lock.find_holder(conn, REFRESH_KEY) is None

    # LIMIT=0 keeps these runs from calling the slow provider themselves.
    other_name = run_cli("refresh", env={**base, "AVAILABILITY_CRON_LIMIT": "0"})
    same_name = run_cli("refresh", env={**base, "AVAILABILITY_CRON_LIMIT": "0",
                                        "AVAILABILITY_CRON_LOCK_NAME": "nightly"})

    still = lock.find_holder(conn, nightly_key)
    assert still is not None and still.pid == held_by.pid
    assert other_name.returncode == 0, other_name.stderr
    assert other_name.json()["skipped"] is False
    assert other_name.json()["reason"] is None
    assert same_name.returncode == 0, same_name.stderr
    assert same_name.json()["skipped"] is True
    assert same_name.json()["reason"] == "locked"
    assert same_name.json()["holder"]["pid"] == held_by.pid
    code, _, err = finish(first)
    assert code == 0, err
