"""`availability-cron demo`: the whole job on a throwaway database, for a newcomer.

It runs the real thing: the real migrations, real `availability-cron refresh`
processes (two at once, so the second skips on the lock), the real metrics query.
Only the calendar provider is simulated.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from . import db, queries
from .errors import ConfigError, DatabaseUnavailable
from .lock import DEFAULT_LOCK_KEY, find_holder


@contextmanager
def embedded_postgres(data_dir: Path | None = None, keep: bool = False) -> Iterator[str]:
    """Start a throwaway PostgreSQL from the `pgserver` package; yield its URL.

    The server listens on a Unix socket only. On exit it is stopped and, unless
    ``keep``, its data directory deleted.
    """
    try:
        import pgserver
    except ImportError:
        raise ConfigError(
            "the embedded PostgreSQL needs the 'embedded' extra: "
            "pip install 'availability-cron[embedded]' (or set DATABASE_URL to use a server)"
        ) from None
    directory = data_dir or Path(tempfile.mkdtemp(prefix="availability-cron-pg-"))
    server = pgserver.get_server(  # type: ignore[attr-defined]
        str(directory), cleanup_mode=None if keep else "delete"
    )
    try:
        yield str(server.get_uri())
    finally:
        server.cleanup()


@contextmanager
def scratch_database(server_url: str) -> Iterator[str]:
    """Create a uniquely named database on ``server_url``'s server; drop it on exit."""
    name = f"availability_cron_demo_{uuid.uuid4().hex[:8]}"
    try:
        admin = psycopg.connect(server_url, autocommit=True)
    except psycopg.OperationalError as exc:
        raise DatabaseUnavailable(f"cannot connect to DATABASE_URL: {exc}") from None
    with admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = psycopg.conninfo.make_conninfo(server_url, dbname=name)
    try:
        yield url
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def seed(conn: db.Connection, count: int, now: datetime) -> dict[str, int]:
    """Seed ``count`` simulated workspaces with varied latency, failures, staleness."""
    kinds = {"failing": 0, "missing": 0, "fresh": 0, "stale": 0}
    workspaces: list[dict[str, Any]] = []
    caches: list[dict[str, Any]] = []
    for i in range(count):
        workspace_id = f"ws-{i:04d}"
        config: dict[str, Any] = {"latency_ms": 20 + (i * 37) % 280}
        if i % 41 == 7:
            config["fail"] = "upstream answered 503"
            kinds["failing"] += 1
        workspaces.append({"workspace_id": workspace_id, "config": Jsonb(config),
                           "created_at": now - timedelta(days=30, minutes=i)})
        if i % 29 == 3:
            kinds["missing"] += 1
            continue
        # Ages spread from seconds to ~40 minutes; a third are still fresh.
        age = timedelta(seconds=(i * 97) % 2400)
        fresh = i % 3 == 0
        kinds["fresh" if fresh else "stale"] += 1
        refreshed = now - age
        caches.append({
            "workspace_id": workspace_id,
            "slots": Jsonb([]),
            "refreshed_at": refreshed,
            "stale_at": now + timedelta(seconds=30) if fresh else refreshed + timedelta(minutes=1),
        })
    with conn.transaction(), conn.cursor() as cur:
        cur.executemany(queries.DEMO_WORKSPACE, workspaces)
        cur.executemany(queries.DEMO_CACHE, caches)
    return kinds


def _command() -> list[str]:
    return [sys.executable, "-m", "availability_cron.cli"]


def run_demo(*, workspaces: int, keep: bool, environ: Mapping[str, str]) -> None:
    from rich.console import Console
    from rich.json import JSON

    console = Console()
    server_url = environ.get("DATABASE_URL")
    if server_url:
        console.print("[bold]DATABASE_URL is set:[/] using a scratch database on that server.")
        database = scratch_database(server_url)
    else:
        console.print("[bold]Starting an embedded PostgreSQL[/] (pgserver)...")
        database = _embedded_url(keep)
    with database as url:
        env = {k: v for k, v in environ.items() if not k.startswith("AVAILABILITY_")}
        env.update({
            "DATABASE_URL": url,
            "AVAILABILITY_CRON_TIME_BUDGET_MS": "15000",
            "AVAILABILITY_CRON_DEADLINE_MARGIN_MS": "2000",
            "AVAILABILITY_CRON_CONCURRENCY": "8",
            "AVAILABILITY_CRON_LOG_LEVEL": "WARNING",
        })
        subprocess.run([*_command(), "db", "migrate"], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        with psycopg.connect(url, autocommit=True) as conn:
            kinds = seed(conn, workspaces, datetime.now(UTC))
            console.print(
                f"Seeded {workspaces} simulated workspaces: {kinds['stale']} stale caches, "
                f"{kinds['fresh']} fresh, {kinds['missing']} with no cache yet, "
                f"{kinds['failing']} whose provider fails; latency 20-300 ms."
            )
            console.print("\n[bold]$ availability-cron refresh --dry-run --format table[/] "
                          "(first 10 of the queue)")
            dry = subprocess.run([*_command(), "refresh", "--dry-run"], env=env,
                                 capture_output=True, text=True, check=True)
            plan = json.loads(dry.stdout)
            for row in plan["queue"][:10]:
                console.print(f"  {row['position']:>3}  {row['workspaceId']}  {row['reason']:<8}"
                              f" overdue {row['overdueSeconds']:>8.1f}s")
            console.print(f"  ... {plan['planned']} planned in all")

            console.print("\n[bold]$ availability-cron refresh[/]  (run 1, in the background)")
            first = subprocess.Popen([*_command(), "refresh"], env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
            deadline = time.monotonic() + 10
            while find_holder(conn, DEFAULT_LOCK_KEY) is None and time.monotonic() < deadline:
                if first.poll() is not None:
                    break
                time.sleep(0.05)
            console.print("[bold]$ availability-cron refresh[/]  (run 2, while run 1 holds "
                          "the lock)")
            second = subprocess.run([*_command(), "refresh"], env=env, capture_output=True,
                                    text=True)
            console.print(JSON(second.stdout))
            console.print(f"run 2 exit code: {second.returncode}")
            out, err = first.communicate(timeout=60)
            console.print("\n[bold]run 1 summary[/]")
            console.print(JSON(out))
            warnings = [line for line in err.splitlines() if " WARNING " in line]
            if warnings:
                console.print(f"run 1 logged {len(warnings)} provider errors on stderr, e.g.:")
                console.print(f"  {warnings[0]}", markup=False, highlight=False)
            console.print(f"run 1 exit code: {first.returncode}")
        console.print("\n[bold]$ availability-cron metrics --format table[/]")
        subprocess.run([*_command(), "metrics", "--format", "table"], env=env, check=False)
    console.print("\nDone; the demo database is gone. Next: point DATABASE_URL at your own "
                  "database, run `availability-cron db migrate`, and install crontab.example.")


@contextmanager
def _embedded_url(keep: bool) -> Iterator[str]:
    with embedded_postgres(keep=keep) as url:
        yield url


__all__ = ["embedded_postgres", "run_demo", "scratch_database", "seed"]
