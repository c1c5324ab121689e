"""The `availability-cron` command: parse options, build settings, call the core, map exit codes.

No business logic lives here. Heavy imports (psycopg, rich, the core modules) happen
inside the commands, so a run that has nothing to do starts fast: cron starts this
1,440 times a day.
"""

from __future__ import annotations

import time

_IMPORTED_MONOTONIC = time.monotonic()  # fallback for the process start time

import functools  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import typing  # noqa: E402
import uuid  # noqa: E402
import warnings  # noqa: E402
from contextlib import contextmanager, nullcontext  # noqa: E402
from enum import IntEnum, StrEnum  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TextIO  # noqa: E402

import typer  # noqa: E402

from .errors import AvailabilityCronError, ConfigError  # noqa: E402
from .ping import TIMEOUT_SECONDS as PING_TIMEOUT_SECONDS  # noqa: E402  (stdlib-only module)
from .redact import scrub  # noqa: E402  (stdlib-only module)
from .settings import (  # noqa: E402
    SPEC_BY_FIELD,
    SPECS,
    Settings,
    load_settings,
    parse_decimal,
    parse_integer,
    read_env_file,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from contextlib import AbstractContextManager

    from .deadline import StopRequest
    from .metrics import StalenessReport, WorkspaceStaleness
    from .ping import Pinger
    from .refresh import RunSummary, Runtime, SweepProgress

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
    auto = "auto"
    json = "json"
    table = "table"


def _resolve_format(output: OutputFormat) -> OutputFormat:
    """auto: a table for a person (stdout is a terminal), JSON for cron, pipes and files."""
    if output is OutputFormat.auto:
        return OutputFormat.table if sys.stdout.isatty() else OutputFormat.json
    return output


EXIT_CODES_HELP = (
    "Exit codes: 0 done (or skipped: a healthy run holds the lock); 1 real failure "
    "(database unreachable, schema missing, connection lost, lock stuck); 2 bad usage or "
    "configuration."
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


def _print_version(value: bool) -> None:
    if value:
        from . import __version__

        sys.stdout.write(f"availability-cron {__version__}\n")
        raise typer.Exit(ExitCode.OK)


@app.callback()
def _root(
    version: Annotated[bool, typer.Option(
        "--version", callback=_print_version, is_eager=True,
        help="Print the version and exit.")] = False,
) -> None:
    pass


def _env_help(field: str) -> str:
    spec = SPEC_BY_FIELD[field]
    default = f" Default: {spec.default}." if spec.default is not None else ""
    return f"{spec.help}{default} [env: {spec.env}]"


def _ascii_number(parse: Callable[[str], Any], name: str) -> Callable[[str], Any]:
    """A flag's parser for a number in ASCII digits (settings.parse_integer/parse_decimal):
    Click's int and float take ５ and ٣ as digits, as Python does."""

    def convert(raw: Any) -> Any:
        if not isinstance(raw, str):  # a default, already a number
            return raw
        try:
            return parse(raw)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None

    convert.__name__ = name  # Typer names the metavar after it: <int>, <float>
    return convert


@functools.cache
def _setting_types() -> dict[str, Any]:
    """Settings' field types (int, float, str | None, ...), resolved once."""
    return typing.get_type_hints(Settings)


def _setting(field: str) -> Any:
    """The typer.Option of a setting: its flag, help and env var come from settings.SPECS."""
    spec = SPEC_BY_FIELD[field]
    kind = _setting_types()[field]
    parser = (_ascii_number(parse_integer, "int") if kind is int
              else _ascii_number(parse_decimal, "float") if kind is float else None)
    return typer.Option(spec.flag, help=_env_help(field), show_default=False, parser=parser)


EnvFile = Annotated[
    Path | None,
    typer.Option("--env-file", help="Read settings from this file instead of ./.env.",
                 dir_okay=False),
]
DatabaseUrl = Annotated[str | None, _setting("database_url")]
LogLevel = Annotated[str | None, _setting("log_level")]
SourceTable = Annotated[str | None, _setting("source_table")]
Format = Annotated[OutputFormat, typer.Option(
    "--format", help="auto (the default): a table when stdout is a terminal, else JSON, so "
    "cron, pipes and files always get JSON; json: always one JSON object on stdout; table: "
    "always a table. Colour follows NO_COLOR.")]


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
    # A library's warning is a log line like any other (formatted, scrubbed, one line),
    # not Python's "file:line: Category: message" and source line on bare stderr.
    warnings.showwarning = _log_warning


def _log_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 file: TextIO | None = None, line: str | None = None) -> None:
    logging.getLogger("py.warnings").warning(
        "%s: %s", category.__name__, " ".join(str(message).split()))


def _json(obj: dict[str, object]) -> str:
    return json.dumps(obj, separators=(",", ":"), default=str)


def _print_json(obj: dict[str, object]) -> None:
    sys.stdout.write(_json(obj) + "\n")
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
    from .providers.scopes import SecretScopes
    from .refresh import Runtime

    url = settings.require_database_url()
    host = socket.gethostname().split(".")[0]

    def connect(purpose: str) -> db.Connection:
        name = f"availability-cron {purpose} run={run_id} pid={os.getpid()} host={host}"
        if purpose == "lock" and settings.lock_database_url:
            # The lock needs a real session: a direct URL or a session-mode pooler, when
            # DATABASE_URL goes through a transaction-mode pooler (docs/operations.md).
            return db.connect(settings.lock_database_url, application_name=name,
                              secrets=settings.secrets(),
                              name="AVAILABILITY_CRON_LOCK_DATABASE_URL", own_session=True)
        # The lock's session is its own. So is the work connection's when it shares the
        # lock's URL (a run refuses a transaction pooler there); with a lock URL of its own,
        # DATABASE_URL may be one, and nothing may be SET on its sessions.
        own = purpose == "lock" or (purpose == "work" and not settings.lock_database_url)
        return db.connect(url, application_name=name, secrets=settings.secrets(),
                          own_session=own)

    return Runtime(
        run_id=run_id,
        started_monotonic=started,
        clock=lambda: datetime.now(UTC),
        monotonic=time.monotonic,
        rng=random.Random(),
        connect=connect,
        registry=ProviderRegistry(ProviderContext(
            environ=environ, secret_scopes=SecretScopes.from_setting(settings.secret_scopes))),
        environ=environ,
    )


_DEFAULT_SOURCE = str(SPEC_BY_FIELD["source_table"].default)


@contextmanager
def _database(
    settings: Settings,
    purpose: str,
    *,
    schema: bool = True,
    lock_url: bool = False,
    on_failure: Callable[[AvailabilityCronError, str], None] | None = None,
) -> Iterator[Any]:
    """One command's connection; every failure inside becomes its exit code and message.

    A ConfigError is exit 2, any other AvailabilityCronError exit 1 (``on_failure`` may
    exit differently first, as the Nagios check does). With ``schema``, the schema is
    checked first; with ``lock_url``, the connection goes where the refresh lock lives.
    """
    from . import db

    secrets = settings.secrets()
    try:
        with db.translate_errors(secrets):
            if lock_url:
                conn = _lock_connection(settings, purpose)
            else:
                conn = db.connect(settings.require_database_url(),
                                  application_name=f"availability-cron {purpose}",
                                  secrets=secrets)
            with conn:
                if schema:
                    db.ensure_schema(conn, settings.source_table, _DEFAULT_SOURCE)
                yield conn
    except AvailabilityCronError as exc:
        message = scrub(exc.message, secrets)
        if on_failure is not None:
            on_failure(exc, message)
        if isinstance(exc, ConfigError):
            _usage_error(message)
        _failure(message)


def _check_database_url(settings: Settings) -> None:
    from . import db

    try:
        db.check_url(settings.require_database_url())
        if settings.lock_database_url:
            db.check_url(settings.lock_database_url, name="AVAILABILITY_CRON_LOCK_DATABASE_URL")
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
per workspace; they do not fail the run. At a terminal, the summary is a table (see
--format) and a progress bar shows on stderr; under cron, neither.

With AVAILABILITY_CRON_PING_URL set, the run pings that dead-man's switch (Healthchecks
protocol) at its start and its end: success for exit 0 (skipped included), /fail
otherwise; --dry-run and --workspace runs do not ping. The pings delay the end of a run by
at most {PING_TIMEOUT_SECONDS:.0f} s and never change the exit code.

