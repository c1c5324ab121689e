"""Connections, migrations and the one place database errors become ours.

Contract: every function here either returns normally or raises an
:class:`~availability_cron.errors.AvailabilityCronError`; no psycopg exception
escapes :func:`translate_errors`.

Session settings the code must not depend on, because a DBA sets them per database or
role (``ALTER DATABASE ... SET``) and a pooled session cannot be given its own:

- DateStyle and IntervalStyle: psycopg parses timestamptz (and interval) *text* by the
  session's DateStyle, and gives up on anything but ISO. Every read that returns a
  timestamp asks for binary results (``conn.cursor(..., binary=True)``): a timestamptz
  then travels as microseconds since 2000 UTC, whatever the DateStyle, and nothing is
  SET on the session. Parameters are sent as ISO text, which every DateStyle reads.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import class_row
from tenacity import (
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
)

from . import queries, redact
from .errors import (
    AvailabilityCronError,
    ConfigError,
    ConnectionLost,
    DatabaseError,
    DatabaseUnavailable,
    NotPrimary,
    ReadOnlySession,
    SchemaMissing,
    TransactionPooler,
)
from .lock import lock_key

log = logging.getLogger(__name__)

Connection = psycopg.Connection[Any]

#: Connect attempts and the overall bound: cron runs every minute, so a database that
#: is down for longer than a few seconds is reported, not waited for.
CONNECT_ATTEMPTS = 3
CONNECT_MAX_SECONDS = 10.0
CONNECT_TIMEOUT_SECONDS = 5

MIGRATION_LOCK_KEY = lock_key("migrate")



_SSLMODES = {"disable", "allow", "prefer", "require", "verify-ca", "verify-full"}


def check_url(url: str, name: str = "DATABASE_URL") -> None:
    """Parse ``url`` locally (no network); a malformed one is a ConfigError.

    libpq only checks values such as the port when it connects, and then fails in a
    way that looks like "database down"; a typo must be exit 2, not a page. No message
    quotes any part of a password: libpq's own parse error quotes the offending input, so
    its quoted parts are cut (:func:`redact.libpq_parse_error`).
    """
    try:
        params = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError as exc:
        reason = redact.scrub(redact.libpq_parse_error(str(exc)), redact.url_secrets(url))
        raise ConfigError(
            f"{name} is not a valid PostgreSQL connection string: {reason[:300]}"
        ) from None
    except UnicodeDecodeError:
        # psycopg decodes every value libpq hands back as UTF-8; the error quotes the bytes.
        raise ConfigError(
            f"{name} has a percent escape that is not UTF-8 text (such as %FF) in its user, "
            "password, host, database name or a parameter: percent-encode the UTF-8 bytes "
            "of each character (value not shown: it may contain a password)"
        ) from None
    if redact.ambiguous_url(url):
        # libpq would read part of the password as a host, a port or a user name.
        raise ConfigError(
            f"{name} has an '@' that libpq would not read as the end of the user and "
            "password: percent-encode '/', '?' and '@' in them (/ is %2F, ? is %3F, @ is %40)"
        )
    _check_ports(params, name)
    sslmode = params.get("sslmode")
    if sslmode is not None and sslmode not in _SSLMODES:
        raise ConfigError(
            f"{name} has an invalid sslmode {sslmode!r}: expected one of "
            f"{', '.join(sorted(_SSLMODES))}"
        )


_PORT = re.compile(r"[0-9]+")


def _check_ports(params: dict[str, Any], name: str) -> None:
    """The ports as psycopg and libpq read them when connecting: a comma-separated list with
    one port for every host, or one for all; an empty entry is the default port (libpq's
    rule: ``host1,host2:5440`` is host1 on the default port, host2 on 5440). ASCII digits
    only; space around them is allowed (libpq skips it)."""
    ports = str(params.get("port") or "").split(",")
    for port in ports:
        if port and not (_PORT.fullmatch(port.strip()) and 1 <= int(port) <= 65535):
            raise ConfigError(f"{name} has an invalid port {port!r}: expected 1 to 65535")
    hosts = max(len(str(params.get(key) or "").split(",")) for key in ("host", "hostaddr"))
    if 1 < len(ports) != hosts:
        raise ConfigError(
            f"{name} has {len(ports)} ports for {hosts} hosts: give one port for every host "
            "(an empty one means the default port) or a single port for all of them"
        )


def connect(
    url: str,
    *,
    application_name: str,
    secrets: list[str],
    attempts: int = CONNECT_ATTEMPTS,
    name: str = "DATABASE_URL",
    connect_timeout: int = CONNECT_TIMEOUT_SECONDS,
    own_session: bool = False,
) -> Connection:
    """Open an autocommit connection, retrying briefly; raise DatabaseUnavailable if it fails.

    Only failures that may pass are retried (refused, reset, timed out). A rejected
    password, a missing database or an invalid connection parameter fails at once:
    retrying cannot fix them. An invalid parameter value is a ConfigError (exit 2);
    ``name`` is the setting the URL came from, for its message.

    ``own_session``: the connection is known to be a server session of its own (direct, or
    a session-mode pooler): the lock's, or the work connection when it shares the lock's
    URL. Only then is the session prepared for a long, mostly idle run (see _prepare).
    Otherwise (the default) nothing is SET on the session: a transaction-mode pooler may
    hand it to another client after any statement, and a setting would go with it. Bounds
    a statement needs come from :func:`bounded_transaction` instead.
    """
    tries = 0

    def worth_retrying(exc: BaseException) -> bool:
        return isinstance(exc, psycopg.OperationalError) and not _is_final(exc)

    retrying = Retrying(
        stop=stop_after_attempt(attempts) | stop_after_delay(CONNECT_MAX_SECONDS),
        wait=wait_exponential(multiplier=0.25, max=2),
        retry=retry_if_exception(worth_retrying),
        reraise=True,
    )
    try:
        for attempt in retrying:
            with attempt:
                tries += 1
                # TCP keepalives and a user timeout let the client notice a dead peer
                # within ~30 s even when the network, not a process, dies.
                conn = psycopg.connect(
                    url,
                    autocommit=True,
                    application_name=application_name[:63],
                    connect_timeout=connect_timeout,
                    keepalives=1,
                    keepalives_idle=15,
                    keepalives_interval=5,
                    keepalives_count=3,
                    tcp_user_timeout=30_000,
                )
                if own_session:
                    _prepare(conn)
                return conn
    except psycopg.OperationalError as exc:
        reason = _reason(exc, secrets)
        if _INVALID_VALUE.search(str(exc)):
            raise ConfigError(f"{name} has an invalid parameter: {reason}") from None
        after = f" after {tries} attempts" if tries > 1 else ""
        raise DatabaseUnavailable(f"cannot connect to the database{after}: {reason}") from None
    except psycopg.ProgrammingError as exc:  # the URL does not parse: libpq quotes it
        reason = redact.scrub(redact.libpq_parse_error(str(exc)), secrets)
        raise ConfigError(f"{name} is not usable: {reason[:400]}") from None
    raise AssertionError("unreachable")  # pragma: no cover


_INVALID_VALUE = re.compile(r"invalid \S+ value|invalid value for parameter|invalid port")
_FINAL = re.compile(
    r"password authentication failed|authentication failed|no pg_hba\.conf entry"
    r"|database \S+ does not exist|role \S+ does not exist"
)


def _is_final(exc: BaseException) -> bool:
    text = str(exc)
    return bool(_INVALID_VALUE.search(text) or _FINAL.search(text))


def _prepare(conn: Connection) -> None:
    """Make the session survive a long run: no idle timeout, quick dead-peer detection.

    Session settings: for a connection that is a session of its own only (see connect).
    """
    if conn.info.server_version >= 140000:
        conn.execute(queries.KEEP_IDLE_SESSION)
    conn.execute(queries.SESSION_KEEPALIVES)


@contextmanager
def bounded_transaction(conn: Connection, ms: int) -> Iterator[None]:
    """A transaction in which every statement, and every idle gap between statements, is
    bounded by ``ms`` milliseconds (statement_timeout, lock_timeout and
    idle_in_transaction_session_timeout).

    The bounds are SET LOCAL: they end with the transaction, on commit or rollback, so they
    hold on a connection through a transaction-mode pooler (which keeps a transaction on
    one server session) and are never left on a server session the pooler hands to the app
    next. Nested in another transaction, they last until that one ends.
    """
    with conn.transaction():
        conn.execute(queries.SET_LOCAL_TIMEOUTS, {"ms": str(ms)})
        yield


#: How often a round trip's watchdog re-reads what is left of its bound.
WATCH_SECONDS = 0.05


@contextmanager
def answer_within(left: Callable[[], float], *conns: Connection) -> Iterator[None]:
    """Bound the block's round trips on ``conns`` on the client side: ``left()`` is the
    time left for them, in seconds, read again every WATCH_SECONDS (so it may shrink).

    psycopg cannot time a query out by itself, and a server-side statement_timeout
    means nothing when the network drops every packet: a call would wait on its socket
    for the TCP user timeout (30 s), or for ever behind a middlebox that still acks. So
    a watchdog thread shuts the connections' sockets down once ``left()`` reaches 0
    while the block still runs: the blocked call returns with an error, the connection
    is dead from then on, and the server drops its session (and any advisory lock) when
    it sees the socket close. An error the block raises after the cut is raised as
    ConnectionLost saying so; a block that ends in time is left alone.
    """
    guard = threading.Lock()
    done = threading.Event()
    cut = False
    started = time.monotonic()

    def watch() -> None:
        nonlocal cut
        while (remaining := left()) > 0:
            if done.wait(min(remaining, WATCH_SECONDS)):
                return
        with guard:
            if done.is_set():
                return
            cut = True
            for conn in conns:
                _shut_down_socket(conn)

    watchdog = threading.Thread(target=watch, name="db-watchdog", daemon=True)
    watchdog.start()
    try:
        yield
    except (psycopg.Error, ConnectionLost):
        if cut:
            raise ConnectionLost(
                f"the database did not answer within {time.monotonic() - started:.1f}s, the "
                "time the run had left for it (network down, or the server stalled?)"
            ) from None
        raise
    finally:
        with guard:
            done.set()


def _shut_down_socket(conn: Connection) -> None:
    """Shut the connection's socket down (both ways) under libpq, which keeps its own fd."""
    try:
        fd = conn.fileno()
    except psycopg.Error:  # closed already
        return
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return
    with sock:  # closes the duplicate only; the shutdown acts on the connection itself
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _reason(exc: BaseException, secrets: list[str]) -> str:
    """The first meaningful line of a driver error, with secrets removed."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    # A libpq message may quote a key=value fragment of a connection string.
    text = re.sub(r"password=\S+", "password=***", text)
    return redact.scrub(text, secrets)[:400]


@contextmanager
def translate_errors(secrets: list[str]) -> Iterator[None]:
    """Turn psycopg errors raised inside the block into availability-cron errors."""
    try:
        yield
    except AvailabilityCronError:
        raise
    except psycopg.errors.UndefinedTable as exc:
        raise SchemaMissing(
            f"a table is missing ({_reason(exc, secrets)}): run `availability-cron db migrate`"
        ) from None
    except psycopg.errors.ReadOnlySqlTransaction:
        raise NotPrimary() from None
    except (psycopg.errors.QueryCanceled, psycopg.errors.LockNotAvailable) as exc:
        raise DatabaseError(
            "a statement would have run past the run's time budget (a row or table lock "
            f"held by another transaction?): {_reason(exc, secrets)}"
        ) from None
    except psycopg.OperationalError as exc:
        raise ConnectionLost(
            f"the database connection was lost mid-run: {_reason(exc, secrets)}"
        ) from None
    except psycopg.Error as exc:
        raise DatabaseError(f"the database refused a statement: {_reason(exc, secrets)}") from None


def ensure_primary(conn: Connection) -> None:
    row = conn.execute(queries.IS_STANDBY).fetchone()
    if row and row[0]:
        raise NotPrimary()


def ensure_writable(conn: Connection) -> None:
    """Raise unless this session can write: NotPrimary on a hot standby, ReadOnlySession
    when its transactions are read-only by default, naming the setting and where it was
    set. Asked before the lock and before any provider is called: a run that could not
    store its results must not make the calls."""
    row = conn.execute(queries.SESSION_WRITABLE).fetchone()
    assert row is not None
    in_recovery, read_only, set_by, database, role = row
    if in_recovery:
        raise NotPrimary()
    if read_only:
        raise ReadOnlySession(
            f"the database session is read-only: default_transaction_read_only is on "
            f"({_read_only_origin(str(set_by), str(database), str(role))}), so nothing "
            "could be written; refusing before the lock and before any provider is called"
        )


def _read_only_origin(source: str, database: str, role: str) -> str:
    """Where default_transaction_read_only was set (pg_settings.source) and how to undo it."""
    db_name, role_name = sql.Identifier(database), sql.Identifier(role)
    fixes = {
        "database": sql.SQL("ALTER DATABASE {} RESET default_transaction_read_only")
        .format(db_name),
        "user": sql.SQL("ALTER ROLE {} RESET default_transaction_read_only").format(role_name),
        "database user": sql.SQL("ALTER ROLE {} IN DATABASE {} RESET "
                                 "default_transaction_read_only").format(role_name, db_name),
    }
    where = {"database": "this database", "user": "this role",
             "database user": "this role in this database"}
    if source in fixes:
        return f"set for {where[source]}: {fixes[source].as_string()}"
    if source == "client":
        return "set by the client: the connection's options or PGOPTIONS"
    return f"set by the server's {source} (postgresql.conf or ALTER SYSTEM)"


@dataclass(frozen=True)
class ServerIdentity:
    """Which database, on which running server, a session reached."""

    database: str
    database_oid: int
    server_started_at: datetime
    backend_pid: int

    def describe(self) -> str:
        return (f"database {self.database!r} (oid {self.database_oid}) on a server started at "
                f"{self.server_started_at.isoformat()}")


def server_identity(conn: Connection) -> ServerIdentity:
    # Binary results: timestamps read whatever the DateStyle (see db.py).
    with conn.cursor(row_factory=class_row(ServerIdentity), binary=True) as cur:
        cur.execute(queries.SERVER_IDENTITY)
        row = cur.fetchone()
    assert row is not None
    return row


def ensure_same_database(lock_conn: Connection, work_conn: Connection) -> None:
    """Check that the lock's session and the work session can exclude each other.

    Raises ConfigError when they reached different databases (or servers: a replica
    included), since a lock taken elsewhere would not keep runs apart; and
    TransactionPooler when both statements ran on one server session, which only a
    pooler sharing sessions between clients (transaction mode) does. Works for any
    role: it reads current_database(), pg_database and pg_postmaster_start_time().
    """
    lock_id, work_id = server_identity(lock_conn), server_identity(work_conn)
    if (lock_id.database, lock_id.database_oid, lock_id.server_started_at) != (
        work_id.database, work_id.database_oid, work_id.server_started_at
    ):
        raise ConfigError(
            "the lock connection (AVAILABILITY_CRON_LOCK_DATABASE_URL, or DATABASE_URL when "
            f"unset) reached {lock_id.describe()}, but the work connection (DATABASE_URL) "
            f"reached {work_id.describe()}: both must reach the same database, or runs "
            "would not exclude each other"
        )
    if lock_id.backend_pid == work_id.backend_pid:
        raise TransactionPooler(
            f"the lock and work connections ran on the same server session (backend pid "
            f"{lock_id.backend_pid}): DATABASE_URL goes through a pooler in transaction mode "
            "(PgBouncer pool_mode=transaction?), where a session advisory lock cannot keep "
            "runs apart. Set AVAILABILITY_CRON_LOCK_DATABASE_URL to a direct connection or a "
            "session-mode pooler reaching the same database."
        )


def latest_migration() -> int:
    return max(m.version for m in available_migrations())


def ensure_schema(conn: Connection, source_table: str, default_source: str) -> None:
    """Raise SchemaMissing (or ConfigError for a custom source) unless the schema is usable."""
    row = conn.execute(queries.LEDGER_EXISTS).fetchone()
    version: int | None = None
    if row and row[0]:
        row = conn.execute(queries.SCHEMA_VERSION).fetchone()
        version = int(row[0]) if row else 0
    latest = latest_migration()
    if version is None or version < latest:
        found = "no schema" if version is None else f"schema version {version}"
        raise SchemaMissing(
            f"the database has {found}, this version needs {latest}: "
            "run `availability-cron db migrate`"
        )
    _warn_shadowed(conn, source_table)
    quoted = sql.Identifier(*source_table.split(".")).as_string(conn)
    row = conn.execute(queries.RELATION_EXISTS, {"name": quoted}).fetchone()
    if not (row and row[0]):
        if source_table == default_source:
            raise SchemaMissing(
                f"table {source_table} is missing: run `availability-cron db migrate`"
            )
        raise ConfigError(
            f"AVAILABILITY_CRON_SOURCE_TABLE names {source_table!r}, "
            "which does not exist in this database"
        )


#: The relations `db migrate` creates, which every command finds by the search path.
JOB_RELATIONS = ("availability_cron_migrations", "availability_cron_runs",
                 "workspace_availability_cache", "availability_workspaces")


def _warn_shadowed(conn: Connection, source_table: str) -> None:
    """Log a WARNING for each of the job's relations found in two schemas on the search path.

    The job's relations are not schema-qualified: an installation may keep them in a
    schema of its own, first on the role's search_path. A second copy earlier on the path
    (an old `db migrate` under another search_path built one) means this session uses a
    table the app, with its own search_path, may not read.
    """
    names = list(JOB_RELATIONS)
    if "." not in source_table:
        names.append(source_table)
    found = []
    for relation, schemas in conn.execute(queries.SHADOWED_RELATIONS, {"names": names}):
        used, *others = (sql.Identifier(s).as_string(conn) for s in schemas)
        found.append(f"{used}.{sql.Identifier(relation).as_string(conn)} "
                     f"(also in {', '.join(others)})")
    if found:
        log.warning(
            "the search_path (%s) finds tables of the job in more than one schema; this "
            "session uses %s, and an app with another search_path reads the other copies: "
            "drop the copies not in use, or fix the role's search_path (docs/operations.md)",
            _search_path(conn), ", ".join(found),
        )


def _search_path(conn: Connection) -> str:
    row = conn.execute(queries.SEARCH_PATH).fetchone()
    return str(row[0]) if row else "?"


def _ensure_migration_target(conn: Connection) -> None:
    """Raise ConfigError when `db migrate` would build a second schema: the migration ledger
    already exists in a schema on the search path other than the one it would create in."""
    row = conn.execute(queries.MIGRATION_TARGET).fetchone()
    assert row is not None
    target, search_path, ledgers = row
    if target is None:
        raise ConfigError(
            f"db migrate: no schema on the search_path ({search_path}) exists, so there is "
            "nowhere to create the tables: create one, or fix the role's search_path"
        )
    if ledgers and target not in ledgers:
        quoted = sql.Identifier(target).as_string(conn)
        found = sql.Identifier(ledgers[0]).as_string(conn)
        raise ConfigError(
            f"db migrate would create its tables in schema {quoted}, the first on the "
            f"search_path ({search_path}), but the schema is already migrated in schema "
            f"{found}, later on the path: the job would use a second, empty copy while the "
            f"app reads {found}'s. Put {found} first on the search_path of the role that "
            "runs the job (ALTER ROLE ... SET search_path), or run db migrate as a role "
            "whose search_path does"
        )


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql_text: str


def available_migrations() -> list[Migration]:
    """The numbered SQL files shipped in availability_cron/migrations, in order."""
    found = []
    for entry in resources.files("availability_cron.migrations").iterdir():
        match = re.fullmatch(r"(\d{4})_(\w+)\.sql", entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text("utf-8")))
    return sorted(found, key=lambda m: m.version)


def migrate(conn: Connection) -> list[Migration]:
    """Apply the migrations not applied yet, in one transaction, under an advisory lock.

    Safe to run concurrently: a second `db migrate` waits for the first, then finds
    nothing left to do. Returns the migrations this call applied.
    """
    ensure_writable(conn)
    applied_now = []
    with conn.transaction():
        conn.execute(queries.MIGRATION_LOCK, {"key": MIGRATION_LOCK_KEY})
        _ensure_migration_target(conn)
        conn.execute(queries.CREATE_MIGRATIONS_TABLE)
        done = {row[0] for row in conn.execute(queries.APPLIED_MIGRATIONS).fetchall()}
        for migration in available_migrations():
            if migration.version in done:
                continue
            log.info("applying migration %04d_%s", migration.version, migration.name)
            # A migration file is trusted, shipped SQL (several statements, no parameters).
            conn.execute(sql.SQL(migration.sql_text))
            conn.execute(
                queries.RECORD_MIGRATION, {"version": migration.version, "name": migration.name}
            )
            applied_now.append(migration)
    return applied_now
