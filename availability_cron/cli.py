"""The `availability-cron` command: parse options, build settings, call the core, map exit codes.

No business logic lives here. Heavy imports (psycopg, rich, the core modules) happen
inside the commands, so a run that has nothing to do starts fast: cron starts this
1,440 times a day.
"""

from __future__ import annotations

import time

_IMPORTED_MONOTONIC = time.monotonic()  # fallback for the process start time

import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import uuid  # noqa: E402
from enum import IntEnum, StrEnum  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING, Annotated, Any, NoReturn  # noqa: E402

import typer  # noqa: E402

from .errors import AvailabilityCronError, ConfigError  # noqa: E402
from .settings import SPEC_BY_FIELD, SPECS, Settings, load_settings, read_env_file, scrub  # noqa: E402

if TYPE_CHECKING:
    from .refresh import Runtime

log = logging.getLogger("availability_cron")


class ExitCode(IntEnum):
    """What the exit status tells cron and monitoring."""

    #: The run completed (per-workspace provider errors included) or was skipped
    #: because another run holds the lock. Nothing to do.
    OK = 0
    #: A real failure: database unreachable, schema missing, connection lost,
    #: unexpected error. Alert on this.
    FAILURE = 1
    #: A usage or configuration error: fix the command line or the settings.
    USAGE = 2


class OutputFormat(StrEnum):
    json = "json"
    table = "table"


EXIT_CODES_HELP = (
    "Exit codes: 0 done (or skipped: another run holds the lock); 1 real failure "
    "(database unreachable, schema missing, connection lost); 2 bad usage or configuration."
)

HELP = f"""Keep per-workspace calendar-availability caches in PostgreSQL fresh.

Run `availability-cron refresh` from cron every minute; see `availability-cron refresh --help`.
Settings come from flags, then the environment, then .env (or --env-file), then defaults.

{EXIT_CODES_HELP}
"""

app = typer.Typer(help=HELP, no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False, rich_markup_mode=None)
db_app = typer.Typer(help="Manage the database schema.", no_args_is_help=True)
app.add_typer(db_app, name="db")


def _env_help(field: str) -> str:
    spec = SPEC_BY_FIELD[field]
    default = f" Default: {spec.default}." if spec.default is not None else ""
    return f"{spec.help}{default} [env: {spec.env}]"


def _setting(field: str) -> Any:
    """The typer.Option of a setting: its flag, help and env var come from settings.SPECS."""
    spec = SPEC_BY_FIELD[field]
    return typer.Option(spec.flag, help=_env_help(field), show_default=False)


EnvFile = Annotated[
    Path | None,
    typer.Option("--env-file", help="Read settings from this file instead of ./.env.",
                 dir_okay=False),
]
DatabaseUrl = Annotated[str | None, _setting("database_url")]
LogLevel = Annotated[str | None, _setting("log_level")]
SourceTable = Annotated[str | None, _setting("source_table")]
Format = Annotated[OutputFormat, typer.Option("--format", help="json (one object on stdout) or "
                                              "table (for people).")]


def _process_start_monotonic() -> float:
    """time.monotonic() of the moment the process started (interpreter start-up included)."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        age = uptime - start_ticks / os.sysconf("SC_CLK_TCK")
        if 0 <= age < 30:
            return time.monotonic() - age
    except (OSError, ValueError, IndexError):
        pass
    return _IMPORTED_MONOTONIC


def _environment(env_file: Path | None) -> tuple[dict[str, str], dict[str, str]]:
    """(process environment, env file) and their merge as providers see it (environment wins).

    Providers read tokens named by ``token_env`` from the merge, so a token kept in the
    same env file as DATABASE_URL (as crontab.example suggests) is found too.
    """
    dotenv = read_env_file(env_file, Path.cwd())
    return dotenv, {**dotenv, **os.environ}


class _Scrub(logging.Filter):
    """Last line of defence: no secret reaches the log, whatever a library puts in a record."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.secrets = secrets

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            record.msg = scrub(record.getMessage(), self.secrets)
            record.args = None
        return True


