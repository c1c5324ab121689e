"""The lock behind a real PgBouncer, in transaction mode and in session mode.

A session advisory lock needs one server session for the whole run. PgBouncer in
transaction mode hands each statement to whichever server session is free: the lock can
be taken on one and checked on another, or taken *again* (advisory locks are re-entrant)
by a second client that is handed the holder's session. These tests start a real
pgbouncer in front of the test server and show that a run behind such a pooler refuses
to proceed, that two such runs never both proceed, and that a lock URL that keeps a real
session (direct, or a session-mode pooler) makes the usual one-refreshes-one-skips work
while DATABASE_URL stays on the transaction pooler.

Skipped only when the pgbouncer binary is missing (.ci/run installs it when it can).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
import test_lock
from helpers import add_cache, add_workspace, cache_row, clean_env, run_cli, run_rows
from test_lock import SLOW_CONFIG, finish, slow_run_env, wait_for_holder

from availability_cron import lock, queries
from availability_cron.errors import TransactionPooler

pytestmark = pytest.mark.e2e

REFRESH_KEY = lock.lock_key("refresh")

#: The installed command in the background, killed at teardown (test_lock's fixture).
spawn = test_lock.spawn


def _pgbouncer_binary() -> str | None:
    return shutil.which("pgbouncer") or next(
        (p for p in ("/usr/sbin/pgbouncer", "/usr/local/sbin/pgbouncer") if os.access(p, os.X_OK)),
        None,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Pooler:
    """A running pgbouncer in front of the test server."""

    mode: str
    port: int

    def url(self, database_url: str) -> str:
        """``database_url`` (same database, same user), reached through this pooler."""
        return psycopg.conninfo.make_conninfo(database_url, host="127.0.0.1", port=str(self.port),
                                              sslmode="disable")


StartPooler = Callable[..., Pooler]


@pytest.fixture
def pooler(server_url: str) -> Iterator[StartPooler]:
    """Start pgbouncer in a given pool_mode; stop every one started at teardown."""
    binary = _pgbouncer_binary()
    if binary is None:
        pytest.skip("pgbouncer is not installed (apt-get install pgbouncer); .ci/run installs "
                    "it when it can")
    server = psycopg.conninfo.conninfo_to_dict(server_url)
    host = str(server.get("host") or "127.0.0.1")
    started: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(mode: str, pool_size: int = 5, password: str | None = None) -> Pooler:
        """With ``password``, clients must give it (md5); else any client is let in."""
        port = _free_port()
        workdir = Path(tempfile.mkdtemp(prefix=f"avc-pgbouncer-{mode}-"))
        user = str(server.get("user") or "postgres")
        target = f"host={host} port={server.get('port') or 5432} user={user}"
        if server.get("password"):
            target += f" password={server['password']}"
        (workdir / "users.txt").write_text(f'"{user}" "{password or ""}"\n')
        (workdir / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"* = {target}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {port}\n"
            "unix_socket_dir =\n"
            f"auth_type = {'md5' if password else 'trust'}\n"
            f"auth_file = {workdir / 'users.txt'}\n"
            f"pool_mode = {mode}\n"
            f"default_pool_size = {pool_size}\n"
            "max_client_conn = 100\n"
            "server_reset_query =\n"
            f"logfile = {workdir / 'pgbouncer.log'}\n"
        )
        command = [binary]
        if os.geteuid() == 0:
            # pgbouncer refuses to run as root. Run it as the owner of the server's socket
            # directory (the embedded server's is private to its owner), else as nobody.
            owner = os.stat(host).st_uid if host.startswith("/") else None
            name = pwd.getpwuid(owner).pw_name if owner else "nobody"
            os.chown(workdir, pwd.getpwnam(name).pw_uid, -1)
            command += ["-u", name]
        proc = subprocess.Popen([*command, str(workdir / "pgbouncer.ini")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started.append((proc, workdir))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                log = workdir / "pgbouncer.log"
                pytest.fail(f"pgbouncer exited ({proc.returncode}): "
                            f"{log.read_text() if log.exists() else ''}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return Pooler(mode, port)
            except OSError:
                time.sleep(0.05)
        pytest.fail("pgbouncer did not listen within 10 s")

    yield start
    for proc, workdir in started:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)


def pooled(url: str) -> psycopg.Connection[Any]:
    return psycopg.connect(url, autocommit=True)


# --- the lock primitives behind a transaction-mode pooler --------------------------------------


def test_the_pooler_really_shares_one_server_session_between_clients(database_url, pooler):
    # The premise of every test below: in transaction mode two clients run on one session.
    tx = pooler("transaction", pool_size=1)
    with pooled(tx.url(database_url)) as a, pooled(tx.url(database_url)) as b:
        assert a.execute("SELECT pg_backend_pid()").fetchone() == \
            b.execute("SELECT pg_backend_pid()").fetchone()


def test_a_client_handed_the_holders_server_session_cannot_take_the_lock_again(
    database_url, pooler
):
    tx = pooler("transaction", pool_size=1)
    with pooled(tx.url(database_url)) as first, pooled(tx.url(database_url)) as second:
        with lock.take(first, REFRESH_KEY) as taken:
            assert taken is not None

            # Advisory locks are re-entrant: without the check, the second client would be
            # told it got the lock on the very session that already holds it.
            with pytest.raises(TransactionPooler, match="transaction mode"), \
                    lock.take(second, REFRESH_KEY):
                pytest.fail("the second client must not get the lock")


class _PinAfterTaking:
    """``conn``, except that right after the statement taking the lock another client opens a
    transaction, which pins that server session: the holder's next statement runs elsewhere."""

    def __init__(self, conn: psycopg.Connection[Any], other: psycopg.Connection[Any]) -> None:
        self.conn, self.other = conn, other

    def execute(self, query: Any, params: Any = None) -> Any:
        cursor = self.conn.execute(query, params)
        if query is queries.TAKE_ADVISORY_LOCK:
            self.other.execute("BEGIN")
            self.other.execute("SELECT 1")
        return cursor

    @property
    def closed(self) -> bool:
        return self.conn.closed


