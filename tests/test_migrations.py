"""`availability-cron db migrate` on real databases, and the data contract it creates."""

from __future__ import annotations

import json
import subprocess
import time
from typing import Any

import psycopg
import pytest
from helpers import CLI, add_workspace, cache_row, clean_env, run_cli
from psycopg import sql

from availability_cron import db

#: Every shipped migration, in order, as `db migrate` reports them.
ALL_MIGRATIONS = [f"{m.version:04d}_{m.name}" for m in db.available_migrations()]
LATEST = db.latest_migration()

#: The public data contract: column -> (type, NOT NULL, default expression or None).
CACHE_CONTRACT = {
    "workspace_id": ("text", True, None),
    "slots_utc": ("jsonb", False, None),
    "range_start": ("timestamp with time zone", False, None),
    "range_end": ("timestamp with time zone", False, None),
    "fetched_at": ("timestamp with time zone", True, None),
    "refreshed_at": ("timestamp with time zone", False, None),
    "stale_at": ("timestamp with time zone", True, None),
    "last_error": ("text", False, None),
    "last_error_at": ("timestamp with time zone", False, None),
    "consecutive_failures": ("integer", True, "0"),
}
WORKSPACES_CONTRACT = {
    "workspace_id": ("text", True, None),
    "provider": ("text", True, None),
    "provider_config": ("jsonb", True, "'{}'::jsonb"),
    "enabled": ("boolean", True, "true"),
    "created_at": ("timestamp with time zone", True, "now()"),
}

COLUMNS = """
    SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
           pg_get_expr(d.adbin, d.adrelid)
      FROM pg_attribute AS a
      LEFT JOIN pg_attrdef AS d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
     WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped
"""

PRIMARY_KEY = """
    SELECT array_agg(a.attname ORDER BY a.attnum)
      FROM pg_index AS i
      JOIN pg_attribute AS a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
     WHERE i.indrelid = to_regclass(%s) AND i.indisprimary
"""


def columns(conn: psycopg.Connection[Any], table: str) -> dict[str, tuple[str, bool, str | None]]:
    return {name: (type_, notnull, default)
            for name, type_, notnull, default in conn.execute(COLUMNS, (table,)).fetchall()}


def public_tables(conn: psycopg.Connection[Any]) -> set[str]:
    rows = conn.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
    ).fetchall()
    return {row[0] for row in rows}


def migrate_cli(url: str) -> tuple[int, dict[str, Any], str]:
    result = run_cli("db", "migrate", env=clean_env(DATABASE_URL=url))
    return result.returncode, result.json(), result.stderr


def split_key(key: int) -> tuple[int, int]:
    """pg_locks shows a bigint advisory key as classid (high 32 bits) and objid (low 32 bits)."""
    unsigned = key & 0xFFFF_FFFF_FFFF_FFFF
    return unsigned >> 32, unsigned & 0xFFFF_FFFF


def waiting_for_advisory_lock(conn: psycopg.Connection[Any], key: int) -> int:
    classid, objid = split_key(key)
    row = conn.execute(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        " AND classid = %s::bigint::oid AND objid = %s::bigint::oid"
        " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        (classid, objid),
    ).fetchone()
    return int(row[0]) if row else 0


@pytest.mark.e2e
def test_migrate_on_an_empty_database_creates_the_schema_and_records_every_version(
    empty_database_url,
):
    code, out, err = migrate_cli(empty_database_url)

    assert code == 0, err
    assert out == {"success": True, "applied": ALL_MIGRATIONS, "schemaVersion": LATEST}
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        assert {"availability_workspaces", "workspace_availability_cache",
                "availability_cron_migrations"} <= public_tables(conn)
        indexdefs = [row[0] for row in conn.execute(
            "SELECT indexdef FROM pg_indexes WHERE schemaname = 'public'"
            " AND tablename = 'workspace_availability_cache'").fetchall()]
        assert any("(stale_at" in d for d in indexdefs), indexdefs
        ledger = conn.execute(
            "SELECT version, name FROM availability_cron_migrations").fetchall()
        assert ledger == [(m.version, m.name) for m in db.available_migrations()]


@pytest.mark.e2e
def test_migrate_twice_applies_nothing_the_second_time(empty_database_url):
    first_code, first, first_err = migrate_cli(empty_database_url)
    second_code, second, second_err = migrate_cli(empty_database_url)

    assert first_code == 0, first_err
    assert second_code == 0, second_err
    assert first["applied"] == ALL_MIGRATIONS
    assert second == {"success": True, "applied": [], "schemaVersion": LATEST}
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        rows = conn.execute("SELECT count(*) FROM availability_cron_migrations").fetchone()
        assert rows == (len(ALL_MIGRATIONS),)