def _configure_logging(level: str, run_id: str | None = None,
                       secrets: list[str] | None = None) -> None:
    """stderr log in UTC (the JSON is UTC too), one line per record, secrets scrubbed."""
    handler = logging.StreamHandler(sys.stderr)
    prefix = f"run={run_id} " if run_id else ""
    formatter = logging.Formatter(
        f"%(asctime)s.%(msecs)03dZ %(levelname)s {prefix}%(name)s: %(message)s",
        datefmt="%Y-%m-%dT%H:%M:%S",
    )
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    handler.addFilter(_Scrub(secrets or []))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # httpx logs every request URL at INFO; URLs may carry tokens in query strings.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)


def _print_json(obj: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":"), default=str) + "\n")
    sys.stdout.flush()


def _usage_error(message: str) -> NoReturn:
    sys.stderr.write(f"availability-cron: error: {message}\n")
    raise typer.Exit(ExitCode.USAGE)


def _failure(message: str) -> NoReturn:
    sys.stderr.write(f"availability-cron: failed: {message}\n")
    raise typer.Exit(ExitCode.FAILURE)


def _load(env_file: Path | None, **flags: object) -> Settings:
    return _load_with_environ(env_file, **flags)[0]


def _load_with_environ(env_file: Path | None, **flags: object) -> tuple[Settings, dict[str, str]]:
    """Settings by precedence, and the environment providers see; exit 2 on a bad value."""
    try:
        dotenv, merged = _environment(env_file)
        settings = load_settings(flags, os.environ, dotenv)
    except ConfigError as exc:
        _usage_error(exc.message)
    return settings, merged


def _runtime(settings: Settings, run_id: str, started: float,
             environ: dict[str, str]) -> Runtime:
    import random
    from datetime import UTC, datetime

    from . import db
    from .providers import ProviderContext, ProviderRegistry
    from .refresh import Runtime

    url = settings.require_database_url()
    host = socket.gethostname().split(".")[0]

    def connect(purpose: str) -> db.Connection:
        name = f"availability-cron {purpose} run={run_id} pid={os.getpid()} host={host}"
        return db.connect(url, application_name=name, secrets=settings.secrets())

    return Runtime(
        run_id=run_id,
        started_monotonic=started,
        clock=lambda: datetime.now(UTC),
        monotonic=time.monotonic,
        rng=random.Random(),
        connect=connect,
        registry=ProviderRegistry(ProviderContext(environ=environ)),
        environ=environ,
    )


def _check_database_url(settings: Settings) -> None:
    from . import db

    try:
        db.check_url(settings.require_database_url())
    except ConfigError as exc:
        _usage_error(scrub(exc.message, settings.secrets()))


_ENV_ONLY_HELP = " ".join(
    f"{s.env}: {s.help}" for s in SPECS if s.flag is None
)

REFRESH_HELP = f"""Refresh the due caches once: the job cron runs every minute.

Takes the advisory lock (another run holding it: prints skipped:true, exits 0), plans due
caches stalest first with a share reserved for workspaces that have no cache yet,
refreshes them on a thread pool within the time budget, writes each result, and prints
one JSON summary on stdout (logs go to stderr). Provider errors are counted and stored
per workspace; they do not fail the run.

Set only in the environment or env file: {_ENV_ONLY_HELP}

{EXIT_CODES_HELP}
"""


