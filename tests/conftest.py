"""Shared fixtures: a real PostgreSQL, a fresh database per test, small row factories.

The server is the one named by AVAILABILITY_CRON_TEST_DATABASE_URL when set (any
database on it; tests create their own), else an embedded one started once for the
session from the `pgserver` package. The schema is migrated once into a template
database; each test gets ``CREATE DATABASE ... TEMPLATE`` of it (a few ms).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from availability_cron import db

TEST_URL_ENV = "AVAILABILITY_CRON_TEST_DATABASE_URL"


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    """URL of a database on the test server (used as the admin connection)."""
    url = os.environ.get(TEST_URL_ENV)
    if url:
        yield url
        return
    from availability_cron.demo import embedded_postgres

    with embedded_postgres() as embedded:
        yield embedded


def _url_for(server: str, dbname: str) -> str:
    return psycopg.conninfo.make_conninfo(server, dbname=dbname)


def _create_database(server: str, name: str, template: str | None = None) -> None:
    with psycopg.connect(server, autocommit=True) as admin:
        if template:
            admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(template)))
        else:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def _drop_database(server: str, name: str) -> None:
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(name)))


@pytest.fixture(scope="session")
def template_name(server_url: str) -> Iterator[str]:
    name = f"avc_tpl_{uuid.uuid4().hex[:10]}"
    _create_database(server_url, name)
    with psycopg.connect(_url_for(server_url, name), autocommit=True) as conn:
        db.migrate(conn)
    yield name
    _drop_database(server_url, name)


@pytest.fixture
def database_url(server_url: str, template_name: str) -> Iterator[str]:
    """A fresh, migrated database for this test only."""
    name = f"avc_t_{uuid.uuid4().hex[:12]}"
    _create_database(server_url, name, template=template_name)
    yield _url_for(server_url, name)
    _drop_database(server_url, name)


@pytest.fixture
def empty_database_url(server_url: str) -> Iterator[str]:
    """A fresh database with no schema at all."""
    name = f"avc_e_{uuid.uuid4().hex[:12]}"
    _create_database(server_url, name)
    yield _url_for(server_url, name)
    _drop_database(server_url, name)


@pytest.fixture
def conn(database_url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(database_url, autocommit=True) as connection:
        yield connection


PG_BIN = os.environ.get("AVAILABILITY_CRON_TEST_PG_BIN", "/usr/lib/postgresql/15/bin")


@dataclass(frozen=True)
class Replicated:
    """A temporary primary and a hot standby streaming from it, both migrated."""

    primary_url: str
    standby_url: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_postgres(*args: str) -> list[str]:
    """Run a server binary as the postgres OS user when we are root (initdb refuses root)."""
    if os.geteuid() != 0:
        return list(args)
    return ["runuser", "-u", "postgres", "--", *args]


def _stop_cluster(data: Path) -> None:
    """Fast shutdown of the postmaster of ``data``, by its pid (the first line of
    postmaster.pid), waiting for it to exit."""
    try:
        pid = int((data / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    try:
        os.kill(pid, signal.SIGINT)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def replicated() -> Iterator[Replicated]:
    """A real streaming replica: a temporary primary (initdb, its own pg_hba allows
    replication from 127.0.0.1) and a standby made by ``pg_basebackup -R``, on free ports.

    Its own primary, not the shared test server: that server's pg_hba has no replication
    entry, and adding one would change a server other suites share. Skipped, with the
    reason, where PostgreSQL's server binaries or the postgres OS user are missing.
    """
    binaries = [Path(PG_BIN) / name for name in ("initdb", "pg_ctl", "pg_basebackup")]
    if not all(b.exists() for b in binaries):
        pytest.skip(f"no PostgreSQL server binaries in {PG_BIN} to make a standby")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        pytest.skip("running as root without runuser: cannot start a server as postgres")
    base = Path(tempfile.mkdtemp(prefix="avc-standby-"))
    primary, standby = base / "primary", base / "standby"
    started: list[Path] = []
    try:
        if os.geteuid() == 0:
            try:
                shutil.chown(base, "postgres", "postgres")
            except (LookupError, OSError) as exc:
                pytest.skip(f"cannot hand a directory to the postgres OS user: {exc}")
        ports = _free_port(), _free_port()

        def run(*args: str) -> None:
            done = subprocess.run(_as_postgres(*args), capture_output=True, text=True,
                                  timeout=120, stdin=subprocess.DEVNULL)
            if done.returncode != 0:
                pytest.skip(f"cannot make a standby: {args[0]} failed: "
                            f"{(done.stderr or done.stdout).strip()[-300:]}")

        def start(data: Path, port: int) -> None:
            run(f"{PG_BIN}/pg_ctl", "-D", str(data), "-l", str(base / f"{data.name}.log"),
                "-w", "-t", "60", "-o",
                f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={base}"
                " -c fsync=off -c max_connections=40 -c shared_buffers=16MB", "start")
            started.append(data)

        run(f"{PG_BIN}/initdb", "-D", str(primary), "-A", "trust", "-U", "postgres",
            "--no-sync", "-E", "UTF8")
        start(primary, ports[0])
        primary_url = f"postgresql://postgres@127.0.0.1:{ports[0]}/postgres"
        with psycopg.connect(primary_url, autocommit=True) as conn:
            db.migrate(conn)
        run(f"{PG_BIN}/pg_basebackup", "-h", "127.0.0.1", "-p", str(ports[0]), "-U",
            "postgres", "-D", str(standby), "-R", "-X", "stream", "--no-sync")
        start(standby, ports[1])
        standby_url = f"postgresql://postgres@127.0.0.1:{ports[1]}/postgres"
        deadline = time.monotonic() + 30
        while True:
            with psycopg.connect(standby_url, autocommit=True) as conn:
                row = conn.execute("SELECT pg_is_in_recovery(), EXISTS (SELECT 1 FROM"
                                   " pg_stat_wal_receiver WHERE status = 'streaming')"
                                   ).fetchone()
            if row == (True, True):
                break
            if time.monotonic() > deadline:
                pytest.skip(f"the standby never streamed from the primary: {row}")
            time.sleep(0.1)
        yield Replicated(primary_url, standby_url)
    finally:
        for data in reversed(started):
            _stop_cluster(data)
        shutil.rmtree(base, ignore_errors=True)


_DB_FIXTURES = {"server_url", "template_name", "database_url", "empty_database_url", "conn",
                "replicated"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses a database fixture `db`, so CI can re-run just those."""
    for item in items:
        if _DB_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.db)


from httpserver import http_server  # noqa: E402, F401  (the loopback HTTP server fixture)
