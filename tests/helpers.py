"""Test helpers: row factories, settings and runtime builders, and the installed command."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from availability_cron import db
from availability_cron.providers import Provider, ProviderContext, ProviderRegistry
from availability_cron.providers.scopes import Call, SecretScopes, calling
from availability_cron.refresh import Runtime
from availability_cron.settings import Settings, load_settings

CLI = str(Path(sys.executable).parent / "availability-cron")


# --- factories ------------------------------------------------------------------------------

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


def add_workspace(
    conn: psycopg.Connection[Any],
    workspace_id: str,
    *,
    provider: str = "simulated",
    config: Mapping[str, Any] | None = None,
    enabled: bool = True,
    created_at: datetime | None = None,
) -> None:
    conn.execute(
        "INSERT INTO availability_workspaces (workspace_id, provider, provider_config, enabled,"
        " created_at) VALUES (%s, %s, %s, %s, coalesce(%s, now()))",
        (workspace_id, provider, Jsonb(dict(config or {})), enabled, created_at),
    )


def add_cache(
    conn: psycopg.Connection[Any],
    workspace_id: str,
    *,
    stale_at: datetime,
    refreshed_at: datetime | None = None,
    fetched_at: datetime | None = None,
    slots: list[str] | None = None,
    consecutive_failures: int = 0,
    last_error: str | None = None,
) -> None:
    fetched = fetched_at or refreshed_at or stale_at - timedelta(minutes=1)
    conn.execute(
        "INSERT INTO workspace_availability_cache (workspace_id, slots_utc, slot_count,"
        " range_start, range_end, fetched_at, refreshed_at, stale_at, last_error, last_error_at,"
        " consecutive_failures) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (
            workspace_id,
            None if slots is None else Jsonb(slots),
            None if slots is None else len(slots),
            refreshed_at,
            None if refreshed_at is None else refreshed_at + timedelta(days=30),
            fetched,
            refreshed_at,
            stale_at,
            last_error,
            fetched if last_error else None,
            consecutive_failures,
        ),
    )


def cache_row(conn: psycopg.Connection[Any], workspace_id: str) -> dict[str, Any] | None:
    from psycopg.rows import dict_row

    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute("SELECT * FROM workspace_availability_cache WHERE workspace_id = %s",
                    (workspace_id,))
        return cur.fetchone()


def add_run(
    conn: psycopg.Connection[Any],
    *,
    started_at: datetime,
    outcome: str = "completed",
    duration_ms: int = 1000,
    within_budget: bool | None = None,
    refreshed: int = 0,
    reason: str | None = None,
    workspace: str | None = None,
) -> str:
    """A row of availability_cron_runs, its summary shaped like the one a run prints.

    ``outcome`` skipped means skipped on the lock ("locked"); a lock-stuck run is
    ``outcome="failed", reason="lock-stuck"``. Returns the run id.
    """
    run_id = uuid.uuid4().hex[:12]
    skipped = outcome == "skipped" or reason == "lock-stuck"
    within = (outcome != "failed") if within_budget is None else within_budget
    summary: dict[str, Any] = {
        "success": outcome != "failed", "skipped": skipped,
        "reason": reason or ("locked" if outcome == "skipped" else None), "runId": run_id,
        "durationMs": duration_ms, "refreshed": refreshed, "finishedWithinBudget": within,
    }
    if workspace is not None:
        summary["workspace"] = workspace
    conn.execute(
        "INSERT INTO availability_cron_runs (run_id, host, pid, started_at, finished_at,"
        " outcome, duration_ms, within_budget, refreshed, summary)"
        " VALUES (%s, 'test-host', 4242, %s, %s, %s, %s, %s, %s, %s)",
        (run_id, started_at, started_at + timedelta(milliseconds=duration_ms), outcome,
         duration_ms, within, refreshed, Jsonb(summary)),
    )
    return run_id


def run_rows(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    """Every row of availability_cron_runs, oldest start first."""
    from psycopg.rows import dict_row

    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute("SELECT * FROM availability_cron_runs ORDER BY started_at")
        return cur.fetchall()


@dataclass
class Peak:
    """The largest amount of memory Python allocated while a ``traced_peak()`` block ran."""

    bytes: int = 0


@contextmanager
def traced_peak() -> Iterator[Peak]:
    """tracemalloc's peak over the block (Python allocations; not a timing)."""
    import tracemalloc

    peak = Peak()
    tracemalloc.start()
    try:
        yield peak
        peak.bytes = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# --- in-process runs ------------------------------------------------------------------------