@app.command(help=REFRESH_HELP)
def refresh(
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Print the planned queue in order and whether a run holds the lock; "
        "takes no lock, calls no provider, writes nothing.")] = False,
    workspace: Annotated[str | None, typer.Option(
        "--workspace", metavar="ID", help="Refresh this one workspace now, whatever its "
        "staleness, through the same write path (no lock; exit 1 if it fails).",
        show_default=False)] = None,
    limit: Annotated[int | None, _setting("limit")] = None,
    concurrency: Annotated[int | None, _setting("concurrency")] = None,
    time_budget_ms: Annotated[int | None, _setting("time_budget_ms")] = None,
    deadline_margin_ms: Annotated[int | None, _setting("deadline_margin_ms")] = None,
    cache_ttl_ms: Annotated[int | None, _setting("cache_ttl_ms")] = None,
    lookahead_days: Annotated[int | None, _setting("lookahead_days")] = None,
    missing_reserve: Annotated[float | None, _setting("missing_reserve")] = None,
    max_backoff_ms: Annotated[int | None, _setting("max_backoff_ms")] = None,
    lock_name: Annotated[str | None, _setting("lock_name")] = None,
    output: Format = OutputFormat.json,
    env_file: EnvFile = None,
    database_url: DatabaseUrl = None,
    source_table: SourceTable = None,
    log_level: LogLevel = None,
) -> None:
    started = _process_start_monotonic()
    run_id = uuid.uuid4().hex[:12]
    if dry_run and workspace is not None:
        _usage_error("--dry-run and --workspace cannot be combined")
    settings, environ = _load_with_environ(
        env_file, limit=limit, concurrency=concurrency, time_budget_ms=time_budget_ms,
        deadline_margin_ms=deadline_margin_ms, cache_ttl_ms=cache_ttl_ms,
        lookahead_days=lookahead_days, missing_reserve=missing_reserve,
        max_backoff_ms=max_backoff_ms, lock_name=lock_name,
        database_url=database_url, source_table=source_table, log_level=log_level,
    )
    _check_database_url(settings)
    _configure_logging(settings.log_level, run_id, settings.secrets())

    from .refresh import RunSummary, refresh_workspace, run_refresh
    from .refresh import dry_run as plan_only
    from .settings import SPEC_BY_FIELD as specs

    default_source = str(specs["source_table"].default)
    rt = _runtime(settings, run_id, started, environ)
    code = ExitCode.OK
    try:
        if dry_run:
            report = plan_only(settings, rt, default_source=default_source)
            if output is OutputFormat.table:
                _print_dry_run_table(report.as_json())
            else:
                _print_json(report.as_json())
            return
        if workspace is not None:
            summary = refresh_workspace(settings, rt, workspace, default_source=default_source)
        else:
            summary = run_refresh(settings, rt, default_source=default_source)
        if not summary.success:
            code = ExitCode.FAILURE
            sys.stderr.write(f"availability-cron: failed: {summary.error}\n")
    except ConfigError as exc:
        _usage_error(scrub(exc.message, settings.secrets()))
    except Exception as exc:  # a real failure: say what (never a secret), still print JSON
        if isinstance(exc, AvailabilityCronError):
            message = exc.message
        else:
            log.debug("unexpected error", exc_info=True)
            message = f"unexpected error: {type(exc).__name__}: {exc}"
        message = scrub(message, settings.secrets())
        partial = getattr(exc, "summary", None)
        summary = partial if isinstance(partial, RunSummary) else RunSummary(
            success=False, skipped=False, reason="error", run_id=run_id,
            started_at=rt.started_at(), duration_ms=rt.elapsed_ms(),
            time_budget_ms=settings.time_budget_ms, concurrency=settings.concurrency,
            limit=settings.limit, error=message,
        )
        sys.stderr.write(f"availability-cron: failed: {message}\n")
        code = ExitCode.FAILURE
    if output is OutputFormat.table:
        _print_table("availability-cron refresh", summary.as_json())
    else:
        _print_json(summary.as_json())
    log.info("run finished: %s", "ok" if code == ExitCode.OK else "failed")
    _exit(code)


def _exit(code: ExitCode) -> NoReturn:
    """Exit now, even if an abandoned provider call still runs in a worker thread.

    Python joins ThreadPoolExecutor threads at exit; a hung provider call would then
    keep the process alive past its budget. The lock is already released and the
    summary printed, so flush and leave without joining them.
    """
    if any(t.name.startswith("refresh") and t.is_alive() for t in threading.enumerate()):
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(int(code))
    raise typer.Exit(int(code))


def _print_table(title: str, data: dict[str, object]) -> None:
    """A two-column table for people: the same keys and numbers as the JSON."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=True)
    table.add_column("key")
    table.add_column("value", justify="right")
    for key, value in data.items():
        text = "-" if value is None else (
            json.dumps(value) if isinstance(value, dict) else str(value))
        table.add_row(key, text)
    Console().print(table)


def _print_dry_run_table(data: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    holder = data["holder"]
    held = f"yes, by pid {holder['pid']} ({holder['applicationName']})" if holder else "no"
    console.print(
        f"dry run at {data['at']}: {data['planned']} planned "
        f"({data['missingPlanned']} missing, {data['stalePlanned']} stale; limit {data['limit']}); "
        f"lock held now: {held}"
    )
    table = Table(show_header=True)
    for column in ("#", "workspace", "provider", "reason", "overdue (s)", "failures"):
        table.add_column(column)
    for row in data["queue"]:
        table.add_row(str(row["position"]), row["workspaceId"], row["provider"], row["reason"],
                      str(row["overdueSeconds"]), str(row["consecutiveFailures"]))
    console.print(table)


METRICS_HELP = f"""Print the staleness report: ages measured from the last successful refresh.

