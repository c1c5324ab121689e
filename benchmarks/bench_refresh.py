"""Benchmark the refresh job: print throughput and start-up figures (asserts nothing).

Usage::

    .venv/bin/python benchmarks/bench_refresh.py [--database-url URL]

Without --database-url an embedded PostgreSQL (the `embedded` extra, pgserver) is
started on a Unix socket; with it, a scratch database is created on that server and
dropped at the end. Either way the real code paths run: ``refresh.run_refresh`` in
process (lock, plan, thread-pool sweep, ``write_outcomes``) with the ``simulated``
provider found through its entry point, and the installed ``availability-cron``
command as a subprocess for the cold-start case. See benchmarks/README.md for what
each figure means.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from availability_cron import db, queries, refresh
from availability_cron.providers import FetchRequest, ProviderContext, ProviderRegistry
from availability_cron.providers.simulated import SimulatedProvider
from availability_cron.settings import Settings, load_settings

# pgserver asks platformdirs for XDG_RUNTIME_DIR, unset in most shells and under cron.
warnings.filterwarnings("ignore", category=UserWarning, module="platformdirs")

CLI = str(Path(sys.executable).parent / "availability-cron")

#: Case 1: provider latency and the worker counts swept; each run lasts ~SECONDS.
LATENCY_MS = 100
CONCURRENCY = (1, 5, 10, 20)
LATENCY_RUN_SECONDS = 3.0
#: Case 2: instant provider over this many stale workspaces, at these worker counts.
WORKSPACES = 2000
INSTANT_CONCURRENCY = (1, 5, 20)
INSTANT_REPEATS = 3
#: Case 2 baseline: rows per executemany transaction (100 = a good batch, 1 = one per row).
UPSERT_BATCHES = (100, 1)
#: Case 3: subprocess runs per command (after one unmeasured warm-up run).
COLD_RUNS = 10

TIME_BUDGET_MS = 600_000

# --- database setup -------------------------------------------------------------------------

# Benchmark fixtures, not product SQL: fixed statements, values through placeholders.
INSERT_WORKSPACE = (
    "INSERT INTO availability_workspaces (workspace_id, provider, provider_config, created_at)"
    " VALUES (%(workspace_id)s, 'simulated', %(config)s, %(created_at)s)"
)
INSERT_CACHE = (
    "INSERT INTO workspace_availability_cache (workspace_id, slots_utc, slot_count,"
    " range_start, range_end, fetched_at, refreshed_at, stale_at)"
    " VALUES (%(workspace_id)s, '[]', 0, %(at)s, %(at)s + interval '30 days', %(at)s, %(at)s,"
    " %(at)s + interval '1 minute')"
)
SET_CONFIG = "UPDATE availability_workspaces SET provider_config = %(config)s"
# Every cache due an hour ago, last success before that: the next run refreshes them all.
MAKE_ALL_STALE = (
    "UPDATE workspace_availability_cache"
    " SET stale_at = now() - interval '1 hour', refreshed_at = now() - interval '2 hours',"
    " fetched_at = now() - interval '2 hours', consecutive_failures = 0, last_error = NULL,"
    " last_error_at = NULL"
)
MAKE_ALL_FRESH = "UPDATE workspace_availability_cache SET stale_at = now() + interval '1 day'"
COUNT_REFRESHED_SINCE = (
    "SELECT count(*) FROM workspace_availability_cache WHERE refreshed_at >= %(since)s"
)


@contextmanager
def scratch_database(server_url: str) -> Iterator[str]:
    """A new database on ``server_url``'s server for this run; dropped on exit."""
    name = f"availability_cron_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield psycopg.conninfo.make_conninfo(server_url, dbname=name)
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@contextmanager
def server(database_url: str | None) -> Iterator[str]:
    if database_url:
        yield database_url
        return
    from availability_cron.demo import embedded_postgres

    with embedded_postgres() as url:
        yield url


