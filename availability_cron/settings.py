"""Settings: one frozen dataclass, built and validated once, before anything touches the database.

Precedence, highest first: command-line flag > process environment > the .env file
(``--env-file PATH``, else ``./.env`` when it exists) > built-in default.
An empty value (``NAME=``) counts as unset, so a blank line in an env file falls
through to the default instead of failing.

This module is pure: it never imports psycopg and never reads ``os.environ``
itself; the CLI passes the environment in.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from datetime import timedelta
from pathlib import Path
from typing import IO, Any

from .errors import ConfigError
from .redact import ping_url_secrets, redact_secret_url, redact_url, url_secrets
from .redact import scrub as scrub  # re-exported: callers scrub with the settings' secrets

#: Where a setting's value came from, as shown by `availability-cron config`.
SOURCES = ("flag", "environment", ".env", "default")

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]{0,62}$")


# Numbers are ASCII only: Python's int() and float() also take other scripts' digits (５, ٣)
# and stray underscores (int("_5") after removing them), which no shell script, systemd or
# libpq reads as numbers. An integer may group its digits with single underscores (45_000).
_INTEGER = re.compile(r"[+-]?[0-9]+(?:_[0-9]+)*")
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def parse_integer(raw: str) -> int:
    """An integer written in ASCII digits (single underscores between them allowed), with an
    optional sign and surrounding space; ValueError otherwise."""
    text = raw.strip()
    if not _INTEGER.fullmatch(text):
        raise ValueError(f"{raw!r} is not an integer")
    return int(text)


def parse_decimal(raw: str) -> float:
    """A finite decimal number in ASCII digits (``0.25``, ``.5``, ``1e-3``), with an optional
    sign and surrounding space; ValueError otherwise. ``-0`` is 0.0."""
    text = raw.strip()
    if not _DECIMAL.fullmatch(text):
        raise ValueError(f"{raw!r} is not a number")
    return float(text) + 0.0  # -0.0 + 0.0 is 0.0: `config` would show -0.0


def _int_in(lo: int, hi: int) -> Callable[[str, str], int]:
    def parse(name: str, raw: str) -> int:
        try:
            value = parse_integer(raw)
        except ValueError:
            value = None
        if value is None or not lo <= value <= hi:
            raise ConfigError(f"{name} must be an integer from {lo} to {hi}, got {raw!r}")
        return value

    return parse


def _fraction(name: str, raw: str) -> float:
    try:
        value = parse_decimal(raw)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:  # also rejects nan
        raise ConfigError(f"{name} must be a number from 0 to 1, got {raw!r}")
    return value


def _database_url(name: str, raw: str) -> str:
    value = raw.strip()
    if value.startswith(("postgresql://", "postgres://")):
        authority = value.split("://", 1)[1].split("/", 1)[0]
        if authority.count("@") > 1:
            raise ConfigError(
                f"{name} has an unencoded '@' in its user or password: percent-encode it "
                "(@ is %40, / is %2F, : is %3A)"
            )
        return value
    if "=" in value:
        return value
    # The rejected value is not echoed: without a scheme we cannot tell where a
    # password would be, and a password must never reach a log.
    raise ConfigError(
        f"{name} must be a PostgreSQL URL (postgresql://user@host:5432/dbname) "
        "or a libpq key=value string (value not shown: it may contain a password)"
    )


def _http_url(name: str, raw: str) -> str:
    value = raw.strip()
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{name} must be an http or https URL (value not shown: it may hold "
                          "a secret)")
    return value.rstrip("/")


def _relation(name: str, raw: str) -> str:
    parts = raw.strip().split(".")
    if len(parts) > 2 or not all(_IDENT.match(p) for p in parts):
        raise ConfigError(
            f"{name} must be a table or view name, optionally schema-qualified "
            f"(letters, digits, _ and $, e.g. app.availability_workspaces), got {raw!r}"
        )
    return raw.strip()


def _lock_name(name: str, raw: str) -> str:
    value = raw.strip()
    if not 1 <= len(value) <= 200:
        raise ConfigError(f"{name} must be a non-empty name of at most 200 characters")
    return value


def _directory(name: str, raw: str) -> str:
    # The shape only: whether the directory exists is decided per workspace at read time
    # (providers.ics.read_feed_file), so that an unmounted volume fails the workspaces
    # with feed files, not every command for every provider.
    path = Path(raw.strip())
    if not path.is_absolute():
        raise ConfigError(f"{name} must be the absolute path of a directory, got {raw!r}")
    return str(path)


def _secret_scopes(name: str, raw: str) -> str:
    # providers.scopes is pure (no httpx, no psycopg); imported only when the variable is set.
    from .providers.scopes import parse_rules

    try:
        parse_rules(raw)
    except ValueError as exc:
        raise ConfigError(f"{name} {exc}") from None
    return raw.strip()


def _log_level(name: str, raw: str) -> str:
    value = raw.strip().upper()
    if value not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ConfigError(f"{name} must be one of DEBUG, INFO, WARNING, ERROR, got {raw!r}")
    return value


@dataclass(frozen=True)
class Spec:
    """How one setting is named, defaulted, parsed and explained."""

    field: str
    env: str
    flag: str | None
    default: str | None
    parse: Callable[[str, str], Any]
    help: str


SPECS: tuple[Spec, ...] = (
    Spec("database_url", "DATABASE_URL", "--database-url", None, _database_url,
         "PostgreSQL URL of the database holding the caches (required)."),
    Spec("time_budget_ms", "AVAILABILITY_CRON_TIME_BUDGET_MS", "--time-budget-ms", "45000",
         _int_in(1000, 3_600_000),
         "Wall-clock budget of one run, from process start, in ms."),
    Spec("deadline_margin_ms", "AVAILABILITY_CRON_DEADLINE_MARGIN_MS", "--deadline-margin-ms",
         "7500", _int_in(0, 3_600_000),
         "No new refresh starts when less than this is left of the budget, in ms."),
    Spec("concurrency", "AVAILABILITY_CRON_CONCURRENCY", "--concurrency", "5", _int_in(1, 256),
         "Provider calls in flight at once (worker threads)."),
    Spec("cache_ttl_ms", "AVAILABILITY_CACHE_TTL_MS", "--cache-ttl-ms", "60000",
         _int_in(1000, 86_400_000),
         "How long a successful refresh stays fresh, in ms."),
    Spec("limit", "AVAILABILITY_CRON_LIMIT", "--limit", "500", _int_in(0, 1_000_000),
         "Most refreshes one run attempts (0: attempt none)."),
    Spec("lookahead_days", "AVAILABILITY_LOOKAHEAD_DAYS", "--lookahead-days", "30",
         _int_in(1, 366),
         "Days of availability fetched from now."),
    Spec("missing_reserve", "AVAILABILITY_CRON_MISSING_RESERVE", "--missing-reserve", "0.2",
         _fraction,
         "Share of the limit kept for workspaces with no cache yet (0 to 1)."),
    Spec("max_backoff_ms", "AVAILABILITY_CRON_MAX_BACKOFF_MS", "--max-backoff-ms", "1800000",
         _int_in(1000, 7 * 86_400_000),
         "Cap of the retry delay after consecutive failures, in ms."),
    Spec("lock_name", "AVAILABILITY_CRON_LOCK_NAME", "--lock-name", "refresh", _lock_name,
         "Name hashed into the 64-bit advisory lock key; runs sharing it never overlap."),
    Spec("source_table", "AVAILABILITY_CRON_SOURCE_TABLE", "--source-table",
         "availability_workspaces", _relation,
         "Table or view listing the workspaces (may be schema-qualified)."),
    Spec("log_level", "AVAILABILITY_CRON_LOG_LEVEL", "--log-level", "INFO", _log_level,
         "Log level of the stderr log: DEBUG, INFO, WARNING or ERROR."),
    Spec("lock_database_url", "AVAILABILITY_CRON_LOCK_DATABASE_URL", "--lock-database-url",
         None, _database_url,
         "Separate URL for the lock's session (same database, direct or session-mode "
         "pooler), when DATABASE_URL goes through a transaction-mode pooler."),
    Spec("run_retention_days", "AVAILABILITY_CRON_RUN_RETENTION_DAYS", None, "7",
         _int_in(1, 366),
         "Days of run history kept in availability_cron_runs (older rows are pruned)."),
    Spec("ping_url", "AVAILABILITY_CRON_PING_URL", None, None, _http_url,
         "Dead-man's-switch URL (Healthchecks.io protocol): /start, success, /fail."),
    # Read by the ics provider from the environment; declared here so that a bad value is
    # refused up front like every other setting.
    Spec("ics_file_root", "AVAILABILITY_CRON_ICS_FILE_ROOT", None, None, _directory,
         "Directory under which ics workspaces may name feed files (unset: none may)."),
    Spec("secret_scopes", "AVAILABILITY_CRON_SECRET_SCOPES", None, None, _secret_scopes,
         "JSON rules naming which workspaces may use which environment variable as a token "
         "(token_env), and the hosts its value may be sent to; added to the built-in "
         "CALCOM_TOKEN_{workspace}, CALENDLY_TOKEN_{workspace}, GHL_TOKEN_{workspace} "
         "(docs/security.md)."),
)

SPEC_BY_FIELD = {s.field: s for s in SPECS}


@dataclass(frozen=True)
class Settings:
    """Validated settings. Build with :func:`load_settings`."""

    database_url: str | None
    time_budget_ms: int
    deadline_margin_ms: int
    concurrency: int
    cache_ttl_ms: int
    limit: int
    lookahead_days: int
    missing_reserve: float
    max_backoff_ms: int
    lock_name: str
    source_table: str
    log_level: str
    lock_database_url: str | None
    run_retention_days: int
    ping_url: str | None
    ics_file_root: str | None
    secret_scopes: str | None
    #: field name -> one of SOURCES
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)

    @property
    def lock_key(self) -> int:
        from .lock import lock_key

        return lock_key(self.lock_name)

    def require_database_url(self) -> str:
        if not self.database_url:
            raise ConfigError(
                "DATABASE_URL is not set: pass --database-url, export it, or put it in .env"
            )
        return self.database_url

    def require_lock_database_url(self) -> str:
        """The URL of the lock's session: AVAILABILITY_CRON_LOCK_DATABASE_URL, else DATABASE_URL."""
        return self.lock_database_url or self.require_database_url()

    def secrets(self) -> list[str]:
        """Strings that must never be printed, longest first: every password in the URLs, as
        libpq reads it and as it is written (:func:`redact.url_secrets`), and the ping URL's
        path (:func:`redact.ping_url_secrets`)."""
        found = (url_secrets(self.database_url) + url_secrets(self.lock_database_url)
                 + ping_url_secrets(self.ping_url))
        return sorted(set(found), key=lambda s: (-len(s), s))  # longest first, then stable


