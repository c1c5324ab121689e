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

# Where `db migrate` would create its tables (the first existing schema on the search path),
# and every schema on the path that already holds a migration ledger, in path order.
MIGRATION_TARGET = sql.SQL(
    """
    SELECT current_schema() AS target,
           current_setting('search_path') AS search_path,
           array(SELECT p.name::text
                   FROM unnest(current_schemas(false)) WITH ORDINALITY AS p(name, pos)
                   JOIN pg_namespace AS n ON n.nspname = p.name
                  WHERE EXISTS (SELECT 1 FROM pg_class AS c
                                 WHERE c.relnamespace = n.oid
                                   AND c.relname = 'availability_cron_migrations')
                  ORDER BY p.pos) AS ledgers
    """
)

# The job's relations found in more than one schema on the search path (the session uses
# the first; an app with another search_path may read another copy), in path order.
SHADOWED_RELATIONS = sql.SQL(
    """
    SELECT c.relname::text AS relation, array_agg(p.name::text ORDER BY p.pos) AS schemas
      FROM unnest(current_schemas(false)) WITH ORDINALITY AS p(name, pos)
      JOIN pg_namespace AS n ON n.nspname = p.name
      JOIN pg_class AS c ON c.relnamespace = n.oid
     WHERE c.relname = ANY(%(names)s) AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
     GROUP BY c.relname
    HAVING count(*) > 1
     ORDER BY c.relname
    """
)

SCHEMA_VERSION = sql.SQL("SELECT coalesce(max(version), 0) FROM availability_cron_migrations")

SEARCH_PATH = sql.SQL("SELECT current_setting('search_path')")

# Does a relation (table or view) of this name exist on the search path?
RELATION_EXISTS = sql.SQL("SELECT to_regclass(%(name)s) IS NOT NULL")

# A hot standby cannot take writes (nor hold a meaningful lock).
IS_STANDBY = sql.SQL("SELECT pg_is_in_recovery()")

# Can this session write? Not on a hot standby, nor when its transactions are read-only by
# default (default_transaction_read_only, which a DBA may set for a database or a role);
# pg_settings says where that was set, for the message.
SESSION_WRITABLE = sql.SQL(
    """
    SELECT pg_is_in_recovery() AS in_recovery,
           current_setting('transaction_read_only') = 'on' AS read_only,
           (SELECT source FROM pg_settings WHERE name = 'default_transaction_read_only')
               AS set_by,
           current_database() AS database,
           current_user::text AS role
    """
)

PING = sql.SQL("SELECT 1")

# Bound the statements of one transaction, and its idle gaps, by what is left of the run: a
# row lock held by an app transaction, or a DDL migration, must not keep the run (and the
# lock) past its budget, and a client gone mid-transaction must not keep its row locks. The
# third argument, true, makes them SET LOCAL: they end with the transaction and are never
# left on a server session that a transaction-mode pooler hands to the app next.
SET_LOCAL_TIMEOUTS = sql.SQL(
    "SELECT set_config('statement_timeout', %(ms)s, true),"
    " set_config('lock_timeout', %(ms)s, true),"
    " set_config('idle_in_transaction_session_timeout', %(ms)s, true)"
)

# Session settings, for a connection that is a server session of its own only (the lock's;
# the work connection when it shares the lock's URL): never through a transaction pooler.

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

# Take the lock unless this server session holds it already, and say which session ran
# the statement. A fresh connection's session can only hold it already when a pooler
# shares server sessions between clients (transaction mode): advisory locks are
# re-entrant, so taking it again there would let two runs proceed at once.
TAKE_ADVISORY_LOCK = sql.SQL(
    """
    WITH mine AS MATERIALIZED (
        SELECT EXISTS (
            SELECT 1 FROM pg_locks
             WHERE locktype = 'advisory' AND granted AND pid = pg_backend_pid()
               AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
               AND classid = %(classid)s::bigint::oid AND objid = %(objid)s::bigint::oid
               AND objsubid = 1) AS already_held)
    SELECT already_held,
           CASE WHEN already_held THEN false ELSE pg_try_advisory_lock(%(key)s) END AS acquired,
           pg_backend_pid() AS backend_pid
      FROM mine
    """
)