SIGTERM or SIGINT (systemctl stop, a Kubernetes deadline, Ctrl-C) stops a cron run: no
more calls start, what finished is written, the summary says reason "terminated", the
run is recorded and /fail pinged, exit 1; a second signal ends the process at once.

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
    lock_database_url: Annotated[str | None, _setting("lock_database_url")] = None,
    output: Format = OutputFormat.auto,
    env_file: EnvFile = None,
    database_url: DatabaseUrl = None,
    source_table: SourceTable = None,
    log_level: LogLevel = None,
) -> None:
    started = _process_start_monotonic()
    # A UUIDv7: runId is its first 12 hex digits, the run's start in Unix ms (lock.run_uuid);
    # the whole UUID is also the dead-man's-switch rid.
    run_uuid = _new_run_uuid()
    run_id = run_uuid.hex[:12]
    if dry_run and workspace is not None:
        _usage_error("--dry-run and --workspace cannot be combined")
    settings, environ = _load_with_environ(
        env_file, limit=limit, concurrency=concurrency, time_budget_ms=time_budget_ms,
        deadline_margin_ms=deadline_margin_ms, cache_ttl_ms=cache_ttl_ms,
        lookahead_days=lookahead_days, missing_reserve=missing_reserve,
        max_backoff_ms=max_backoff_ms, lock_name=lock_name, lock_database_url=lock_database_url,
        database_url=database_url, source_table=source_table, log_level=log_level,
    )
    _check_database_url(settings)
    _configure_logging(settings.log_level, run_id, settings.secrets())
    output = _resolve_format(output)

    from .refresh import RunSummary, refresh_workspace, run_refresh
    from .refresh import dry_run as plan_only
    from .settings import SPEC_BY_FIELD as specs

    default_source = str(specs["source_table"].default)
    # The cron run (systemd, Kubernetes) reports even when stopped by a signal.
    stop = None if dry_run or workspace is not None else _stop_on_signals()
    rt = _runtime(settings, run_id, started, environ)
    # The dead-man's switch watches the cron run only: a dry run does nothing, and a manual
    # --workspace run must neither page anyone nor stand in for a cron run that is missing.
    pinger = None if dry_run or workspace is not None else _start_ping(settings, run_uuid)
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
            with _progress_display() as on_progress:
                summary = run_refresh(settings, rt, default_source=default_source,
                                      on_progress=on_progress, stop=stop)
        if not summary.success:
            code = ExitCode.FAILURE
            sys.stderr.write(f"availability-cron: failed: {summary.error}\n")
    except ConfigError as exc:
        if pinger is not None:
            pinger.finish(scrub(exc.message, settings.secrets()), ok=False)
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
    if pinger is not None:  # after the summary is out; bounded, and never changes the code
        pinger.finish(_json(summary.as_json()), ok=code == ExitCode.OK)
    _record_run(settings, rt, summary)  # best effort: never changes the code or the output
    log.info("run finished: %s", "ok" if code == ExitCode.OK else "failed")
    _exit(code)