def read_env_file(path: Path | None, cwd: Path) -> dict[str, str]:
    """Read ``path`` (must exist) or ``cwd/.env`` (optional) without touching os.environ.

    Values are taken literally: ``${VAR}`` is not expanded (python-dotenv's default is to
    expand it), because systemd's EnvironmentFile= reads the same file literally and a
    password with a ``$`` must reach libpq the same way under cron and under systemd. A line
    that cannot be parsed is a ConfigError naming the file and the line number, never the
    line itself: it may hold a password.
    """
    if path is None:
        candidate = cwd / ".env"
        if not candidate.is_file():
            return {}
        path = candidate
    elif not path.is_file():
        raise ConfigError(f"--env-file {str(path)!r} does not exist or is not a file")
    try:
        with path.open(encoding="utf-8") as stream:
            return _env_values(path, stream)
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"env file {str(path)!r} cannot be read: {reason}") from None


def _env_values(path: Path, stream: IO[str]) -> dict[str, str]:
    """The bindings of an env file, as dotenv_values(interpolate=False) reads them (a later
    line wins; ``NAME`` without ``=`` is skipped), refusing the first line it cannot parse.

    python-dotenv's parser is used directly: dotenv_values only logs a warning for a bad
    line, in another log format, and goes on without it.
    """
    from dotenv.parser import parse_stream

    values: dict[str, str] = {}
    for binding in parse_stream(stream):
        if binding.error:
            # A statement's text starts with the blank lines before it; its line is its first.
            text = binding.original.string
            line = binding.original.line + text[:len(text) - len(text.lstrip())].count("\n")
            raise ConfigError(
                f"env file {str(path)!r} line {line} cannot be parsed "
                "(value not shown: it may hold a secret): write NAME=value, quoting a "
                "value with ' or \""
            )
        if binding.key is not None and binding.value is not None:
            values[binding.key] = binding.value
    return values