def seed(conn: db.Connection, count: int) -> None:
    """``count`` simulated workspaces, each with a cache row (made stale or fresh later)."""
    now = datetime.now(UTC)
    config = Jsonb({"latency_ms": 0})
    ids = [f"ws-{i:05d}" for i in range(count)]
    with conn.transaction(), conn.cursor() as cur:
        cur.executemany(
            INSERT_WORKSPACE,
            [{"workspace_id": w, "config": config, "created_at": now - timedelta(days=30)}
             for w in ids],
        )
        cur.executemany(INSERT_CACHE, [{"workspace_id": w, "at": now} for w in ids])
    conn.execute("VACUUM ANALYZE")


def reset(conn: db.Connection, *, latency_ms: int | None = None, fresh: bool = False) -> None:
    if latency_ms is not None:
        conn.execute(SET_CONFIG, {"config": Jsonb({"latency_ms": latency_ms})})
    conn.execute(MAKE_ALL_FRESH if fresh else MAKE_ALL_STALE)
    # Each run rewrites thousands of rows; vacuum so every case starts from the same table.
    conn.execute("VACUUM ANALYZE workspace_availability_cache")


# --- in-process runs ------------------------------------------------------------------------


def settings_for(url: str, *, concurrency: int, limit: int) -> Settings:
    flags: dict[str, object | None] = {
        "database_url": url,
        "concurrency": concurrency,
        "limit": limit,
        "time_budget_ms": TIME_BUDGET_MS,
        "log_level": "WARNING",
    }
    return load_settings(flags, environ={}, dotenv={})


def make_runtime(url: str) -> refresh.Runtime:
    """The same collaborators the CLI builds (see cli._runtime), with a seeded rng."""
    run_id = uuid.uuid4().hex[:12]

    def connect(purpose: str) -> db.Connection:
        return db.connect(url, application_name=f"availability-cron {purpose} run={run_id} bench",
                          secrets=[], own_session=purpose in ("lock", "work"))

    return refresh.Runtime(
        run_id=run_id,
        started_monotonic=time.monotonic(),
        clock=lambda: datetime.now(UTC),
        monotonic=time.monotonic,
        rng=random.Random(1234),
        connect=connect,
        registry=ProviderRegistry(ProviderContext(environ={})),
        environ={},
    )


@dataclass(frozen=True)
class Timed:
    summary: refresh.RunSummary
    seconds: float

    @property
    def rate(self) -> float:
        return self.summary.refreshed / self.seconds


def timed_refresh(url: str, *, concurrency: int, limit: int, expect: int | None = None) -> Timed:
    settings = settings_for(url, concurrency=concurrency, limit=limit)
    rt = make_runtime(url)
    t0 = time.perf_counter()
    summary = refresh.run_refresh(settings, rt, default_source="availability_workspaces")
    seconds = time.perf_counter() - t0
    expected = limit if expect is None else expect
    if summary.refreshed != expected or summary.errors:
        print(f"  !! expected {expected} refreshes, got {summary.refreshed} "
              f"({summary.errors} errors)", file=sys.stderr)
    return Timed(summary, seconds)


# --- case 1: provider latency ---------------------------------------------------------------


def bench_latency(conn: db.Connection, url: str) -> list[tuple[str, ...]]:
    rows = []
    for concurrency in CONCURRENCY:
        ideal = concurrency * 1000 / LATENCY_MS
        count = round(ideal * LATENCY_RUN_SECONDS)
        reset(conn, latency_ms=LATENCY_MS)
        run = timed_refresh(url, concurrency=concurrency, limit=count)
        rows.append((str(concurrency), str(count), f"{run.seconds:.2f}", f"{run.rate:.1f}",
                     f"{ideal:.1f}", f"{run.rate / ideal:.2f}"))
    return rows


# --- case 2: instant provider vs one connection upserting ----------------------------------