def test_taking_the_lock_fails_when_the_next_statement_runs_on_another_server_session(
    database_url, pooler
):
    tx = pooler("transaction", pool_size=2)
    with pooled(tx.url(database_url)) as conn, pooled(tx.url(database_url)) as other:
        wrapped: Any = _PinAfterTaking(conn, other)

        with pytest.raises(TransactionPooler, match="another session"), \
                lock.take(wrapped, REFRESH_KEY):
            pytest.fail("the lock must not be handed out")
        other.execute("ROLLBACK")


def test_a_holder_whose_statements_move_to_another_server_session_is_no_longer_alive(
    database_url, pooler
):
    tx = pooler("transaction", pool_size=2)
    with pooled(tx.url(database_url)) as conn, pooled(tx.url(database_url)) as other:
        with lock.take(conn, REFRESH_KEY) as taken:
            assert taken is not None and taken.alive()
            other.execute("BEGIN")  # handed the holder's session, and keeps it
            other.execute("SELECT 1")

            assert taken.alive() is False
            other.execute("ROLLBACK")


# --- whole runs ---------------------------------------------------------------------------------


def test_a_run_through_a_transaction_mode_pooler_without_a_lock_url_refuses_with_exit_1(
    database_url, conn, pooler
):
    add_workspace(conn, "ws-1")
    tx = pooler("transaction")

    result = run_cli("refresh", env=clean_env(DATABASE_URL=tx.url(database_url)))

    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "transaction mode" in result.stderr
    assert "AVAILABILITY_CRON_LOCK_DATABASE_URL" in result.stderr
    summary = result.json()
    assert summary["success"] is False and summary["attempted"] == 0
    assert "transaction mode" in summary["error"]
    assert cache_row(conn, "ws-1") is None
    assert lock.find_holder(conn, REFRESH_KEY) is None


def test_two_runs_at_once_through_a_transaction_mode_pooler_never_both_proceed(
    database_url, conn, pooler, spawn
):
    add_workspace(conn, "ws-slow", config=SLOW_CONFIG)
    # One server session for every client: the second run is handed the first one's session.
    tx = pooler("transaction", pool_size=1)
    env = slow_run_env(tx.url(database_url))

    runs = [spawn("refresh", env=env), spawn("refresh", env=env)]
    results = [finish(run) for run in runs]

    proceeded = [summary for _, summary, _ in results if summary["attempted"] > 0]
    assert len(proceeded) <= 1, results
    for code, summary, err in results:
        if summary["attempted"] == 0 and not summary["skipped"]:
            assert code == 1 and "transaction mode" in err, (code, summary, err)


@pytest.mark.parametrize("lock_via", ["direct", "session-mode pooler"])
def test_with_a_lock_url_that_keeps_a_session_one_run_refreshes_and_the_other_skips(
    database_url, conn, pooler, spawn, lock_via
):
    add_workspace(conn, "ws-slow", config=SLOW_CONFIG)
    tx = pooler("transaction")
    lock_url = database_url if lock_via == "direct" else pooler("session").url(database_url)
    env = slow_run_env(tx.url(database_url), AVAILABILITY_CRON_LOCK_DATABASE_URL=lock_url)

    first = spawn("refresh", env=env)
    held_by = wait_for_holder(conn, REFRESH_KEY, first)
    second = run_cli("refresh", env=env)

    assert second.returncode == 0, second.stderr
    assert second.json()["skipped"] is True
    assert second.json()["reason"] == "locked"
    assert second.json()["holder"]["pid"] == held_by.pid
    code, summary, err = finish(first)
    assert code == 0, err
    assert summary["skipped"] is False
    assert summary["refreshed"] == 1
    row = cache_row(conn, "ws-slow")
    assert row is not None and row["refreshed_at"] is not None
    assert lock.find_holder(conn, REFRESH_KEY) is None