Keys: at, workspaces (enabled), caches, missingCaches, staleDue, erroringCaches,
neverSucceeded, oldestSuccessAgeMinutes, oldestRangeStartAgeMinutes, successAgeP50Minutes,
successAgeP95Minutes. Definitions: docs/architecture.md.

{EXIT_CODES_HELP}
"""


@app.command(help=METRICS_HELP)
def metrics(
    output: Format = OutputFormat.json,
    env_file: EnvFile = None,
    database_url: DatabaseUrl = None,
    source_table: SourceTable = None,
    log_level: LogLevel = None,
) -> None:
    settings = _load(env_file, database_url=database_url, source_table=source_table,
                     log_level=log_level)
    _check_database_url(settings)
    _configure_logging(settings.log_level, secrets=settings.secrets())
    from datetime import UTC, datetime

    from . import db
    from .metrics import staleness

    default_source = str(SPEC_BY_FIELD["source_table"].default)
    try:
        with db.translate_errors(settings.secrets()), db.connect(
            settings.require_database_url(), application_name="availability-cron metrics",
            secrets=settings.secrets(),
        ) as conn:
            db.ensure_schema(conn, settings.source_table, default_source)
            report = staleness(conn, settings.source_table, datetime.now(UTC))
    except ConfigError as exc:
        _usage_error(scrub(exc.message, settings.secrets()))
    except AvailabilityCronError as exc:
        _failure(scrub(exc.message, settings.secrets()))
    if output is OutputFormat.table:
        _print_table(f"availability caches at {report.as_json()['at']}",
                     {k: v for k, v in report.as_json().items() if k != "at"})
    else:
        _print_json(report.as_json())


MIGRATE_HELP = f"""Create or upgrade the schema. Idempotent; safe when two run at once.

Prints {{"success": true, "applied": [...], "schemaVersion": N}}.

{EXIT_CODES_HELP}
"""


@db_app.command("migrate", help=MIGRATE_HELP)
def db_migrate(
    env_file: EnvFile = None,
    database_url: DatabaseUrl = None,
    log_level: LogLevel = None,
) -> None:
    settings = _load(env_file, database_url=database_url, log_level=log_level)
    _check_database_url(settings)
    _configure_logging(settings.log_level, secrets=settings.secrets())
    from . import db

    try:
        with db.translate_errors(settings.secrets()), db.connect(
            settings.require_database_url(), application_name="availability-cron migrate",
            secrets=settings.secrets(),
        ) as conn:
            applied = db.migrate(conn)
            version = db.latest_migration()
    except ConfigError as exc:
        _usage_error(scrub(exc.message, settings.secrets()))
    except AvailabilityCronError as exc:
        _failure(scrub(exc.message, settings.secrets()))
    _print_json({
        "success": True,
        "applied": [f"{m.version:04d}_{m.name}" for m in applied],
        "schemaVersion": version,
    })


@app.command()
def demo(
    workspaces: Annotated[int, typer.Option(
        "--workspaces", min=10, max=5000, help="How many simulated workspaces to seed.")] = 300,
    keep: Annotated[bool, typer.Option(
        "--keep", help="Keep the embedded server's data directory and print where it is.")] = False,
) -> None:
    """Show the job end to end on a throwaway database.

    Starts an embedded PostgreSQL (the `embedded` extra: pip install
    'availability-cron[embedded]'), or, when DATABASE_URL is set, creates and later
    drops a scratch database on that server. Then migrates, seeds simulated
    workspaces (varied latency, a few failing, a few with no cache yet), runs a real
    refresh while a second one skips on the lock, prints both summaries and the
    metrics, and cleans up.
    """
    _configure_logging("WARNING")
    from .demo import run_demo

    try:
        run_demo(workspaces=workspaces, keep=keep, environ=os.environ)
    except ConfigError as exc:
        _usage_error(exc.message)
    except AvailabilityCronError as exc:
        _failure(exc.message)


def main() -> None:
    """Console-script entry point."""
    app(prog_name="availability-cron")


if __name__ == "__main__":
    main()