@pytest.mark.e2e
def test_two_migrate_processes_at_once_both_succeed_and_apply_the_schema_once(
    empty_database_url,
):
    env = clean_env(DATABASE_URL=empty_database_url)
    with psycopg.connect(empty_database_url, autocommit=True) as gate:
        # Hold the migration lock so both processes are provably inside `migrate`, queued
        # on the same lock, before either may start.
        gate.execute("SELECT pg_advisory_lock(%s)", (db.MIGRATION_LOCK_KEY,))
        procs = [
            subprocess.Popen([CLI, "db", "migrate"], env=env, stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)
        ]
        try:
            deadline = time.monotonic() + 20
            while waiting_for_advisory_lock(gate, db.MIGRATION_LOCK_KEY) < 2:
                assert all(p.poll() is None for p in procs), "a migrate exited before queuing"
                assert time.monotonic() < deadline, "both migrations never queued on the lock"
                time.sleep(0.05)
            gate.execute("SELECT pg_advisory_unlock(%s)", (db.MIGRATION_LOCK_KEY,))
            outputs = [p.communicate(timeout=30) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait(timeout=10)

        assert [p.returncode for p in procs] == [0, 0], [err for _, err in outputs]
        applied = sorted(json.loads(out)["applied"] for out, _ in outputs)
        assert applied == [[], ALL_MIGRATIONS]
        ledger = gate.execute(
            "SELECT version FROM availability_cron_migrations ORDER BY version").fetchall()
        assert ledger == [(m.version,) for m in db.available_migrations()]


@pytest.mark.e2e
def test_a_freshly_migrated_database_is_ready_for_refresh(empty_database_url):
    code, _, err = migrate_cli(empty_database_url)
    assert code == 0, err
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        add_workspace(conn, "ws-1")

        result = run_cli("refresh", env=clean_env(DATABASE_URL=empty_database_url))

        assert result.returncode == 0, result.stderr
        assert result.json()["refreshed"] == 1
        row = cache_row(conn, "ws-1")
        assert row is not None and row["refreshed_at"] is not None


@pytest.mark.parametrize(("table", "contract"), [
    ("workspace_availability_cache", CACHE_CONTRACT),
    ("availability_workspaces", WORKSPACES_CONTRACT),
])
def test_columns_match_the_data_contract(conn, table, contract):
    actual = columns(conn, table)

    assert {name: actual.get(name) for name in contract} == contract
    # Extra columns are allowed only if a writer that knows just the contract can insert.
    extra = {name: spec for name, spec in actual.items() if name not in contract}
    assert all(not notnull or default is not None for _, notnull, default in extra.values()), extra
    assert conn.execute(PRIMARY_KEY, (table,)).fetchone() == (["workspace_id"],)


def test_the_stale_at_index_leads_with_stale_at(conn):
    rows = conn.execute(
        "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = %s",
        ("workspace_availability_cache",),
    ).fetchall()

    leading = [name for name, definition in rows if "btree (stale_at" in definition]
    assert leading == ["workspace_availability_cache_stale_at_idx"], rows


# --- the search_path (issue 8) -------------------------------------------------------------


def tables_in(conn: psycopg.Connection[Any], schema: str) -> set[str]:
    rows = conn.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = %s", (schema,)
    ).fetchall()
    return {row[0] for row in rows}


def set_search_path(conn: psycopg.Connection[Any], path: str) -> None:
    """A database whose sessions start with ``path`` (as ALTER ROLE ... SET would do)."""
    conn.execute(sql.SQL("ALTER DATABASE {} SET search_path = {}").format(
        sql.Identifier(conn.info.dbname), sql.SQL(path)))


@pytest.mark.e2e
def test_migrate_refuses_to_build_a_second_schema_before_the_ledger_on_the_search_path(
    database_url, conn
):
    conn.execute("CREATE SCHEMA other")
    set_search_path(conn, "other, public")

    result = run_cli("db", "migrate", env=clean_env(DATABASE_URL=database_url))

    assert result.returncode == 2, result
    assert '"public"' in result.stderr and '"other"' in result.stderr
    assert "search_path" in result.stderr
    assert tables_in(conn, "other") == set()


@pytest.mark.e2e
def test_migrate_into_a_dedicated_schema_first_on_the_search_path_still_works(
    empty_database_url,
):
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA availability")
        set_search_path(conn, "availability, public")
    code, out, err = migrate_cli(empty_database_url)
    again, _, again_err = migrate_cli(empty_database_url)
    assert (code, again) == (0, 0), (err, again_err)
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        assert "availability_cron_migrations" in tables_in(conn, "availability")
        assert tables_in(conn, "public") == set()


def test_a_run_warns_when_a_table_of_the_job_exists_twice_on_the_search_path(
    database_url, conn, caplog
):
    # The state the old `db migrate` left: a second, empty copy in another schema first on
    # the path, where the job writes while the app reads public's.
    conn.execute("CREATE SCHEMA other")
    with psycopg.connect(database_url, autocommit=True) as forked:
        forked.execute("SET search_path = other")
        db.migrate(forked)
    set_search_path(conn, "other, public")
    caplog.set_level("WARNING", logger="availability_cron.db")
    with db.connect(database_url, application_name="t", secrets=[]) as fresh:
        db.ensure_schema(fresh, "availability_workspaces", "availability_workspaces")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any('"other"."workspace_availability_cache"' in w and '"public"' in w
               for w in warnings), warnings
