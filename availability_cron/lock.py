"""The refresh lock: a PostgreSQL *session* advisory lock on a dedicated connection.

Why a session lock on its own connection: it is released by ``pg_advisory_unlock``
in a ``finally``, and, when the process dies (SIGKILL, OOM, power), by the server
as soon as the connection's socket closes, so no stale lock file can outlive a
crashed run. Its limits: it is per database (runs against different databases never
see each other), it does not cross to replicas, and it needs a real session (a
direct connection or a session-mode pooler; PgBouncer in transaction mode would
hand the lock to whichever client happens to reuse the server connection). :func:`take`
notices a shared session and raises TransactionPooler instead; the lock then gets its own
URL (AVAILABILITY_CRON_LOCK_DATABASE_URL). Operating it (`lock status`, `lock release`):
:func:`status`, :func:`release_stuck`; runbook in docs/operations.md.

The key is 64 bits taken from SHA-256 of ``"availability-cron:" + name``, not from
``hashtext`` (32 bits, and not guaranteed stable across major versions). With the
default name ``refresh`` the key is :data:`DEFAULT_LOCK_KEY`.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

import psycopg
from psycopg.rows import class_row

from . import queries
from .clock import iso_utc_or_none
from .errors import AvailabilityCronError, NotPermitted, NotPrimary, TransactionPooler

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


#: What our own lock sessions call themselves (cli._runtime): ``availability-cron lock
#: run=<run id> pid=<OS pid> host=<short host name>``. PostgreSQL keeps 63 bytes of it,
#: so a long host name arrives cut short.
_APPLICATION_NAME = re.compile(
    r"^availability-cron (?P<purpose>\S+) run=(?P<run_id>\S+)"
    r"(?: pid=(?P<os_pid>\d+))?(?: host=(?P<host>\S*))?"
)
def run_uuid(unix_ms: int, random_bits: int) -> uuid.UUID:
    """A UUIDv7 (RFC 9562): 48 bits of Unix milliseconds, then version, variant and random.

    A run's id is the first 12 hex digits of its UUID, so whoever sees a run id (in
    pg_stat_activity, a log line, the run history) can tell when that run started:
    `lock status` and the stuck-lock check use it to date a lock held through a pooled
    session older than the run. The whole UUID is the dead-man's-switch ``rid``.
    """
    value = (unix_ms & 0xFFFF_FFFF_FFFF) << 80
    value |= 0x7 << 76  # version 7
    value |= ((random_bits >> 62) & 0xFFF) << 64  # rand_a
    value |= 0b10 << 62  # RFC 9562 variant
    value |= random_bits & ((1 << 62) - 1)  # rand_b
    return uuid.UUID(int=value)


def run_started_at(run_id: str | None) -> datetime | None:
    """The start of the run whose id is ``run_id`` (see run_uuid); None if not one of ours."""
    if not run_id or not re.fullmatch(r"[0-9a-f]{12}", run_id):
        return None
    try:
        started = datetime.fromtimestamp(int(run_id, 16) / 1000, UTC)
    except (OverflowError, OSError, ValueError):
        return None
    # An id from before UUIDv7 run ids (random hex) decodes to a nonsense date.
    return started if datetime(2020, 1, 1, tzinfo=UTC) <= started <= datetime.now(UTC) \
        + timedelta(days=1) else None


#: application_name is truncated to NAMEDATALEN - 1 bytes.
APPLICATION_NAME_MAX = 63

#: What to do when pg_stat_activity hides the holder's session from this role.
VISIBILITY_HINT = (
    "this role cannot see other roles' sessions in pg_stat_activity (age, state, query and "
    "client are hidden): GRANT pg_read_all_stats TO {role}"
)


@dataclass(frozen=True)
class LockHolder:
    """The session holding the lock, as far as this role can see it."""

    pid: int
    application_name: str | None
    backend_start: datetime | None
    #: Age of the holder's session: PostgreSQL does not record when a lock was granted,
    #: and availability-cron's lock session takes the lock right after connecting.
    held_for_seconds: float | None
    state: str | None
    query: str | None
    #: False when pg_stat_activity hides the other session from this role.
    visible: bool
    role: str | None = None
    state_change: datetime | None = None
    wait_event_type: str | None = None
    wait_event: str | None = None
    client_addr: str | None = None
    client_port: int | None = None

    def as_json(self) -> dict[str, object]:
        return {
            "pid": self.pid,
            "applicationName": self.application_name,
            "since": iso_utc_or_none(self.backend_start),
            "heldForSeconds": (
                round(self.held_for_seconds, 1) if self.held_for_seconds is not None else None
            ),
            "state": self.state,
            "visible": self.visible,
        }

    @property
    def foreign(self) -> bool:
        """Not an availability-cron run: its application_name does not parse as one (an
        app's session that took the key, or one this role cannot see). Its
        held_for_seconds is then its *session's* age, which says nothing of how long it
        has held the lock."""
        return _APPLICATION_NAME.match(self.application_name or "") is None

    def run(self) -> dict[str, object] | None:
        """runId, OS pid and host parsed from our application_name; None for a foreign one."""
        match = _APPLICATION_NAME.match(self.application_name or "")
        if match is None:
            return None
        os_pid = match["os_pid"]
        started = run_started_at(match["run_id"])
        return {
            "runId": match["run_id"],
            "osPid": int(os_pid) if os_pid else None,
            # From the run id (a UUIDv7 prefix): when the holding run started.
            "runStartedAt": iso_utc_or_none(started),
            "host": match["host"] or None,
            # A long host name is cut by PostgreSQL's 63-byte limit on application_name.
            "hostMayBeTruncated": len((self.application_name or "").encode())
            >= APPLICATION_NAME_MAX,
        }

    def details_json(self, asking_role: str | None = None) -> dict[str, object]:
        """Everything `lock status` reports about the holder."""
        hint = None
        if not self.visible:
            role = _quote_ident(asking_role) if asking_role else "<the role in DATABASE_URL>"
            hint = VISIBILITY_HINT.format(role=role)
        return {
            "pid": self.pid,
            "applicationName": self.application_name,
            "run": self.run(),
            "role": self.role,
            "backendStart": _iso(self.backend_start),
            "heldForSeconds": (
                round(self.held_for_seconds, 1) if self.held_for_seconds is not None else None
            ),
            "state": self.state,
            "stateChange": _iso(self.state_change),
            "waitEventType": self.wait_event_type,
            "waitEvent": self.wait_event,
            # One line: our queries (and most apps') are indented over several.
            "query": " ".join(self.query.split()) if self.visible and self.query else None,
            "clientAddr": self.client_addr,
            "clientPort": self.client_port,
            "visible": self.visible,
            "hint": hint,
        }


def _duration(value: timedelta) -> str:
    """``2h``, ``10m``, ``90s``: the largest unit that divides it, as --older-than takes it."""
    seconds = int(value.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _iso(value: datetime | None) -> str | None:
    return iso_utc_or_none(value)


def _quote_ident(name: str) -> str:
    return name if re.fullmatch(r"[a-z_][a-z0-9_$]*", name) else '"' + name.replace('"', '""') + '"'


def stuck_after_seconds(time_budget_ms: int) -> float:
    """A run holding the lock longer than this cannot be healthy (budget + grace, with room
    to spare): the lock-stuck verdict of `refresh`, and the least `lock release` takes
    without --force."""
    return 2 * time_budget_ms / 1000 + 60


def find_holder(conn: psycopg.Connection[Any], key: int) -> LockHolder | None:
    """Who holds the advisory lock ``key`` in this database, or None if nobody."""
    classid, objid = _split_key(key)
    # Binary results: timestamps read whatever the DateStyle (see db.py).
    with conn.cursor(row_factory=class_row(LockHolder), binary=True) as cur:
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


#: Wraps each round trip on the lock's connection, e.g. to bound it (db.answer_within).
Guard = Callable[[], AbstractContextManager[object]]


@dataclass(frozen=True)
class HeldLock:
    """The lock, taken by the server session whose backend pid is ``backend_pid``."""

    conn: psycopg.Connection[Any]
    key: int
    backend_pid: int
    guard: Guard = nullcontext

    def alive(self) -> bool:
        """True while that same server session holds the lock and answers on ``conn``
        (within the guard's bound: a check that does not answer in time is False)."""
        try:
            with self.guard():
                return holds(self.conn, self.key, backend_pid=self.backend_pid)
        except AvailabilityCronError:  # the guard cut the connection
            return False


@contextmanager
def take(conn: psycopg.Connection[Any], key: int,
         guard: Guard = nullcontext) -> Iterator[HeldLock | None]:
    """Take the lock for the block; yield it, or None when another session holds it.

    ``guard`` wraps each round trip made on ``conn`` (taking, checking, releasing).

    On exit the lock is released if it was taken. Raises TransactionPooler (without
    holding the lock) when ``conn`` shares its server session with other clients: the
    session already held the lock before we asked, or the statement right after taking
    it ran on another session. ``conn`` must be in autocommit mode and used for nothing
    else while the lock is held, so that no transaction on it can fail and take the
    session down with it.
    """
    classid, objid = _split_key(key)
    with guard():
        row = conn.execute(queries.TAKE_ADVISORY_LOCK,
                           {"key": key, "classid": classid, "objid": objid}).fetchone()
    assert row is not None
    already_held, acquired, backend_pid = bool(row[0]), bool(row[1]), int(row[2])
    if already_held:
        raise TransactionPooler(
            f"the lock connection's server session (backend pid {backend_pid}) already held "
            "the lock before this run asked for it: its connection goes through a pooler in "
            "transaction mode, which shares server sessions between clients. "
            + _POOLER_FIX
        )
    if not acquired:
        yield None
        return
    try:
        with guard():
            still = holds(conn, key, backend_pid=backend_pid)
        if not still:
            raise TransactionPooler(
                f"the lock was taken by server session {backend_pid}, but the next statement "
                "on the same connection ran on another session: the connection goes through a "
                "pooler in transaction mode. " + _POOLER_FIX
            )
        yield HeldLock(conn, key, backend_pid, guard)
    finally:
        try:
            with guard():
                release(conn, key)
        except AvailabilityCronError:  # cut by the guard: the server drops the lock itself
            log.warning("the advisory lock was not released in time; the server drops it "
                        "with the session")


_POOLER_FIX = (
    "Set AVAILABILITY_CRON_LOCK_DATABASE_URL to a direct connection or a session-mode pooler "
    "reaching the same database."
)


@contextmanager
def held(conn: psycopg.Connection[Any], key: int) -> Iterator[bool]:
    """Yield whether the lock was taken; on exit it is released if it was (see :func:`take`)."""
    with take(conn, key) as taken:
        yield taken is not None


def holds(conn: psycopg.Connection[Any], key: int, *, backend_pid: int | None = None) -> bool:
    """True if this very session holds the lock now.

    Checked on the server, not by a mere ping: behind a transaction-mode pooler each
    statement may run on another server session, where a ping succeeds but the lock
    is not ours. With ``backend_pid`` (the session that took the lock), the statement
    must also run on that session. A dead connection is False too.
    """
    classid, objid = _split_key(key)
    try:
        if backend_pid is None:
            row = conn.execute(queries.SESSION_HOLDS_LOCK,
                               {"classid": classid, "objid": objid}).fetchone()
        else:
            row = conn.execute(queries.BACKEND_HOLDS_LOCK,
                               {"classid": classid, "objid": objid, "pid": backend_pid}).fetchone()
    except psycopg.Error:
        return False
    return bool(row and row[0])


# --- operating the lock: `lock status`, `lock release` --------------------------------------


@dataclass(frozen=True)
class LockStatus:
    """Who holds the lock right now, seen from ``database`` by ``role``."""

    name: str
    key: int
    database: str
    role: str
    checked_at: datetime
    holder: LockHolder | None

    def as_json(self) -> dict[str, object]:
        return {
            "lockName": self.name,
            "lockKey": self.key,
            "database": self.database,
            "checkedAt": _iso(self.checked_at),
            "held": self.holder is not None,
            "holder": self.holder.details_json(self.role) if self.holder else None,
        }


#: Why `lock status` and `lock release` refuse a hot standby, and a dry run there warns.
STANDBY_HINT = (
    "this server is a hot standby (pg_is_in_recovery()), and the refresh lock lives on the "
    "primary, where runs take it: a standby never sees it held. Point "
    "AVAILABILITY_CRON_LOCK_DATABASE_URL (else DATABASE_URL) at the primary"
)


def on_standby(conn: psycopg.Connection[Any]) -> bool:
    """True when ``conn`` reached a hot standby, whose pg_locks cannot show the lock."""
    row = conn.execute(queries.IS_STANDBY).fetchone()
    return bool(row and row[0])


def _refuse_standby(conn: psycopg.Connection[Any]) -> None:
    if on_standby(conn):
        raise NotPrimary(STANDBY_HINT)


def status(conn: psycopg.Connection[Any], name: str, *, now: datetime) -> LockStatus:
    """Who holds the lock named ``name`` in the database of ``conn`` (read-only).

    Raises NotPrimary on a hot standby: "free" would be a guess there.
    """
    _refuse_standby(conn)
    row = conn.execute(queries.WHO_AM_I).fetchone()
    assert row is not None
    key = lock_key(name)
    return LockStatus(name=name, key=key, database=str(row[0]), role=str(row[1]),
                      checked_at=now, holder=find_holder(conn, key))


class ReleaseOutcome(StrEnum):
    """How `lock release` ended."""

    #: Nobody held the lock: nothing to do.
    FREE = "free"
    #: --older-than is below the lock-stuck threshold (a healthy run may be that old),
    #: and --force was not given: nothing done.
    BELOW_STUCK = "below-stuck-threshold"
    #: The holder is not an availability-cron run, and --force was not given: left alone.
    FOREIGN = "foreign-holder"
    #: The holder is younger than the bound: left alone.
    TOO_YOUNG = "too-young"
    #: This role cannot see the holder's age (pg_read_all_stats): left alone.
    AGE_UNKNOWN = "age-unknown"
    #: The operator answered no.
    DECLINED = "declined"
    #: The holder's session was terminated and no longer holds the lock.
    TERMINATED = "terminated"
    #: The holder ended on its own between the check and the termination.
    GONE = "gone"
    #: Terminated, but the same session still held the lock when we stopped waiting.
    STILL_HELD = "still-held"


@dataclass(frozen=True)
class ReleaseResult:
    """What `lock release` found and did."""

    outcome: ReleaseOutcome
    older_than: timedelta
    holder: LockHolder | None
    #: Who holds the lock after the termination: a new run may have taken it at once.
    now_held_by: LockHolder | None = None
    #: The lock-stuck threshold (stuck_after_seconds), when it was checked.
    stuck_after: float | None = None

    @property
    def ok(self) -> bool:
        """The lock is no longer held by a session older than the bound."""
        return self.outcome in (ReleaseOutcome.FREE, ReleaseOutcome.TERMINATED,
                                ReleaseOutcome.GONE)

    def describe(self) -> str:
        """One line for people: what was found and what was done."""
        bound = _duration(self.older_than)
        h = self.holder
        who = f"backend pid {h.pid} ({h.application_name or 'no application name'})" if h else ""
        age = f"{h.held_for_seconds:.0f}s" if h and h.held_for_seconds is not None else "?"
        now = self.now_held_by
        after = "the lock is free" if now is None else (
            f"the lock is now held by backend pid {now.pid} ({now.application_name})")
        return {
            ReleaseOutcome.FREE: "nobody holds the lock: nothing to release",
            ReleaseOutcome.BELOW_STUCK: f"--older-than {bound} is below the lock-stuck "
            f"threshold of {self.stuck_after or 0:.0f}s (2 x the time budget + 60s): a healthy "
            "run may hold the lock that long; nothing done (pass --force to end a holder "
            "younger than that)",
            ReleaseOutcome.FOREIGN: f"{who} holds the lock, but it is not an availability-cron "
            "run (its age is its session's, not the lock's): left alone (pass --force to end "
            "it anyway)",
            ReleaseOutcome.TOO_YOUNG: f"{who} has held the lock for {age}, less than "
            f"--older-than {bound}: left alone",
            ReleaseOutcome.AGE_UNKNOWN: f"{who} holds the lock, but this role cannot see for "
            "how long (GRANT pg_read_all_stats to it): left alone",
            ReleaseOutcome.DECLINED: f"{who} holds the lock for {age}: left alone (declined)",
            ReleaseOutcome.TERMINATED: f"terminated {who}, which had held the lock for {age}; "
            f"{after}",
            ReleaseOutcome.GONE: f"{who} ended on its own before it was terminated; {after}",
            ReleaseOutcome.STILL_HELD: f"terminated {who}, but it still held the lock "
            "when we stopped waiting",
        }[self.outcome]

    def as_json(self) -> dict[str, object]:
        return {
            "outcome": str(self.outcome),
            "message": self.describe(),
            "terminated": self.outcome in (ReleaseOutcome.TERMINATED, ReleaseOutcome.STILL_HELD),
            "olderThanSeconds": self.older_than.total_seconds(),
            "stuckAfterSeconds": self.stuck_after,
            "holder": self.holder.details_json() if self.holder else None,
            "nowHeldBy": self.now_held_by.as_json() if self.now_held_by else None,
        }


def release_stuck(
    conn: psycopg.Connection[Any],
    key: int,
    *,
    older_than: timedelta,
    confirm: Callable[[LockHolder], bool],
    stuck_after: float | None = None,
    force: bool = False,
    wait_seconds: float = 5.0,
    monotonic: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> ReleaseResult:
    """End the session holding the lock if it has held it longer than ``older_than``.

    Never touches a younger holder, nor one whose age this role cannot see. Unless
    ``force``: touches nothing at all when ``older_than`` is below ``stuck_after`` (the
    lock-stuck threshold; a healthy run may be that old), and never a holder that is not
    an availability-cron run (LockHolder.foreign). The termination
    (``pg_terminate_backend``) only hits the very session that was judged (same pid and
    backend_start), after ``confirm(holder)`` returned True; then waits up to
    ``wait_seconds`` for that session to let go of the lock. Raises NotPermitted when
    the role may not terminate it (it needs superuser, membership in the holder's role,
    or pg_signal_backend; only a superuser may end a superuser's session), and NotPrimary
    on a hot standby, which cannot see the primary's holder.
    """
    _refuse_standby(conn)
    holder = find_holder(conn, key)

    def result(outcome: ReleaseOutcome, now_held_by: LockHolder | None = None) -> ReleaseResult:
        return ReleaseResult(outcome, older_than, holder, now_held_by, stuck_after)

    # Refused whoever holds the lock, or nobody: the bound itself is the mistake.
    if not force and stuck_after is not None and older_than.total_seconds() < stuck_after:
        return result(ReleaseOutcome.BELOW_STUCK)
    if holder is None:
        return result(ReleaseOutcome.FREE)
    if holder.held_for_seconds is None or holder.backend_start is None:
        return result(ReleaseOutcome.AGE_UNKNOWN)
    if not force and holder.foreign:
        return result(ReleaseOutcome.FOREIGN)
    if holder.held_for_seconds < older_than.total_seconds():
        return result(ReleaseOutcome.TOO_YOUNG)
    if not confirm(holder):
        return result(ReleaseOutcome.DECLINED)

    log.warning(
        "terminating backend pid %s (%s), which has held the lock %s for %.0fs (bound %.0fs)",
        holder.pid, holder.application_name, key, holder.held_for_seconds,
        older_than.total_seconds(),
    )
    classid, objid = _split_key(key)
    try:
        row = conn.execute(queries.TERMINATE_HOLDER, {
            "classid": classid, "objid": objid, "pid": holder.pid,
            "backend_start": holder.backend_start,
        }).fetchone()
    except psycopg.errors.InsufficientPrivilege as exc:
        detail = " ".join(str(exc).split())
        raise NotPermitted(
            f"this role may not terminate backend pid {holder.pid} (role {holder.role}): "
            f"{detail}. pg_terminate_backend needs superuser, membership in the holder's role, "
            "or pg_signal_backend (a superuser's session only a superuser may end)"
        ) from None
    if row is None or not row[0]:
        log.warning("backend pid %s no longer held the lock; nothing terminated", holder.pid)
        return result(ReleaseOutcome.GONE, find_holder(conn, key))

    deadline = monotonic() + wait_seconds
    while True:
        now_held_by = find_holder(conn, key)
        if now_held_by is None or now_held_by.pid != holder.pid:
            log.warning("backend pid %s terminated; the lock is %s", holder.pid,
                        "free" if now_held_by is None else f"now held by pid {now_held_by.pid}")
            return result(ReleaseOutcome.TERMINATED, now_held_by)
        if monotonic() >= deadline:
            log.error("backend pid %s was told to terminate but still holds the lock after "
                      "%.0fs", holder.pid, wait_seconds)
            return result(ReleaseOutcome.STILL_HELD, now_held_by)
        sleep(0.05)