def _stop_on_signals() -> StopRequest:
    """Make SIGTERM and SIGINT ask the run to stop (run_refresh's ``stop``): it then
    starts no more calls, writes what finished, and reports as a failure (reason
    "terminated", exit 1) through the usual end: summary, /fail ping, run history.

    A second signal ends the process at once with the shell's code for death by that
    signal, 128 + its number: 143 for SIGTERM, 130 for SIGINT.
    """
    import signal

    from .deadline import StopRequest

    stop = StopRequest(time.monotonic)

    def handle(signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        if stop.requested():
            os.write(2, f"availability-cron: second signal ({name}): exiting at once\n".encode())
            os._exit(128 + signum)
        stop.request(name)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, handle)
    return stop


def _new_run_uuid() -> uuid.UUID:
    import secrets as random_source

    from .lock import run_uuid

    return run_uuid(time.time_ns() // 1_000_000, random_source.randbits(74))


def _start_ping(settings: Settings, run_uuid: uuid.UUID) -> Pinger | None:
    """The run's dead-man's-switch pings (ping.py), started; None when no URL is set."""
    if not settings.ping_url:
        return None
    from . import __version__
    from .ping import pinger

    found = pinger(settings.ping_url, run_uuid, user_agent=f"availability-cron/{__version__}")
    if found is not None:
        found.start()
    return found


def _progress_display() -> AbstractContextManager[Callable[[SweepProgress], None] | None]:
    """A live progress bar on stderr for a person watching; nothing when stderr is not a
    terminal (cron's log, a file, a pipe), so logs stay one line per record."""
    if not sys.stderr.isatty():
        return nullcontext(None)
    from .console import LiveProgress

    return LiveProgress()


def _record_run(settings: Settings, rt: Runtime, summary: RunSummary) -> None:
    """Append the run to the run history (history.record_best_effort: never raises).

    One connection attempt only: when the database is what just failed, the process must
    not spend another retry cycle before exiting.
    """
    from . import db
    from .history import CONNECT_TIMEOUT_SECONDS, record_best_effort

    host = socket.gethostname().split(".")[0]
    name = f"availability-cron history run={rt.run_id} pid={os.getpid()} host={host}"
    record_best_effort(
        lambda: db.connect(settings.require_database_url(), application_name=name,
                           secrets=settings.secrets(), attempts=1,
                           connect_timeout=CONNECT_TIMEOUT_SECONDS),
        summary, settings, host=host, pid=os.getpid(), now=rt.clock,
    )


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
    if data["lockHeld"] is None:
        held = "unknown (a hot standby: the lock lives on the primary)"
    console.print(
        f"dry run at {data['at']}: {data['planned']} planned "
        f"({data['missingPlanned']} missing, {data['stalePlanned']} stale; limit {data['limit']}); "
        f"lock held now: {held}"
        + (f"; invalid source rows: {data['invalidSourceRows']} (see the log)"
           if data["invalidSourceRows"] else "")
    )
    table = Table(show_header=True)
    for column in ("#", "workspace", "provider", "reason", "overdue (s)", "failures"):
        table.add_column(column)
    for row in data["queue"]:
        table.add_row(str(row["position"]), row["workspaceId"], row["provider"], row["reason"],
                      str(row["overdueSeconds"]), str(row["consecutiveFailures"]))
    console.print(table)


class MetricsFormat(StrEnum):
    auto = "auto"
    json = "json"
    table = "table"
    prometheus = "prometheus"


METRICS_HELP = f"""Print the staleness report (ages measured from the last successful refresh)
and the health of recent runs (from the run history).

Keys: at, workspaces (enabled), caches, missingCaches, staleDue, erroringCaches,
neverSucceeded, oldestSuccessAgeMinutes, oldestRangeStartAgeMinutes, successAgeP50Minutes,
successAgeP95Minutes, lastRunAt, lastCompletedRunAt, lastRefreshingRunAt, lockSkipStreak,
runs24h, runsFailed24h, runsOverBudget24h, runDurationP50Ms, runDurationP95Ms; null where
there is no data. Definitions: docs/architecture.md.

--format prometheus prints the Prometheus text format (prefix availability_cron_, ages in
seconds); --textfile PATH writes it atomically for node_exporter's textfile collector
instead, printing nothing on stdout.

{EXIT_CODES_HELP}

Check mode: with --warn-after and --critical-after, it prints one Nagios status line and
the exit codes follow the Nagios plugin convention instead: 0 OK, 1 WARNING, 2 CRITICAL,
3 UNKNOWN (database unreachable, schema missing, no data at all, or an invalid option
or setting: each with its one status line).
"""

MetricsFormatOption = Annotated[MetricsFormat, typer.Option(
    "--format", help="auto (the default): a table when stdout is a terminal, else JSON; json; "
    "table; prometheus: the Prometheus text exposition format.")]


def _threshold(flag: str, level: str) -> Any:
    return typer.Option(
        flag, metavar="MINUTES", show_default=False,
        parser=_ascii_number(parse_decimal, "float"), help=f"Check mode (Nagios exit codes, see "
        f"above): {level} when the data age (oldest success, or oldest workspace never "
        f"refreshed), or the lock-skip streak read as minutes "
        "(one skipped run a minute), is above this many minutes. Equal is not above.")


@app.command(help=METRICS_HELP)
def metrics(
    output: MetricsFormatOption = MetricsFormat.auto,
    per_workspace: Annotated[bool, typer.Option(
        "--per-workspace", help="With prometheus output: also an age and a failure series per "
        "enabled workspace (one each per workspace: thousands on a large install).")] = False,
    textfile: Annotated[Path | None, typer.Option(
        "--textfile", metavar="PATH", dir_okay=False, show_default=False,
        help="Write the Prometheus text to PATH atomically (temporary file, fsync, rename; "
        "mode 0644) for node_exporter's textfile collector; nothing is printed on stdout. "
        "On failure the previous file is left as it was.")] = None,
    warn_after: Annotated[float | None, _threshold("--warn-after", "WARNING")] = None,
    critical_after: Annotated[float | None, _threshold("--critical-after", "CRITICAL")] = None,
    env_file: EnvFile = None,
    database_url: DatabaseUrl = None,
    source_table: SourceTable = None,
    log_level: LogLevel = None,
) -> None:
    from .metrics import nagios_unknown, validate_thresholds

    def usage(message: str) -> NoReturn:
        # In check mode every error is UNKNOWN with a status line: a bare exit 2 with
        # nothing on stdout would read as CRITICAL "(No output)" to Nagios.
        if warn_after is not None or critical_after is not None:
            _print_status(*nagios_unknown(message))
        _usage_error(message)

    try:
        dotenv, _ = _environment(env_file)
        settings = load_settings({"database_url": database_url, "source_table": source_table,
                                  "log_level": log_level}, os.environ, dotenv)
        thresholds = validate_thresholds(warn_after, critical_after)
        from . import db

        db.check_url(settings.require_database_url())
    except ConfigError as exc:
        usage(exc.message)
    prometheus = output is MetricsFormat.prometheus or textfile is not None
    if thresholds is not None and (output is not MetricsFormat.auto or per_workspace
                                   or textfile is not None):
        usage("--warn-after/--critical-after print a status line: they cannot be "
              "combined with --format, --per-workspace or --textfile")
    if textfile is not None and output not in (MetricsFormat.auto, MetricsFormat.prometheus):
        usage(f"--textfile writes the Prometheus format, not --format {output.value}")
    if per_workspace and not prometheus:
        usage("--per-workspace needs --format prometheus or --textfile")
    if textfile is not None and not textfile.absolute().parent.is_dir():
        usage(f"--textfile: directory {str(textfile.absolute().parent)!r} does not exist")
    _check_database_url(settings)
    _configure_logging(settings.log_level, secrets=settings.secrets())
    from datetime import UTC, datetime

    from .metrics import nagios_check, staleness, workspace_staleness

    def unknown(_exc: AvailabilityCronError, message: str) -> None:
        if thresholds is not None:  # Nagios: whatever stops the check is UNKNOWN
            _print_status(*nagios_unknown(message))

    try:
        with _database(settings, "metrics", on_failure=unknown) as conn:
            now = datetime.now(UTC)
            report = staleness(conn, settings.source_table, now)
            rows = (workspace_staleness(conn, settings.source_table, now) if per_workspace
                    else None)
    except typer.Exit:
        raise
    except Exception as exc:
        if thresholds is None:
            raise
        # Not one of ours (psycopg unable to read a value, say): still UNKNOWN with a line.
        log.debug("unexpected error", exc_info=True)
        _print_status(*nagios_unknown(scrub(f"unexpected error: {type(exc).__name__}: {exc}",
                                            settings.secrets())))
    if thresholds is not None:
        _print_status(*nagios_check(report, *thresholds))
    if prometheus:
        _write_prometheus(report, rows, textfile)
    elif _resolve_format(OutputFormat(output.value)) is OutputFormat.table:
        _print_table(f"availability caches at {report.as_json()['at']}",
                     {k: v for k, v in report.as_json().items() if k != "at"})
    else:
        _print_json(report.as_json())


def _print_status(status: int, line: str) -> NoReturn:
    """A Nagios plugin's output: one line on stdout, the status as the exit code."""
    sys.stdout.write(line + "\n")
    raise typer.Exit(int(status))


def _write_prometheus(report: StalenessReport, rows: list[WorkspaceStaleness] | None,
                      textfile: Path | None) -> None:
    from .metrics import render_prometheus, write_textfile

    text = render_prometheus(report, rows)
    if textfile is None:
        sys.stdout.write(text)
        return
    try:
        write_textfile(textfile, text)
    except OSError as exc:
        _failure(f"cannot write --textfile {str(textfile)!r}: {exc.strerror or exc}")
    log.debug("wrote %s", textfile)


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

    with _database(settings, "migrate", schema=False) as conn:
        applied = db.migrate(conn)
        version = db.latest_migration()
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


# --- operating it: lock status, lock release, show, config ---------------------------------

lock_app = typer.Typer(help="See who holds the refresh lock; end a holder stuck past a bound.",
                       no_args_is_help=True)
app.add_typer(lock_app, name="lock")

LockName = Annotated[str | None, _setting("lock_name")]
LockDatabaseUrl = Annotated[str | None, _setting("lock_database_url")]


def _lock_connection(settings: Settings, purpose: str) -> Any:
    """A connection for looking at the lock: where the refresh run takes it (the lock URL,
    else DATABASE_URL), so that `lock status` sees exactly the lock the runs use."""
    from . import db

    name = ("AVAILABILITY_CRON_LOCK_DATABASE_URL" if settings.lock_database_url
            else "DATABASE_URL")
    return db.connect(settings.require_lock_database_url(),
                      application_name=f"availability-cron {purpose}",
                      secrets=settings.secrets(), name=name)


def _flat(data: dict[str, object], prefix: str = "") -> dict[str, object]:
    """Nested JSON as dotted keys, for a two-column table."""
    out: dict[str, object] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        elif isinstance(value, list):
            out[f"{prefix}{key}"] = ", ".join(str(v) for v in value) or "-"
        else:
            out[f"{prefix}{key}"] = value
    return out


LOCK_STATUS_HELP = """Show who holds the refresh lock right now, from pg_locks and pg_stat_activity.

The holder's backend pid, application name, and the run id, OS pid and host of the
availability-cron process parsed from it; its role, since when and for how long
(heldForSeconds counts from the holder session's start), state, query, wait event and
client address. Asks the database of AVAILABILITY_CRON_LOCK_DATABASE_URL, else
DATABASE_URL. A role without pg_read_all_stats cannot see other roles' sessions: the
holder then shows "visible": false and a hint.

Exit codes: 0 answered, whether the lock is held or free; 1 the database cannot be
reached, or is a hot standby (the lock lives on the primary); 2 bad usage or configuration.
"""


@lock_app.command("status", help=LOCK_STATUS_HELP)
def lock_status(
    output: Format = OutputFormat.auto,
    lock_name: LockName = None,
    env_file: EnvFile = None,
    database_url: DatabaseUrl = None,
    lock_database_url: LockDatabaseUrl = None,
    log_level: LogLevel = None,
) -> None:
    settings = _load(env_file, database_url=database_url, lock_database_url=lock_database_url,
                     lock_name=lock_name, log_level=log_level)
    _check_database_url(settings)
    _configure_logging(settings.log_level, secrets=settings.secrets())
    from datetime import UTC, datetime

    from . import lock

    with _database(settings, "lock-status", schema=False, lock_url=True) as conn:
        report = lock.status(conn, settings.lock_name, now=datetime.now(UTC)).as_json()
    if _resolve_format(output) is OutputFormat.table:
        _print_table(f"lock {settings.lock_name!r}", _flat(report))
    else:
        _print_json(report)


LOCK_RELEASE_HELP = """End the session holding the refresh lock for longer than --older-than.

For a holder stuck past any run's budget: a wedged process, or a host gone without
closing its connection. A younger holder, or one whose age this role cannot see, is left
alone. Without --force, nothing is done when --older-than is below the lock-stuck
threshold (2 x AVAILABILITY_CRON_TIME_BUDGET_MS + 60 s: a healthy run may be that old),
and a holder that is not an availability-cron run (an app's session that took the key;
its age is its session's, not the lock's) is left alone. Otherwise its backend is ended
with pg_terminate_backend (logged at WARNING with its pid, application name and age),
the lock is checked to be free, and what was done is printed as JSON. The role needs
superuser, membership in the holder's role, or pg_signal_backend. Asks first at a
terminal; --yes answers for you and is required when stdin is not a terminal. Runbook:
docs/operations.md.

Exit codes: 0 the lock is free (the holder was ended, or nobody held it); 1 left alone
(holder younger than --older-than, age not visible, declined; without --force: a bound
below the lock-stuck threshold, a holder that is not an availability-cron run), not
permitted, still held, the database cannot be reached, or it is a hot standby; 2 bad usage
or configuration (e.g. --older-than 5x).
"""


@lock_app.command("release", help=LOCK_RELEASE_HELP)
def lock_release(
    older_than: Annotated[str, typer.Option(
        "--older-than", metavar="DURATION", show_default=False,
        help="End the holder only if it has held the lock longer than this: a whole number "
        "and one unit, s, m, h or d (90s, 10m, 2h).")],
    yes: Annotated[bool, typer.Option(
        "--yes", help="Do not ask before terminating the holder.")] = False,
    force: Annotated[bool, typer.Option(
        "--force", help="Also with --older-than below the lock-stuck threshold, and for a "
        "holder that is not an availability-cron run.")] = False,
    output: Format = OutputFormat.auto,
    lock_name: LockName = None,
    env_file: EnvFile = None,
    database_url: DatabaseUrl = None,
    lock_database_url: LockDatabaseUrl = None,
    log_level: LogLevel = None,
) -> None:
    from .settings import parse_duration

    try:
        bound = parse_duration("--older-than", older_than)
    except ConfigError as exc:
        _usage_error(exc.message)
    if not yes and not sys.stdin.isatty():
        _usage_error("lock release: stdin is not a terminal, so nobody can confirm: pass --yes")
    settings = _load(env_file, database_url=database_url, lock_database_url=lock_database_url,
                     lock_name=lock_name, log_level=log_level)
    _check_database_url(settings)
    _configure_logging(settings.log_level, secrets=settings.secrets())
    from . import lock

    def confirm(holder: lock.LockHolder) -> bool:
        return yes or typer.confirm(
            f"Terminate backend pid {holder.pid} ({holder.application_name}), which has held "
            f"the lock for {holder.held_for_seconds or 0:.0f}s?", err=True)

    with _database(settings, "lock-release", schema=False, lock_url=True) as conn:
        result = lock.release_stuck(
            conn, settings.lock_key, older_than=bound, confirm=confirm, force=force,
            stuck_after=lock.stuck_after_seconds(settings.time_budget_ms))
    report = result.as_json()
    if _resolve_format(output) is OutputFormat.table:
        _print_table(f"lock {settings.lock_name!r} release", _flat(report))
    else:
        _print_json(report)
    if not result.ok:
        _failure(result.describe())
    sys.stderr.write(f"availability-cron: {result.describe()}\n")


SHOW_HELP = """Show one workspace: its source row and the state of its cache.

provider_config with secrets redacted (values under keys that look secret are ***; *_env
keys show the variable's name, never its value); the cache without its slot list (the
count and the first 5 slots, also in provider_config.timezone when set); the age of the
last success; when it is due next and whether it is due now; the last error and the
failure streak. Reads only.

Exit codes: 0 shown; 1 real failure (database unreachable, schema missing); 2 bad usage or
configuration, or no such workspace.
"""


@app.command(help=SHOW_HELP)
def show(
    workspace: Annotated[str, typer.Argument(metavar="WORKSPACE", show_default=False,
                                             help="The workspace_id.")],
    output: Format = OutputFormat.auto,
    env_file: EnvFile = None,
    database_url: DatabaseUrl = None,
    source_table: SourceTable = None,
    log_level: LogLevel = None,
) -> None:
    settings, environ = _load_with_environ(env_file, database_url=database_url,
                                           source_table=source_table, log_level=log_level)
    _check_database_url(settings)
    _configure_logging(settings.log_level, secrets=settings.secrets())
    from datetime import UTC, datetime

    from .show import describe

    with _database(settings, "show") as conn:
        view = describe(conn, settings.source_table, workspace, now=datetime.now(UTC),
                        environ=environ, secrets=settings.secrets())
    report = view.as_json()
    if _resolve_format(output) is OutputFormat.table:
        _print_table(f"workspace {workspace!r} at {report['at']}",
                     {k: v for k, v in _flat(report).items() if k != "at"})
    else:
        _print_json(report)


CONFIG_HELP = """Show every setting: its effective value and where it came from.

One entry per setting, in order: the variable, its flag, its value (passwords in
DATABASE_URL and AVAILABILITY_CRON_LOCK_DATABASE_URL redacted, the ping URL cut to its
scheme and host: it is a credential) and its source: flag, environment, .env or default.
Then the lock: its name, the 64-bit advisory-lock key derived from it, and the URL its
session uses. Never touches the database. Takes the setting flags of refresh.

Exit codes: 0 shown; 2 a setting is invalid (the same message refresh would give).
"""


@app.command("config", help=CONFIG_HELP)
def config(
    output: Format = OutputFormat.auto,
    limit: Annotated[int | None, _setting("limit")] = None,
    concurrency: Annotated[int | None, _setting("concurrency")] = None,
    time_budget_ms: Annotated[int | None, _setting("time_budget_ms")] = None,
    deadline_margin_ms: Annotated[int | None, _setting("deadline_margin_ms")] = None,
    cache_ttl_ms: Annotated[int | None, _setting("cache_ttl_ms")] = None,
    lookahead_days: Annotated[int | None, _setting("lookahead_days")] = None,
    missing_reserve: Annotated[float | None, _setting("missing_reserve")] = None,
    max_backoff_ms: Annotated[int | None, _setting("max_backoff_ms")] = None,
    lock_name: LockName = None,
    lock_database_url: LockDatabaseUrl = None,
    env_file: EnvFile = None,
    database_url: DatabaseUrl = None,
    source_table: SourceTable = None,
    log_level: LogLevel = None,
) -> None:
    settings = _load(
        env_file, limit=limit, concurrency=concurrency, time_budget_ms=time_budget_ms,
        deadline_margin_ms=deadline_margin_ms, cache_ttl_ms=cache_ttl_ms,
        lookahead_days=lookahead_days, missing_reserve=missing_reserve,
        max_backoff_ms=max_backoff_ms, lock_name=lock_name, lock_database_url=lock_database_url,
        database_url=database_url, source_table=source_table, log_level=log_level,
    )
    if settings.database_url:  # unset is shown, not refused: this command answers questions
        _check_database_url(settings)
    from .settings import describe, shown_value

    dotenv = env_file or Path.cwd() / ".env"
    lock_url_from = ("AVAILABILITY_CRON_LOCK_DATABASE_URL" if settings.lock_database_url
                     else "DATABASE_URL")
    report: dict[str, object] = {
        "envFile": str(dotenv) if dotenv.is_file() else None,
        "settings": describe(settings),
        "lock": {
            "name": settings.lock_name,
            "key": settings.lock_key,
            "databaseUrl": shown_value("database_url", settings.lock_database_url
                                       or settings.database_url),
            "databaseUrlFrom": lock_url_from,
        },
    }
    # Built from redacted values (describe, shown_value); the serialised text is never
    # scrubbed: a password such as `null` or `7500` would corrupt it.
    if _resolve_format(output) is OutputFormat.table:
        _print_config_table(report)
    else:
        _print_json(report)


def _print_config_table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="availability-cron config", show_header=True)
    for column in ("setting", "value", "source"):
        table.add_column(column)
    for row in report["settings"]:
        table.add_row(row["name"], "-" if row["value"] is None else str(row["value"]),
                      row["source"])
    lock = report["lock"]
    console = Console()
    console.print(table)
    console.print(f"lock {lock['name']!r}: key {lock['key']}, taken through "
                  f"{lock['databaseUrlFrom']}; env file: {report['envFile'] or '-'}")