# Does the session that took the lock (its backend pid) still hold it, and is it the one
# answering? Behind a transaction-mode pooler the statement may run on another session.
BACKEND_HOLDS_LOCK = sql.SQL(
    """
    SELECT pg_backend_pid() = %(pid)s AND EXISTS (
        SELECT 1 FROM pg_locks
         WHERE locktype = 'advisory' AND granted AND pid = %(pid)s
           AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
           AND classid = %(classid)s::bigint::oid AND objid = %(objid)s::bigint::oid
           AND objsubid = 1)
    """
)

# Which database on which server this session reached, readable by any role. The
# postmaster start time tells two servers apart, a primary and its replica included
# (pg_control_system().system_identifier would not: replicas share it).
SERVER_IDENTITY = sql.SQL(
    """
    SELECT current_database() AS database,
           (SELECT oid FROM pg_database WHERE datname = current_database())::bigint
               AS database_oid,
           pg_postmaster_start_time() AS server_started_at,
           pg_backend_pid() AS backend_pid
    """
)

# The session holding a bigint advisory lock in this database. pg_locks shows the key
# split as classid (high half) and objid (low half) with objsubid = 1.
LOCK_HOLDER = sql.SQL(
    """
    SELECT l.pid,
           a.application_name,
           a.backend_start,
           -- Since the lock was taken, as near as can be seen: a session-mode pooler may
           -- hand a run a server session far older than its lock, so for our own runs
           -- the age counts from the run's start, which its run id carries (the first 48
           -- bits of a UUIDv7: Unix ms), when that is later than the session's start.
           extract(epoch FROM clock_timestamp() - coalesce(
               (SELECT started FROM (SELECT to_timestamp(('x' || lpad(substring(
                        a.application_name FROM '^availability-cron [^ ]+ run=([0-9a-f]{12})'),
                        16, '0'))::bit(64)::bigint / 1000.0) AS started) AS run
                 WHERE started BETWEEN a.backend_start AND clock_timestamp()),
               a.backend_start))::float8 AS held_for_seconds,
           a.state,
           a.query,
           (a.state IS NOT NULL) AS visible,
           a.usename::text AS role,
           a.state_change,
           a.wait_event_type,
           a.wait_event,
           host(a.client_addr) AS client_addr,
           a.client_port
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

# Who is asking: the database and role that `lock status` reports on.
WHO_AM_I = sql.SQL("SELECT current_database() AS database, current_user::text AS role")

# End the session holding the lock, only if it is still the one that was judged too old
# (same pid, same backend_start: a pid may have been reused by a new backend meanwhile).
# No row: that session no longer holds the lock.
TERMINATE_HOLDER = sql.SQL(
    """
    SELECT pg_terminate_backend(l.pid)
      FROM pg_locks AS l
      JOIN pg_stat_activity AS a ON a.pid = l.pid
     WHERE l.locktype = 'advisory'
       AND l.granted
       AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
       AND l.classid = %(classid)s::bigint::oid
       AND l.objid = %(objid)s::bigint::oid
       AND l.objsubid = 1
       AND l.pid = %(pid)s
       AND a.backend_start = %(backend_start)s
    """
)

# --- plan -----------------------------------------------------------------------------------

# Why the provider_config of source row ``w`` must not be used (NULL when it may): too large
# stored, too large as JSON text, or nested too deep (see source.py for the caps and their
# placeholders). In this order: pg_column_size reads the stored size without decompressing
# a TOASTed value, so a huge config is never detoasted, let alone sent. OFFSET 0 keeps the
# planner from inlining it into each use of its result (it would run once per use).
# Filled into ``{config_check}`` by with_source, as a LATERAL subquery.
CONFIG_CHECK = sql.SQL(
    """
    SELECT CASE
        WHEN pg_column_size(w.provider_config) > %(max_config_bytes)s
            THEN format('provider_config is too large: %%s bytes stored, the limit is %%s bytes',
                        pg_column_size(w.provider_config), %(max_config_bytes)s)
        WHEN octet_length(w.provider_config::text) > %(max_config_bytes)s
            THEN format('provider_config is too large: %%s bytes of JSON, the limit is %%s bytes',
                        octet_length(w.provider_config::text), %(max_config_bytes)s)
        WHEN jsonb_path_exists(w.provider_config::jsonb, %(config_too_deep)s::jsonpath)
            THEN format('provider_config is nested more than %%s levels deep',
                        %(max_config_depth)s)
        END AS error
    OFFSET 0
    """
)

# Of several enabled source rows with one workspace_id (a view's join gone wrong), the
# one used everywhere: created last (created_at DESC NULLS LAST), then by provider (NULLS
# LAST); rows equal in both are interchangeable. INVALID_SOURCE_ROWS counts the others.
# Filled into ``{one_row}`` by with_source, after an ORDER BY over the source as ``w``.
ONE_ROW_ORDER = sql.SQL("w.created_at DESC NULLS LAST, w.provider NULLS LAST")

# Due caches of enabled workspaces, stalest first. Never loads slots_utc, nor a
# provider_config over the caps (NULL then, and provider_config_error says why). One
# source row per cache row (ONE_ROW_ORDER), probed per due cache along the stale_at index.
DUE_CACHES = sql.SQL(
    """
    SELECT w.workspace_id, w.provider,
           CASE WHEN chk.error IS NULL THEN w.provider_config END AS provider_config,
           chk.error AS provider_config_error,
           w.stale_at, w.refreshed_at, w.consecutive_failures, w.created_at
      FROM (SELECT c.workspace_id, s.provider, s.provider_config, c.stale_at, c.refreshed_at,
                   c.consecutive_failures, s.created_at
              FROM workspace_availability_cache AS c
             CROSS JOIN LATERAL (SELECT w.provider, w.provider_config, w.created_at
                                   FROM {source} AS w
                                  WHERE w.workspace_id = c.workspace_id AND w.enabled
                                  ORDER BY {one_row}
                                  LIMIT 1) AS s
             WHERE c.stale_at <= %(now)s
             ORDER BY c.stale_at, c.workspace_id
             LIMIT %(limit)s) AS w
     CROSS JOIN LATERAL ({config_check}) AS chk
     ORDER BY w.stale_at, w.workspace_id
    """
)

# Enabled workspaces that have no cache row at all, oldest workspace first (a NULL
# created_at last); provider_config as in DUE_CACHES. Rows that cannot be cached (a NULL
# or over-long workspace_id; INVALID_SOURCE_ROWS counts them) are left out: they would
# take slots of the limit, then fail the write of their whole batch. A duplicated
# workspace_id is one workspace (ONE_ROW_ORDER picks its row) and takes one slot. A cache
# row left by an older workspace with the same id (workspace_created_at before this one's
# created_at: the id was reused) is no cache of this one: it is missing.
MISSING_CACHES = sql.SQL(
    """
    SELECT w.workspace_id, w.provider,
           CASE WHEN chk.error IS NULL THEN w.provider_config END AS provider_config,
           chk.error AS provider_config_error,
           w.created_at
      FROM (SELECT s.workspace_id, s.provider, s.provider_config, s.created_at
              FROM (SELECT DISTINCT ON (w.workspace_id)
                           w.workspace_id, w.provider, w.provider_config, w.created_at
                      FROM {source} AS w
                     WHERE w.enabled
                       AND octet_length(w.workspace_id) <= %(max_workspace_id_bytes)s
                       AND NOT EXISTS (SELECT 1 FROM workspace_availability_cache AS c
                                        WHERE c.workspace_id = w.workspace_id
                                          AND (c.workspace_created_at IS NULL
                                               OR w.created_at IS NULL
                                               OR c.workspace_created_at >= w.created_at))
                     ORDER BY w.workspace_id, {one_row}) AS s
             ORDER BY s.created_at NULLS LAST, s.workspace_id
             LIMIT %(limit)s) AS w
     CROSS JOIN LATERAL ({config_check}) AS chk
     ORDER BY w.created_at NULLS LAST, w.workspace_id
    """
)

# Enabled source rows that break the contract on a key column: a NULL or over-long
# workspace_id (no cache row can hold it: MISSING_CACHES leaves them out), a NULL
# created_at on a workspace without a cache row (planned last; not when a duplicate is
# dated: ONE_ROW_ORDER picks that one), and the rows of a duplicated workspace_id beyond
# the one used; and the first few ids of the latter two. Three scans of the source: the
# cache is probed (an anti-join) only for the rare rows with a NULL created_at; an OR
# with a probe per row would also cost enough, on paper, to have the server JIT-compile it.
INVALID_SOURCE_ROWS = sql.SQL(
    """
    SELECT k.null_workspace_id, k.long_workspace_id, d.null_created_at, d.null_created_at_ids,
           g.duplicate_rows, g.duplicated_ids, g.duplicated_ids_named
      FROM (SELECT count(*) FILTER (WHERE w.workspace_id IS NULL) AS null_workspace_id,
                   count(*) FILTER (WHERE octet_length(w.workspace_id)
                                          > %(max_workspace_id_bytes)s) AS long_workspace_id
              FROM {source} AS w
             WHERE w.enabled
               AND (w.workspace_id IS NULL
                    OR octet_length(w.workspace_id) > %(max_workspace_id_bytes)s)) AS k,
           (SELECT count(DISTINCT w.workspace_id) AS null_created_at,
                   coalesce((array_agg(DISTINCT w.workspace_id
                                       ORDER BY w.workspace_id))[1:%(named)s],
                            '{{}}') AS null_created_at_ids
              FROM {source} AS w
             WHERE w.enabled AND w.created_at IS NULL
               AND octet_length(w.workspace_id) <= %(max_workspace_id_bytes)s
               AND NOT EXISTS (SELECT 1 FROM workspace_availability_cache AS c
                                WHERE c.workspace_id = w.workspace_id)
               AND NOT EXISTS (SELECT 1 FROM {source} AS x
                                WHERE x.workspace_id = w.workspace_id AND x.enabled
                                  AND x.created_at IS NOT NULL)) AS d,
           (SELECT coalesce(sum(n.rows - 1), 0)::bigint AS duplicate_rows,
                   count(*) AS duplicated_ids,
                   coalesce((array_agg(n.workspace_id ORDER BY n.workspace_id))[1:%(named)s],
                            '{{}}') AS duplicated_ids_named
              FROM (SELECT w.workspace_id, count(*) AS rows
                      FROM {source} AS w
                     WHERE w.enabled
                       AND octet_length(w.workspace_id) <= %(max_workspace_id_bytes)s
                     GROUP BY w.workspace_id
                    HAVING count(*) > 1) AS n) AS g
    """
)

# One workspace and the state of its cache, for `refresh --workspace`; provider_config as
# in DUE_CACHES. Of duplicated rows, an enabled one first, then as ONE_ROW_ORDER.
ONE_WORKSPACE = sql.SQL(
    """
    SELECT w.workspace_id, w.provider,
           CASE WHEN chk.error IS NULL THEN w.provider_config END AS provider_config,
           chk.error AS provider_config_error,
           w.enabled, w.created_at,
           c.stale_at, c.refreshed_at, coalesce(c.consecutive_failures, 0) AS consecutive_failures,
           (c.workspace_id IS NOT NULL) AS has_cache
      FROM {source} AS w
      CROSS JOIN LATERAL ({config_check}) AS chk
      LEFT JOIN workspace_availability_cache AS c ON c.workspace_id = w.workspace_id
     WHERE w.workspace_id = %(workspace_id)s
     ORDER BY w.enabled DESC NULLS LAST, {one_row}
     LIMIT 1
    """
)

# --- writes ---------------------------------------------------------------------------------

# Both writes store nothing for a workspace the source no longer has (deleted mid-run: its
# row must not come back), nor for one whose id now belongs to a newer workspace (created
# after the one this call was for, %(workspace_created_at)s); a source row without a
# created_at is the same workspace. Filled into ``{still_in_source}`` by with_source.
STILL_IN_SOURCE = sql.SQL(
    """
    EXISTS (SELECT 1 FROM {source} AS s
             WHERE s.workspace_id = %(workspace_id)s
               AND (s.created_at IS NULL OR %(workspace_created_at)s::timestamptz IS NULL
                    OR s.created_at <= %(workspace_created_at)s::timestamptz))
    """
)

# A success replaces the slots, unless a newer success is already stored (a slow call
# must never overwrite fresher data written meanwhile by another run), or the row is a
# newer workspace's (same id, reused). A row of an older workspace with that id is
# replaced whole.
WRITE_SUCCESS = sql.SQL(
    """
    INSERT INTO workspace_availability_cache AS c
           (workspace_id, slots_utc, slot_count, range_start, range_end, fetched_at,
            refreshed_at, stale_at, last_error, last_error_at, consecutive_failures,
            workspace_created_at)
    SELECT %(workspace_id)s, %(slots)s, %(slot_count)s, %(range_start)s, %(range_end)s,
           %(fetched_at)s, %(refreshed_at)s, %(stale_at)s, NULL, NULL, 0,
           %(workspace_created_at)s::timestamptz
     WHERE {still_in_source}
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
           consecutive_failures = 0,
           workspace_created_at = coalesce(EXCLUDED.workspace_created_at,
                                           c.workspace_created_at)
     WHERE (c.refreshed_at IS NULL OR c.refreshed_at < EXCLUDED.refreshed_at
            OR c.workspace_created_at < EXCLUDED.workspace_created_at)
       AND NOT coalesce(c.workspace_created_at > EXCLUDED.workspace_created_at, false)
    """
)

# A failure records the attempt and pushes stale_at out; slots, range and refreshed_at
# stay as they were. Skipped when a success newer than this attempt's start is stored,
# and as in WRITE_SUCCESS. Over the row of an older workspace with that id, the first
# failure of the new one: the old slots go, and the count starts again.
WRITE_FAILURE = sql.SQL(
    """
    INSERT INTO workspace_availability_cache AS c
           (workspace_id, fetched_at, stale_at, last_error, last_error_at, consecutive_failures,
            workspace_created_at)
    SELECT %(workspace_id)s, %(fetched_at)s, %(stale_at)s, %(error)s, %(fetched_at)s, 1,
           %(workspace_created_at)s::timestamptz
     WHERE {still_in_source}
    ON CONFLICT (workspace_id) DO UPDATE
       SET fetched_at = CASE WHEN c.workspace_created_at < EXCLUDED.workspace_created_at
                             THEN EXCLUDED.fetched_at
                             ELSE greatest(c.fetched_at, EXCLUDED.fetched_at) END,
           last_error = EXCLUDED.last_error,
           last_error_at = EXCLUDED.last_error_at,
           consecutive_failures = CASE WHEN c.workspace_created_at < EXCLUDED.workspace_created_at
                                       THEN 1 ELSE c.consecutive_failures + 1 END,
           stale_at = EXCLUDED.stale_at,
           slots_utc = CASE WHEN c.workspace_created_at < EXCLUDED.workspace_created_at
                            THEN NULL ELSE c.slots_utc END,
           slot_count = CASE WHEN c.workspace_created_at < EXCLUDED.workspace_created_at
                             THEN NULL ELSE c.slot_count END,
           range_start = CASE WHEN c.workspace_created_at < EXCLUDED.workspace_created_at
                              THEN NULL ELSE c.range_start END,
           range_end = CASE WHEN c.workspace_created_at < EXCLUDED.workspace_created_at
                            THEN NULL ELSE c.range_end END,
           refreshed_at = CASE WHEN c.workspace_created_at < EXCLUDED.workspace_created_at
                               THEN NULL ELSE c.refreshed_at END,
           workspace_created_at = coalesce(EXCLUDED.workspace_created_at,
                                           c.workspace_created_at)
     WHERE (c.refreshed_at IS NULL OR c.refreshed_at < %(attempt_started_at)s
            OR c.workspace_created_at < EXCLUDED.workspace_created_at)
       AND NOT coalesce(c.workspace_created_at > EXCLUDED.workspace_created_at, false)
    """
)

# Cache rows of workspaces the source no longer has at all (a disabled workspace keeps
# its row), a bounded batch at a time. Nothing when the source is empty: a view that
# suddenly yields no row is more likely broken than every tenant gone.
PRUNE_ORPHAN_CACHES = sql.SQL(
    """
    DELETE FROM workspace_availability_cache
     WHERE workspace_id IN (SELECT c.workspace_id FROM workspace_availability_cache AS c
                             WHERE NOT EXISTS (SELECT 1 FROM {source} AS s
                                                WHERE s.workspace_id = c.workspace_id)
                             LIMIT %(batch)s)
       AND EXISTS (SELECT 1 FROM {source})
    """
)

# --- run history ----------------------------------------------------------------------------

# One row per run, appended after its summary is printed. Idempotent per run_id.
RECORD_RUN = sql.SQL(
    """
    INSERT INTO availability_cron_runs
           (run_id, host, pid, started_at, finished_at, outcome, duration_ms, within_budget,
            refreshed, summary)
    VALUES (%(run_id)s, %(host)s, %(pid)s, %(started_at)s, %(finished_at)s, %(outcome)s,
            %(duration_ms)s, %(within_budget)s, %(refreshed)s, %(summary)s)
    ON CONFLICT (run_id) DO NOTHING
    """
)

# Retention; served by the started_at index.
# In bounded batches, oldest first: a backlog (after lowering the retention) is worked off
# a batch per run instead of one statement that never fits its timeout.
PRUNE_RUNS = sql.SQL(
    """
    DELETE FROM availability_cron_runs
     WHERE run_id IN (SELECT run_id FROM availability_cron_runs
                       WHERE started_at < %(before)s
                       ORDER BY started_at
                       LIMIT %(batch)s)
    """
)

# --- metrics --------------------------------------------------------------------------------

# Staleness of enabled workspaces, measured from the last *successful* refresh. A source
# row without a workspace_id is no workspace (INVALID_SOURCE_ROWS counts it), and a
# duplicated one is one workspace, created when its latest row says (ONE_ROW_ORDER).
STALENESS = sql.SQL(
    """
    WITH w AS (SELECT workspace_id, max(created_at) AS created_at FROM {source}
                WHERE enabled AND workspace_id IS NOT NULL
                GROUP BY workspace_id),
         c AS (SELECT c.stale_at, c.refreshed_at, c.range_start, c.last_error
                 FROM workspace_availability_cache AS c
                 JOIN w ON w.workspace_id = c.workspace_id)
    SELECT (SELECT count(*) FROM w) AS workspaces,
           -- The longest any enabled workspace has existed without a first success.
           (SELECT min(w.created_at) FROM w
             WHERE NOT EXISTS (SELECT 1 FROM workspace_availability_cache AS x
                                WHERE x.workspace_id = w.workspace_id
                                  AND x.refreshed_at IS NOT NULL))
               AS oldest_never_succeeded_created_at,
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

# Health of the cron job from its run history (availability_cron_runs). Only the job's own
# runs count: a `refresh --workspace ID` run (its summary names a "workspace") takes no
# lock and says nothing about the job. A run skipped on the lock has "skipped": true in
# its summary, whether healthy ("locked", outcome skipped) or not ("lock-stuck", outcome
# failed). Every subquery walks the started_at index; none scans the whole table.
RUN_HISTORY = sql.SQL(
    """
    SELECT -- the latest finish among the latest runs (overlapping runs finish out of order)
           (SELECT max(finished_at) FROM (SELECT finished_at FROM availability_cron_runs
                                           WHERE summary ->> 'workspace' IS NULL
                                           ORDER BY started_at DESC LIMIT 50) AS latest)
               AS last_run_at,
           (SELECT finished_at FROM availability_cron_runs
             WHERE summary ->> 'workspace' IS NULL AND outcome = 'completed'
             ORDER BY started_at DESC LIMIT 1) AS last_completed_run_at,
           (SELECT finished_at FROM availability_cron_runs
             WHERE summary ->> 'workspace' IS NULL AND refreshed > 0
             ORDER BY started_at DESC LIMIT 1) AS last_refreshing_run_at,
           -- runs started after the newest run that was not skipped on the lock had
           -- *finished*: a run skipped while a healthy run was still going is no sign of
           -- trouble (several hosts, or a run a little over its minute)
           (SELECT count(*) FROM availability_cron_runs AS r
             WHERE r.summary ->> 'workspace' IS NULL
               AND r.started_at > coalesce(
                   (SELECT n.finished_at FROM availability_cron_runs AS n
                     WHERE n.summary ->> 'workspace' IS NULL
                       AND n.summary ->> 'skipped' IS DISTINCT FROM 'true'
                     ORDER BY n.started_at DESC LIMIT 1),
                   '-infinity')) AS lock_skip_streak,
           day.runs, day.runs_failed, day.runs_over_budget, day.duration_p50_ms,
           day.duration_p95_ms
      FROM (SELECT count(*) AS runs,
                   count(*) FILTER (WHERE outcome = 'failed') AS runs_failed,
                   count(*) FILTER (WHERE outcome = 'completed' AND NOT within_budget)
                       AS runs_over_budget,
                   percentile_cont(0.5) WITHIN GROUP (ORDER BY duration_ms)
                       FILTER (WHERE summary ->> 'skipped' IS DISTINCT FROM 'true')
                       AS duration_p50_ms,
                   percentile_cont(0.95) WITHIN GROUP (ORDER BY duration_ms)
                       FILTER (WHERE summary ->> 'skipped' IS DISTINCT FROM 'true')
                       AS duration_p95_ms
              FROM availability_cron_runs
             WHERE summary ->> 'workspace' IS NULL AND started_at > %(since)s) AS day
    """
)

# Per enabled workspace with a cache row: the `metrics --per-workspace` series. One row
# per workspace (thousands, each once however often the source repeats it): only ever
# run on request.
WORKSPACE_STALENESS = sql.SQL(
    """
    SELECT c.workspace_id,
           extract(epoch FROM %(now)s - c.refreshed_at)::float8 AS success_age_seconds,
           c.consecutive_failures
      FROM workspace_availability_cache AS c
     WHERE EXISTS (SELECT 1 FROM {source} AS w
                    WHERE w.workspace_id = c.workspace_id AND w.enabled)
     ORDER BY c.workspace_id
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

# --- show -----------------------------------------------------------------------------------

# One workspace, its source row and its cache row, with the first 5 slots only (a cache
# may hold thousands; `show` prints a glimpse, and the count); provider_config as in
# DUE_CACHES.
WORKSPACE_DETAILS = sql.SQL(
    """
    SELECT w.workspace_id, w.provider,
           CASE WHEN chk.error IS NULL THEN w.provider_config END AS provider_config,
           chk.error AS provider_config_error,
           w.enabled, w.created_at,
           (c.workspace_id IS NOT NULL) AS has_cache,
           coalesce(c.slot_count, jsonb_array_length(c.slots_utc)) AS slot_count,
           jsonb_path_query_array(c.slots_utc, '$[0 to 4]') AS first_slots,
           c.range_start, c.range_end, c.fetched_at, c.refreshed_at, c.stale_at,
           c.last_error, c.last_error_at, coalesce(c.consecutive_failures, 0)
               AS consecutive_failures
      FROM {source} AS w
      CROSS JOIN LATERAL ({config_check}) AS chk
      LEFT JOIN workspace_availability_cache AS c ON c.workspace_id = w.workspace_id
     WHERE w.workspace_id = %(workspace_id)s
     ORDER BY w.enabled DESC NULLS LAST, {one_row}
     LIMIT 1
    """
)

# --- app-side readers -----------------------------------------------------------------------

# The cache row of a workspace, unless it is an older workspace's with the same id (see
# migration 0003): the source has a row for that id created after it.
CACHE_ROW = sql.SQL(
    """
    SELECT c.workspace_id, c.slots_utc, c.range_start, c.range_end, c.fetched_at,
           c.refreshed_at, c.stale_at, c.last_error, c.last_error_at, c.consecutive_failures,
           c.workspace_created_at
      FROM workspace_availability_cache AS c
     WHERE c.workspace_id = %(workspace_id)s
       AND NOT EXISTS (SELECT 1 FROM {source} AS s
                        WHERE s.workspace_id = c.workspace_id
                          AND s.created_at > c.workspace_created_at)
    """
)


def with_source(query: sql.SQL, source_table: str) -> sql.Composed:
    """Fill ``{source}`` with the configured relation, quoted as an identifier, and
    ``{config_check}``, ``{one_row}`` and ``{still_in_source}`` (where used) with
    :data:`CONFIG_CHECK`, :data:`ONE_ROW_ORDER` and :data:`STILL_IN_SOURCE`."""
    source = sql.Identifier(*source_table.split("."))
    return query.format(source=source, config_check=CONFIG_CHECK, one_row=ONE_ROW_ORDER,
                        still_in_source=STILL_IN_SOURCE.format(source=source))