def load_settings(
    flags: Mapping[str, object | None],
    environ: Mapping[str, str],
    dotenv: Mapping[str, str],
) -> Settings:
    """Resolve every setting by precedence and validate it.

    ``flags`` maps field names to the value given on the command line (None: not
    given). Raises :class:`ConfigError` naming the variable (and the flag, when the
    bad value came from one) for the first invalid value.
    """
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for spec in SPECS:
        flag_value = flags.get(spec.field)
        candidates = (
            ("flag", None if flag_value is None else str(flag_value)),
            ("environment", environ.get(spec.env)),
            (".env", dotenv.get(spec.env)),
            ("default", spec.default),
        )
        for source, raw in candidates:
            if raw is None or (source != "flag" and raw.strip() == ""):
                continue
            name = f"{spec.flag} ({spec.env})" if source == "flag" and spec.flag else spec.env
            if source == "flag" and raw.strip() == "":
                raise ConfigError(f"{name} must not be empty")
            values[spec.field] = spec.parse(name, raw)
            sources[spec.field] = source
            break
        else:
            values[spec.field] = None
            sources[spec.field] = "default"

    if values["deadline_margin_ms"] >= values["time_budget_ms"]:
        raise ConfigError(
            "AVAILABILITY_CRON_DEADLINE_MARGIN_MS must be less than "
            f"AVAILABILITY_CRON_TIME_BUDGET_MS, got {values['deadline_margin_ms']} >= "
            f"{values['time_budget_ms']}"
        )
    if values["max_backoff_ms"] < values["cache_ttl_ms"]:
        raise ConfigError(
            "AVAILABILITY_CRON_MAX_BACKOFF_MS must be at least AVAILABILITY_CACHE_TTL_MS, "
            f"got {values['max_backoff_ms']} < {values['cache_ttl_ms']}"
        )
    known = {f.name for f in fields(Settings)} - {"sources"}
    assert set(values) == known, set(values) ^ known
    return Settings(**values, sources=sources)


