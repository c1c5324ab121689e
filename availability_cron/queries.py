"""Every SQL statement of availability-cron, as named constants.

Values always go through ``%(name)s`` placeholders. The one identifier that varies,
the configurable source relation, is a ``{source}`` placeholder filled with
``psycopg.sql.Identifier`` by :func:`with_source`; nothing here is built from
f-strings.
"""

from __future__ import annotations

from psycopg import sql

# --- migrations ---------------------------------------------------------------------------

# Serialises concurrent `db migrate` runs; released at the end of the transaction.
MIGRATION_LOCK = sql.SQL("SELECT pg_advisory_xact_lock(%(key)s)")

# The ledger of applied migrations.
CREATE_MIGRATIONS_TABLE = sql.SQL(
    """
    CREATE TABLE IF NOT EXISTS availability_cron_migrations (
        version    integer PRIMARY KEY,
        name       text NOT NULL,
        applied_at timestamptz NOT NULL DEFAULT now()
    )
    """
)

APPLIED_MIGRATIONS = sql.SQL("SELECT version FROM availability_cron_migrations ORDER BY version")

RECORD_MIGRATION = sql.SQL(
    "INSERT INTO availability_cron_migrations (version, name) VALUES (%(version)s, %(name)s)"
)

# Is there a migration ledger at all? (Asked first: querying a missing table raises.)
LEDGER_EXISTS = sql.SQL("SELECT to_regclass('availability_cron_migrations') IS NOT NULL")

SCHEMA_VERSION = sql.SQL("SELECT coalesce(max(version), 0) FROM availability_cron_migrations")

# Does a relation (table or view) of this name exist on the search path?
RELATION_EXISTS = sql.SQL("SELECT to_regclass(%(name)s) IS NOT NULL")

# A hot standby cannot take writes (nor hold a meaningful lock).
IS_STANDBY = sql.SQL("SELECT pg_is_in_recovery()")

PING = sql.SQL("SELECT 1")

# Bound every statement of a run by what is left of it: a row lock held by an app
# transaction, or a DDL migration, must not keep the run (and the lock) past its budget.
SET_TIMEOUTS = sql.SQL(
    "SELECT set_config('statement_timeout', %(ms)s, false),"
    " set_config('lock_timeout', %(ms)s, false)"
)

# Our connections idle between statements for up to a whole run; a server-wide
# idle_session_timeout (PostgreSQL 14+) must not end them, and the lock with them.
KEEP_IDLE_SESSION = sql.SQL("SET idle_session_timeout = 0")

# Server-side keepalives: if the job's host vanishes (power, network), the server
# notices within ~30 s and drops the session and its lock, instead of the server
# default (often 2 hours). Ignored on Unix sockets.
SESSION_KEEPALIVES = sql.SQL(
    "SET tcp_keepalives_idle = 15; SET tcp_keepalives_interval = 5;"
    " SET tcp_keepalives_count = 3"
)

# --- lock -----------------------------------------------------------------------------------

TRY_ADVISORY_LOCK = sql.SQL("SELECT pg_try_advisory_lock(%(key)s)")

# Does *this* server session hold the lock (not merely: does the connection answer)?
SESSION_HOLDS_LOCK = sql.SQL(
    """
    SELECT EXISTS (
        SELECT 1 FROM pg_locks
         WHERE locktype = 'advisory' AND granted AND pid = pg_backend_pid()
           AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
           AND classid = %(classid)s::bigint::oid AND objid = %(objid)s::bigint::oid
           AND objsubid = 1)
    """
)

ADVISORY_UNLOCK = sql.SQL("SELECT pg_advisory_unlock(%(key)s)")

# The session holding a bigint advisory lock in this database. pg_locks shows the key
# split as classid (high half) and objid (low half) with objsubid = 1.
LOCK_HOLDER = sql.SQL(
    """
    SELECT l.pid,
           a.application_name,
           a.backend_start,
           extract(epoch FROM clock_timestamp() - a.backend_start)::float8 AS held_for_seconds,
           a.state,
           a.query,
           (a.state IS NOT NULL) AS visible
      FROM pg_locks AS l
      LEFT JOIN pg_stat_activity AS a ON a.pid = l.pid
     WHERE l.locktype = 'advisory'
       AND l.granted
       AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
       AND l.classid = %(classid)s::bigint::oid
       AND l.objid = %(objid)s::bigint::oid
       AND l.objsubid = 1
     LIMIT 1
    """
)

# --- plan -----------------------------------------------------------------------------------

# Due caches of enabled workspaces, stalest first. Never loads slots_utc.
DUE_CACHES = sql.SQL(
    """
    SELECT c.workspace_id, w.provider, w.provider_config, c.stale_at, c.refreshed_at,
           c.consecutive_failures
      FROM workspace_availability_cache AS c
      JOIN {source} AS w ON w.workspace_id = c.workspace_id
     WHERE w.enabled AND c.stale_at <= %(now)s
     ORDER BY c.stale_at, c.workspace_id
     LIMIT %(limit)s
    """
)

# Enabled workspaces that have no cache row at all, oldest workspace first.
MISSING_CACHES = sql.SQL(
    """
    SELECT w.workspace_id, w.provider, w.provider_config, w.created_at
      FROM {source} AS w
     WHERE w.enabled
       AND NOT EXISTS (SELECT 1 FROM workspace_availability_cache AS c
                        WHERE c.workspace_id = w.workspace_id)
     ORDER BY w.created_at, w.workspace_id
     LIMIT %(limit)s
    """
)