def success_rows(count: int, settings: Settings) -> list[dict[str, Any]]:
    """The WRITE_SUCCESS parameters write_outcomes would build, slots from the simulated
    provider through the same normalisation, finished now."""
    now = datetime.now(UTC)
    start = now.replace(second=0, microsecond=0)
    end = start + timedelta(days=settings.lookahead_days)
    provider = SimulatedProvider(ProviderContext())
    request = FetchRequest("ws", {}, start, end, deadline=time.monotonic() + 60)
    slots = list(refresh.normalize_slots(provider.fetch(request), start, end))
    rng = random.Random(1234)
    ttl = timedelta(milliseconds=settings.cache_ttl_ms)
    return [
        {
            "workspace_id": f"ws-{i:05d}",
            "slots": Jsonb(slots),
            "slot_count": len(slots),
            "range_start": start,
            "range_end": end,
            "fetched_at": now,
            "refreshed_at": now,
            "stale_at": refresh.success_stale_at(now, ttl, rng),
            "workspace_created_at": None,
        }
        for i in range(count)
    ]


def upsert_rate(conn: db.Connection, rows: Sequence[dict[str, Any]], batch: int) -> float:
    """Rows per second for WRITE_SUCCESS via executemany, one transaction per batch."""
    stored = 0
    write = queries.with_source(queries.WRITE_SUCCESS, "availability_workspaces")
    t0 = time.perf_counter()
    with conn.cursor() as cur:
        for i in range(0, len(rows), batch):
            with conn.transaction():
                cur.executemany(write, rows[i:i + batch])
                stored += max(cur.rowcount, 0)
    seconds = time.perf_counter() - t0
    if stored != len(rows):
        print(f"  !! upsert stored {stored} of {len(rows)} rows", file=sys.stderr)
    return len(rows) / seconds


def call_rate(settings: Settings, count: int) -> float:
    """Calls per second of ``refresh.call_provider`` alone, on one thread, no database:
    the Python work each refresh costs (simulated slots, validation, normalisation)."""
    registry = ProviderRegistry(ProviderContext(environ={}))
    ctx = refresh.CallContext(
        registry=registry,
        lookahead=timedelta(days=settings.lookahead_days),
        deadline=time.monotonic() + 600,
        clock=lambda: datetime.now(UTC),
        monotonic=time.monotonic,
        environ={},
    )
    item = refresh.PlannedRefresh("ws-00000", "simulated", {"latency_ms": 0}, "stale",
                                  datetime.now(UTC))
    t0 = time.perf_counter()
    for _ in range(count):
        refresh.call_provider(item, ctx)
    seconds = time.perf_counter() - t0
    registry.close()
    return count / seconds


def bench_instant(conn: db.Connection, url: str) -> list[tuple[str, ...]]:
    settings = settings_for(url, concurrency=1, limit=WORKSPACES)
    upserts = {}
    for batch in UPSERT_BATCHES:
        reset(conn, latency_ms=0)
        upserts[batch] = upsert_rate(conn, success_rows(WORKSPACES, settings), batch)
    baseline = upserts[UPSERT_BATCHES[0]]
    rows = [
        (f"upsert, 1 connection, batch {batch}", f"{rate:.0f}", f"{rate / baseline:.2f}")
        for batch, rate in upserts.items()
    ]
    for concurrency in INSTANT_CONCURRENCY:
        rates = []
        for _ in range(INSTANT_REPEATS):
            reset(conn, latency_ms=0)
            rates.append(timed_refresh(url, concurrency=concurrency, limit=WORKSPACES).rate)
        rate = statistics.median(rates)
        rows.append((f"sweep, C={concurrency} (median of {INSTANT_REPEATS})", f"{rate:.0f}",
                     f"{rate / baseline:.2f}"))
    rate = call_rate(settings, WORKSPACES)
    rows.append(("call_provider alone, 1 thread, no DB", f"{rate:.0f}", f"{rate / baseline:.2f}"))
    return rows


# --- case 3: nothing due, cold start --------------------------------------------------------


def time_command(argv: Sequence[str], env: dict[str, str]) -> tuple[list[float], list[str]]:
    """Wall seconds of COLD_RUNS runs of ``argv`` (after one warm-up), and their stdouts."""
    seconds, outputs = [], []
    for i in range(COLD_RUNS + 1):
        t0 = time.perf_counter()
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL, check=False)
        elapsed = time.perf_counter() - t0
        if proc.returncode != 0:
            print(f"  !! {' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}",
                  file=sys.stderr)
        if i:
            seconds.append(elapsed)
            outputs.append(proc.stdout)
    return seconds, outputs