def main() -> None:
    """Console-script entry point.

    Errors found by the option parser (unknown option or command, bad or missing value) are
    one line like every other error: ``availability-cron: error: <message>``, exit 2. In
    check mode (``metrics --warn-after/--critical-after``) every failure is one Nagios status
    line on stdout instead, UNKNOWN (3): an exit 2 with nothing on stdout reads as CRITICAL
    "(No output)" to Nagios, an exit 1 as WARNING. --help, --version and the help printed
    when no command is given are Click's own, unchanged.
    """
    args = sys.argv[1:]
    check_mode = _check_mode(args)
    errors = _click_exceptions()
    try:
        code = app(args=args, prog_name="availability-cron", standalone_mode=False)
    except getattr(errors, "NoArgsIsHelpError", ()) as exc:  # Click >= 8.2: the help, exit 2
        exc.show()
        code = exc.exit_code
    except errors.ClickException as exc:
        code = _parser_error(" ".join(exc.format_message().split()), exc.exit_code, check_mode)
    except typer.Abort:  # a prompt (lock release) got end-of-file or Ctrl-C
        code = _parser_error("aborted", ExitCode.FAILURE, check_mode)
    except Exception as exc:
        if not check_mode:
            raise
        # The metrics command reports its own errors; this is a last resort, without the
        # exception's text: the settings that say what to scrub from it are not known here.
        import traceback

        traceback.print_exc()
        code = _parser_error(f"unexpected error: {type(exc).__name__} (traceback on stderr)",
                             ExitCode.FAILURE, check_mode)
    raise SystemExit(code or 0)


def _check_mode(args: list[str]) -> bool:
    """Whether the command line asks for the Nagios check: metrics with --warn-after or
    --critical-after (as ``--warn-after 30`` or ``--warn-after=30``)."""
    flags = {"--warn-after", "--critical-after"}
    return args[:1] == ["metrics"] and any(a.split("=", 1)[0] in flags for a in args[1:])


def _parser_error(message: str, code: int, check_mode: bool) -> int:
    """Report an error caught outside a command on one line; return the exit code."""
    if check_mode:
        from .metrics import nagios_unknown

        status, line = nagios_unknown(message)
        sys.stdout.write(line + "\n")
        return int(status)
    sys.stderr.write(f"availability-cron: error: {message}\n")
    return code


def _click_exceptions() -> Any:
    """Click's exceptions module: typer vendors Click as typer._click in recent versions."""
    import importlib

    try:
        return importlib.import_module("typer._click.exceptions")
    except ImportError:  # pragma: no cover - typer before vendoring Click
        return importlib.import_module("click.exceptions")


if __name__ == "__main__":
    main()
