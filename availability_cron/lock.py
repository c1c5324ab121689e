"""The refresh lock: a PostgreSQL *session* advisory lock on a dedicated connection.

Why a session lock on its own connection: it is released by ``pg_advisory_unlock``
in a ``finally``, and, when the process dies (SIGKILL, OOM, power), by the server
as soon as the connection's socket closes, so no stale lock file can outlive a
crashed run. Its limits: it is per database (runs against different databases never
see each other), it does not cross to replicas, and it needs a real session (a
direct connection or a session-mode pooler; PgBouncer in transaction mode would
hand the lock to whichever client happens to reuse the server connection).

The key is 64 bits taken from SHA-256 of ``"availability-cron:" + name``, not from
``hashtext`` (32 bits, and not guaranteed stable across major versions). With the
default name ``refresh`` the key is :data:`DEFAULT_LOCK_KEY`.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import class_row

from . import queries

log = logging.getLogger(__name__)

LOCK_NAMESPACE = "availability-cron:"


def lock_key(name: str) -> int:
    """The signed 64-bit advisory-lock key for ``name`` (stable across versions and hosts)."""
    digest = hashlib.sha256((LOCK_NAMESPACE + name).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


DEFAULT_LOCK_KEY = lock_key("refresh")


def _split_key(key: int) -> tuple[int, int]:
    """pg_locks shows a bigint advisory key as classid (high 32 bits), objid (low 32 bits)."""
    unsigned = key & 0xFFFF_FFFF_FFFF_FFFF
    return unsigned >> 32, unsigned & 0xFFFF_FFFF


@dataclass(frozen=True)
class LockHolder:
    """The session holding the lock, as far as this role can see it."""

    pid: int
    application_name: str | None
    backend_start: datetime | None
    held_for_seconds: float | None
    state: str | None
    query: str | None
    #: False when pg_stat_activity hides the other session from this role.
    visible: bool

    def as_json(self) -> dict[str, object]:
        return {
            "pid": self.pid,
            "applicationName": self.application_name,
            "since": self.backend_start.isoformat() if self.backend_start else None,
            "heldForSeconds": (
                round(self.held_for_seconds, 1) if self.held_for_seconds is not None else None
            ),
            "state": self.state,
            "visible": self.visible,
        }


def find_holder(conn: psycopg.Connection[Any], key: int) -> LockHolder | None:
    """Who holds the advisory lock ``key`` in this database, or None if nobody."""
    classid, objid = _split_key(key)
    with conn.cursor(row_factory=class_row(LockHolder)) as cur:
        cur.execute(queries.LOCK_HOLDER, {"classid": classid, "objid": objid})
        return cur.fetchone()


def try_acquire(conn: psycopg.Connection[Any], key: int) -> bool:
    """Try once to take the session advisory lock; never waits."""
    row = conn.execute(queries.TRY_ADVISORY_LOCK, {"key": key}).fetchone()
    return bool(row and row[0])


def release(conn: psycopg.Connection[Any], key: int) -> None:
    """Release the lock if this session still holds it; a dead connection already released it."""
    if conn.closed:
        return
    try:
        row = conn.execute(queries.ADVISORY_UNLOCK, {"key": key}).fetchone()
    except psycopg.Error as exc:  # the server drops the lock with the session anyway
        log.warning("could not release the advisory lock cleanly: %s", type(exc).__name__)
        return
    if not (row and row[0]):
        # Only possible when the "session" changed under us: a transaction-mode pooler.
        log.error("the advisory lock was not held by this session at release; is "
                  "DATABASE_URL going through a transaction-mode pooler?")


@contextmanager
def held(conn: psycopg.Connection[Any], key: int) -> Iterator[bool]:
    """Yield whether the lock was taken; on exit it is released if it was.

    ``conn`` must be in autocommit mode and used for nothing else while the lock is
    held, so that no transaction on it can fail and take the session down with it.
    """
    acquired = try_acquire(conn, key)
    try:
        yield acquired
    finally:
        if acquired:
            release(conn, key)


def holds(conn: psycopg.Connection[Any], key: int) -> bool:
    """True if this very session holds the lock now.

    Checked on the server, not by a mere ping: behind a transaction-mode pooler each
    statement may run on another server session, where a ping succeeds but the lock
    is not ours. A dead connection is False too.
    """
    classid, objid = _split_key(key)
    try:
        row = conn.execute(queries.SESSION_HOLDS_LOCK,
                           {"classid": classid, "objid": objid}).fetchone()
    except psycopg.Error:
        return False
    return bool(row and row[0])