# --- no session state on the pool's server sessions ---------------------------------------------

#: What a run could leave behind on a server session, for the next client of the pool to inherit.
SESSION_SETTINGS = ["statement_timeout", "lock_timeout", "idle_session_timeout",
                    "idle_in_transaction_session_timeout", "tcp_keepalives_idle",
                    "tcp_keepalives_interval", "tcp_keepalives_count"]


def session_settings(conn: psycopg.Connection[Any]) -> dict[str, str]:
    """These settings as the server session answering this one statement has them."""
    rows = conn.execute("SELECT name, current_setting(name) FROM unnest(%s::text[]) AS name",
                        (SESSION_SETTINGS,)).fetchall()
    return dict(rows)


def backend_pid(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT pg_backend_pid()").fetchone()
    assert row is not None
    return int(row[0])


def test_a_run_leaves_the_transaction_pools_server_session_as_it_found_it(
    database_url, conn, pooler
):
    if conn.info.server_version >= 140000:
        # A database default the run must not override for the app: it shows a stray
        # `SET idle_session_timeout = 0`.
        conn.execute(psycopg.sql.SQL("ALTER DATABASE {} SET idle_session_timeout = '10min'")
                     .format(psycopg.sql.Identifier(conn.info.dbname)))
    add_workspace(conn, "ws-1")
    add_workspace(conn, "ws-2")
    # One server session behind the pool: every statement of the run's work and history
    # connections runs on it, and so does every statement of the app afterwards.
    tx = pooler("transaction", pool_size=1)
    with pooled(tx.url(database_url)) as app:
        session, before = backend_pid(app), session_settings(app)
    with psycopg.connect(database_url) as direct:  # the pool's session starts at the defaults
        assert before == session_settings(direct)

    result = run_cli("refresh", env=clean_env(DATABASE_URL=tx.url(database_url),
                                              AVAILABILITY_CRON_LOCK_DATABASE_URL=database_url))

    assert result.returncode == 0, result.stderr
    assert result.json()["refreshed"] == 2
    assert len(run_rows(conn)) == 1  # the history was written through the pool too
    with pooled(tx.url(database_url)) as app:
        assert backend_pid(app) == session  # the very session the run used
        assert session_settings(app) == before
        app.execute("SELECT pg_sleep(1)")  # an app query of 1 s is not cancelled


def test_a_pooled_run_survives_a_server_idle_session_timeout_shorter_than_its_calls(
    database_url, conn, server_url, pooler
):
    # The work connection sets no idle_session_timeout of its own through a pooler: the
    # server ends the pool's idle session mid-run, and the pooler hands the next write a new one.
    if conn.info.server_version < 140000:
        pytest.skip("idle_session_timeout needs PostgreSQL 14")
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(psycopg.sql.SQL("ALTER DATABASE {} SET idle_session_timeout = '1s'").format(
            psycopg.sql.Identifier(conn.info.dbname)))
    add_workspace(conn, "ws-slow", config={"latency_ms": 2500})
    tx = pooler("transaction", pool_size=1)

    result = run_cli("refresh", env=slow_run_env(
        tx.url(database_url), AVAILABILITY_CRON_LOCK_DATABASE_URL=database_url))

    assert result.returncode == 0, result.stderr
    assert result.json()["refreshed"] == 1


def test_a_pooled_run_is_still_bounded_by_its_budget_when_the_app_holds_a_cache_row(
    database_url, conn, pooler
):
    # The statement and lock timeouts live in the write transaction, which the pooler keeps
    # on one server session: they bound the write as they do on a direct connection.
    add_workspace(conn, "ws-1")
    add_cache(conn, "ws-1", stale_at=datetime(2020, 1, 1, tzinfo=UTC))
    tx = pooler("transaction")
    with psycopg.connect(database_url) as blocker:  # an app transaction holding the row
        blocker.execute("SELECT 1 FROM workspace_availability_cache WHERE workspace_id = 'ws-1'"
                        " FOR UPDATE")
        result = run_cli("refresh", env=clean_env(
            DATABASE_URL=tx.url(database_url), AVAILABILITY_CRON_LOCK_DATABASE_URL=database_url,
            AVAILABILITY_CRON_TIME_BUDGET_MS="2000", AVAILABILITY_CRON_DEADLINE_MARGIN_MS="500"))
        blocker.rollback()

    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "time budget" in result.json()["error"]
    assert lock.find_holder(conn, REFRESH_KEY) is None


# --- errors from the server, through the pooler --------------------------------------------------


def test_a_rejected_password_is_reported_readably_and_without_the_password(database_url, pooler):
    # "word" is inside "password": only the whole password, standing alone, is the secret.
    guarded = pooler("transaction", password="the-real-one")
    url = psycopg.conninfo.make_conninfo(guarded.url(database_url), password="word")

    result = run_cli("db", "migrate", env=clean_env(DATABASE_URL=url))

    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "FATAL: password authentication failed" in result.stderr
    assert "***" not in result.stderr