# One workspace and the state of its cache, for `refresh --workspace`.
ONE_WORKSPACE = sql.SQL(
    """
    SELECT w.workspace_id, w.provider, w.provider_config, w.enabled, w.created_at,
           c.stale_at, c.refreshed_at, coalesce(c.consecutive_failures, 0) AS consecutive_failures,
           (c.workspace_id IS NOT NULL) AS has_cache
      FROM {source} AS w
      LEFT JOIN workspace_availability_cache AS c ON c.workspace_id = w.workspace_id
     WHERE w.workspace_id = %(workspace_id)s
    """
)

# --- writes ---------------------------------------------------------------------------------

# A success replaces the slots, unless a newer success is already stored (a slow call
# must never overwrite fresher data written meanwhile by another run).
WRITE_SUCCESS = sql.SQL(
    """
    INSERT INTO workspace_availability_cache AS c
           (workspace_id, slots_utc, slot_count, range_start, range_end, fetched_at,
            refreshed_at, stale_at, last_error, last_error_at, consecutive_failures)
    VALUES (%(workspace_id)s, %(slots)s, %(slot_count)s, %(range_start)s, %(range_end)s,
            %(fetched_at)s, %(refreshed_at)s, %(stale_at)s, NULL, NULL, 0)
    ON CONFLICT (workspace_id) DO UPDATE
       SET slots_utc = EXCLUDED.slots_utc,
           slot_count = EXCLUDED.slot_count,
           range_start = EXCLUDED.range_start,
           range_end = EXCLUDED.range_end,
           fetched_at = greatest(c.fetched_at, EXCLUDED.fetched_at),
           refreshed_at = EXCLUDED.refreshed_at,
           stale_at = EXCLUDED.stale_at,
           last_error = NULL,
           last_error_at = NULL,
           consecutive_failures = 0
     WHERE c.refreshed_at IS NULL OR c.refreshed_at < EXCLUDED.refreshed_at
    """
)

# A failure records the attempt and pushes stale_at out; slots, range and refreshed_at
# stay as they were. Skipped when a success newer than this attempt's start is stored.
WRITE_FAILURE = sql.SQL(
    """
    INSERT INTO workspace_availability_cache AS c
           (workspace_id, fetched_at, stale_at, last_error, last_error_at, consecutive_failures)
    VALUES (%(workspace_id)s, %(fetched_at)s, %(stale_at)s, %(error)s, %(fetched_at)s, 1)
    ON CONFLICT (workspace_id) DO UPDATE
       SET fetched_at = greatest(c.fetched_at, EXCLUDED.fetched_at),
           last_error = EXCLUDED.last_error,
           last_error_at = EXCLUDED.last_error_at,
           consecutive_failures = c.consecutive_failures + 1,
           stale_at = EXCLUDED.stale_at
     WHERE c.refreshed_at IS NULL OR c.refreshed_at < %(attempt_started_at)s
    """
)

# --- metrics --------------------------------------------------------------------------------

# Staleness of enabled workspaces, measured from the last *successful* refresh.
STALENESS = sql.SQL(
    """
    WITH w AS (SELECT workspace_id FROM {source} WHERE enabled),
         c AS (SELECT c.stale_at, c.refreshed_at, c.range_start, c.last_error
                 FROM workspace_availability_cache AS c
                 JOIN w ON w.workspace_id = c.workspace_id)
    SELECT (SELECT count(*) FROM w) AS workspaces,
           count(*) AS caches,
           count(*) FILTER (WHERE c.stale_at <= %(now)s) AS stale_due,
           count(*) FILTER (WHERE c.last_error IS NOT NULL) AS erroring_caches,
           count(*) FILTER (WHERE c.refreshed_at IS NULL) AS caches_never_succeeded,
           min(c.refreshed_at) AS oldest_success,
           min(c.range_start) AS oldest_range_start,
           percentile_cont(0.5) WITHIN GROUP (
               ORDER BY extract(epoch FROM %(now)s - c.refreshed_at))
               FILTER (WHERE c.refreshed_at IS NOT NULL) AS success_age_p50_seconds,
           percentile_cont(0.95) WITHIN GROUP (
               ORDER BY extract(epoch FROM %(now)s - c.refreshed_at))
               FILTER (WHERE c.refreshed_at IS NOT NULL) AS success_age_p95_seconds
      FROM c
    """
)

# --- demo -----------------------------------------------------------------------------------

# Seed rows of `availability-cron demo` (simulated provider).
DEMO_WORKSPACE = sql.SQL(
    "INSERT INTO availability_workspaces (workspace_id, provider, provider_config, created_at)"
    " VALUES (%(workspace_id)s, 'simulated', %(config)s, %(created_at)s)"
)

DEMO_CACHE = sql.SQL(
    """
    INSERT INTO workspace_availability_cache (workspace_id, slots_utc, slot_count, range_start,
                range_end, fetched_at, refreshed_at, stale_at)
    VALUES (%(workspace_id)s, %(slots)s, 0, %(refreshed_at)s,
            %(refreshed_at)s + interval '30 days', %(refreshed_at)s, %(refreshed_at)s,
            %(stale_at)s)
    """
)

# --- app-side readers -----------------------------------------------------------------------

CACHE_ROW = sql.SQL(
    """
    SELECT workspace_id, slots_utc, range_start, range_end, fetched_at, refreshed_at, stale_at,
           last_error, last_error_at, consecutive_failures
      FROM workspace_availability_cache
     WHERE workspace_id = %(workspace_id)s
    """
)


def with_source(query: sql.SQL, source_table: str) -> sql.Composed:
    """Fill ``{source}`` with the configured relation, quoted as an identifier."""
    return query.format(source=sql.Identifier(*source_table.split(".")))