def shown_value(field_name: str, value: object) -> object:
    """A setting's value as `availability-cron config` prints it: secrets redacted."""
    if value is None or not isinstance(value, str):
        return value
    if field_name in ("database_url", "lock_database_url"):
        return redact_url(value)
    if field_name == "ping_url":
        return redact_secret_url(value)
    return value


def describe(settings: Settings) -> list[dict[str, object]]:
    """Every setting in SPECS order: variable, flag, effective value (secrets redacted), source."""
    return [
        {
            "name": spec.env,
            "flag": spec.flag,
            "value": shown_value(spec.field, getattr(settings, spec.field)),
            "source": settings.sources.get(spec.field, "default"),
        }
        for spec in SPECS
    ]


_DURATION = re.compile(r"([1-9][0-9]{0,8})([smhd])")
_DURATION_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_duration(name: str, raw: str) -> timedelta:
    """A whole number and one unit, nothing else: ``90s``, ``10m``, ``2h``, ``1d``."""
    match = _DURATION.fullmatch(raw)
    if match is None:
        raise ConfigError(
            f"{name} must be a whole number of seconds, minutes, hours or days such as 90s, "
            f"10m, 2h or 1d, got {raw!r}"
        )
    return timedelta(**{_DURATION_UNITS[match[2]]: int(match[1])})