def bench_cold(conn: db.Connection, url: str) -> list[tuple[str, ...]]:
    reset(conn, fresh=True)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("AVAILABILITY_") and k != "DATABASE_URL"}
    env.update({"DATABASE_URL": url, "AVAILABILITY_CRON_LOG_LEVEL": "WARNING"})

    def row(label: str, seconds: list[float], extra: str = "") -> tuple[str, ...]:
        return (label, f"{statistics.median(seconds) * 1000:.0f}",
                f"{max(seconds) * 1000:.0f}", extra)

    in_process = []
    for _ in range(COLD_RUNS):
        in_process.append(timed_refresh(url, concurrency=5, limit=500, expect=0).seconds)

    refresh_s, outputs = time_command([CLI, "refresh"], env)
    summaries = [json.loads(out) for out in outputs]
    planned = {s["planned"] for s in summaries}
    own = statistics.median(s["durationMs"] for s in summaries)
    help_s, _ = time_command([CLI, "--help"], env)
    bare_s, _ = time_command([sys.executable, "-c", "pass"], env)
    imports_s, _ = time_command(
        [sys.executable, "-c", "import availability_cron.cli, availability_cron.refresh"], env
    )
    return [
        row("availability-cron refresh (nothing due)", refresh_s,
            f"planned {sorted(planned)}; its own durationMs median {own:.0f}"),
        row("run_refresh in process (nothing due)", in_process,
            "lock + 2 connections + plan, no start-up"),
        row("availability-cron --help", help_s),
        row("python -c pass", bare_s, "interpreter floor"),
        row("python -c 'import cli, refresh'", imports_s, "imports only"),
    ]


# --- output ---------------------------------------------------------------------------------


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print(f"\n{title}")
    print("  " + "  ".join(h.rjust(w) if i else h.ljust(w)
                          for i, (h, w) in enumerate(zip(header, widths, strict=True))))
    print("  " + "  ".join("-" * w for w in widths))
    for r in rows:
        print("  " + "  ".join(c.rjust(w) if i else c.ljust(w)
                              for i, (c, w) in enumerate(zip(r, widths, strict=True))))


def machine_facts(conn: db.Connection) -> None:
    row = conn.execute(
        "SELECT current_setting('server_version'), current_setting('fsync'),"
        " current_setting('synchronous_commit')"
    ).fetchone()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"date        {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    print(f"machine     {platform.machine()}, nproc {cpus}, {platform.system()} "
          f"{platform.release()}")
    print(f"python      {platform.python_version()} ({sys.executable})")
    print(f"psycopg     {psycopg.__version__} (libpq {psycopg.pq.version()}, "
          f"{psycopg.pq.__impl__})")
    version, fsync, sync_commit = row if row else ("?", "?", "?")
    print(f"postgresql  {version} on {conn.info.host} (fsync {fsync}, "
          f"synchronous_commit {sync_commit})")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--database-url",
        help="a server to use (a scratch database is created and dropped on it); "
        "default: an embedded PostgreSQL",
    )
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    with server(args.database_url) as server_url, scratch_database(server_url) as url, \
            psycopg.connect(url, autocommit=True) as conn:
        db.migrate(conn)
        seed(conn, WORKSPACES)
        machine_facts(conn)

        table(
            f"1. provider latency {LATENCY_MS} ms, C workers, ~{LATENCY_RUN_SECONDS:.0f} s "
            "of stale caches each (refreshes/s = refreshed / wall time of run_refresh)",
            ("C", "N", "seconds", "refreshes/s", "ideal C*1000/L", "ratio"),
            bench_latency(conn, url),
        )
        table(
            f"2. instant provider (latency 0), N={WORKSPACES} stale; ratio vs the "
            f"batch-{UPSERT_BATCHES[0]} upsert",
            ("what", "rows/s", "ratio"),
            bench_instant(conn, url),
        )
        table(
            f"3. nothing due, cold start: subprocess wall time over {COLD_RUNS} runs "
            "(after 1 warm-up)",
            ("command", "median ms", "max ms", "note"),
            bench_cold(conn, url),
        )
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