def make_settings(database_url: str | None = None, **overrides: object) -> Settings:
    """Settings from defaults plus ``overrides`` (field name -> value), as if given as flags."""
    flags: dict[str, object | None] = {"database_url": database_url, **overrides}
    return load_settings(flags, environ={}, dotenv={})


@dataclass
class FakeClock:
    """A wall clock that follows the real monotonic clock from a fixed start."""

    start: datetime
    offset: timedelta = timedelta(0)

    def __post_init__(self) -> None:
        self._t0 = time.monotonic()

    def __call__(self) -> datetime:
        return self.start + self.offset + timedelta(seconds=time.monotonic() - self._t0)


def scopes_for(url: str, *names: str) -> SecretScopes:
    """Operator rules letting every workspace use the variables ``names``, sent only to the
    origin of ``url`` (a loopback test server)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    origin = f"{parts.scheme}://{parts.netloc}"
    return SecretScopes.from_setting(json.dumps(
        {name: {"workspaces": "*", "hosts": [origin]} for name in names}))


def refreshing(workspace_id: str, context: ProviderContext) -> Any:
    """Mark provider calls made inside the block as the refresh of ``workspace_id``, as the
    sweep does (so ConfigReader can resolve token_env and the HTTP layer check where a
    scoped secret goes)."""
    return calling(Call(workspace_id, context.secret_scopes, context.destinations))


def make_runtime(
    database_url: str,
    *,
    clock: Callable[[], datetime] | None = None,
    providers: Mapping[str, type[Provider]] | None = None,
    environ: Mapping[str, str] | None = None,
    run_id: str | None = None,
    started_monotonic: float | None = None,
    secret_scopes: SecretScopes | None = None,
) -> Runtime:
    rid = run_id or uuid.uuid4().hex[:12]

    def connect(purpose: str) -> db.Connection:
        # One URL for the lock and the work, as in a run without a lock URL (cli._runtime).
        return db.connect(database_url, application_name=f"availability-cron {purpose} "
                          f"run={rid} test", secrets=[],
                          own_session=purpose in ("lock", "work"))

    env = dict(environ or {})
    return Runtime(
        run_id=rid,
        started_monotonic=time.monotonic() if started_monotonic is None else started_monotonic,
        clock=clock or (lambda: datetime.now(UTC)),
        monotonic=time.monotonic,
        rng=random.Random(1234),
        connect=connect,
        registry=ProviderRegistry(ProviderContext(
            environ=env, secret_scopes=secret_scopes or SecretScopes()), extra=providers),
        environ=env,
    )


# --- the installed command ------------------------------------------------------------------


@dataclass(frozen=True)
class CliResult:
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        lines = [line for line in self.stdout.splitlines() if line.strip()]
        assert len(lines) == 1, f"expected exactly one JSON line on stdout, got {self.stdout!r}"
        return json.loads(lines[0])


def clean_env(**extra: str) -> dict[str, str]:
    """The process environment without any availability-cron setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("AVAILABILITY_") and k != "DATABASE_URL"}
    env.update(extra)
    return env


def run_cli(
    *args: str,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    timeout: float = 60,
) -> CliResult:
    """Run the installed `availability-cron` exactly as cron would: a new process."""
    proc = subprocess.run(
        [CLI, *args], env=dict(env if env is not None else clean_env()), cwd=cwd,
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def wait_for_backend(conn: psycopg.Connection[Any], purpose: str, timeout: float = 10) -> int:
    """The backend pid of a run's connection for ``purpose`` ("lock", "work"), once it exists.

    Only in ``conn``'s database: other suites may be running on the same server.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = conn.execute(
            # This test's database only: other suites may run on the same server at once.
            "SELECT pid FROM pg_stat_activity WHERE application_name LIKE %s"
            " AND datname = current_database()",
            (f"availability-cron {purpose} run=%",),
        ).fetchone()
        if row:
            return int(row[0])
        time.sleep(0.05)
    raise AssertionError(f"the run never opened its {purpose} connection")


def wait_for_caches(conn: psycopg.Connection[Any], count: int, timeout: float = 10) -> None:
    """Return once at least ``count`` cache rows exist (the run is provably mid-way)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = conn.execute("SELECT count(*) FROM workspace_availability_cache").fetchone()
        if row and row[0] >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"fewer than {count} caches were written")

