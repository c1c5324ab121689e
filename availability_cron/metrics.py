"""The staleness report: how old is the data apps are showing right now, and how the job runs.

Every age is measured from the last *successful* refresh (``refreshed_at``), never
from the last attempt (``fetched_at``): a workspace whose provider has failed for an
hour is an hour stale, however often it was retried. Only enabled workspaces
count; cache rows of removed or disabled workspaces are ignored. The run numbers come
from the run history (``availability_cron_runs``, written by :mod:`.history`).

Three renderings: JSON (:meth:`StalenessReport.as_json`), the Prometheus text
exposition format (:func:`render_prometheus`, written atomically for node_exporter by
:func:`write_textfile`), and one Nagios plugin status line (:func:`nagios_check`).
Exact definitions of every number: docs/architecture.md, "Metrics definitions".
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import IntEnum
from pathlib import Path
from typing import Any

from psycopg.rows import class_row, dict_row

from . import db, queries
from .clock import iso_utc_or_none
from .errors import ConfigError
from .source import fetch_invalid_rows

#: The window of the run counters and duration percentiles.
RUN_WINDOW = timedelta(hours=24)


@dataclass(frozen=True)
class RunHistory:
    """The job's recent runs (``refresh --workspace`` runs excluded); None: no data."""

    #: finished_at of the most recently started run, whatever its outcome.
    last_run_at: datetime | None = None
    #: finished_at of the most recently started run whose outcome is completed.
    last_completed_run_at: datetime | None = None
    #: finished_at of the most recently started run that refreshed at least one cache.
    last_refreshing_run_at: datetime | None = None
    #: Runs skipped on the lock (healthy skip or lock-stuck) since the newest run that was
    #: not; None when no run is recorded at all.
    lock_skip_streak: int | None = None
    #: Runs started in the RUN_WINDOW before ``at``.
    runs_24h: int = 0
    #: ...of which failed (exit 1, lock-stuck included); None when runs_24h is 0.
    runs_failed_24h: int | None = None
    #: ...of which completed but not within budget; None when runs_24h is 0.
    runs_over_budget_24h: int | None = None
    #: percentile_cont of duration_ms over those runs that were not skipped on the lock.
    run_duration_p50_ms: float | None = None
    run_duration_p95_ms: float | None = None

    def as_json(self) -> dict[str, object]:
        return {
            "lastRunAt": _iso(self.last_run_at),
            "lastCompletedRunAt": _iso(self.last_completed_run_at),
            "lastRefreshingRunAt": _iso(self.last_refreshing_run_at),
            "lockSkipStreak": self.lock_skip_streak,
            "runs24h": self.runs_24h,
            "runsFailed24h": self.runs_failed_24h,
            "runsOverBudget24h": self.runs_over_budget_24h,
            "runDurationP50Ms": self.run_duration_p50_ms,
            "runDurationP95Ms": self.run_duration_p95_ms,
        }


@dataclass(frozen=True)
class StalenessReport:
    at: datetime
    #: Enabled workspaces in the source.
    workspaces: int
    #: Enabled workspaces that have a cache row (successful or not).
    caches: int
    #: Enabled workspaces with no cache row at all.
    missing_caches: int
    #: Cache rows due for refresh (stale_at <= at).
    stale_due: int
    #: Cache rows whose last attempt failed (last_error is set).
    erroring_caches: int
    #: Enabled workspaces without any successful refresh: missing, or attempted and failed.
    never_succeeded: int
    #: Ages in seconds, unrounded (JSON shows minutes, Prometheus seconds).
    oldest_success_age_seconds: float | None
    oldest_range_start_age_seconds: float | None
    success_age_p50_seconds: float | None
    success_age_p95_seconds: float | None
    runs: RunHistory = field(default_factory=RunHistory)
    #: How long the oldest enabled workspace without any successful refresh has existed
    #: (since its created_at): data that never arrived is the stalest of all.
    oldest_never_succeeded_age_seconds: float | None = None
    #: Enabled source rows breaking the contract on a key column (source.InvalidRows): a
    #: NULL workspace_id (not counted as a workspace), an over-long one (skipped by runs),
    #: or a NULL created_at without a cache row (planned last).
    invalid_source_rows: int = 0

    @property
    def oldest_success_age_minutes(self) -> float | None:
        return _minutes(self.oldest_success_age_seconds)

    def as_json(self) -> dict[str, object]:
        return {
            "at": _iso(self.at),
            "workspaces": self.workspaces,
            "caches": self.caches,
            "missingCaches": self.missing_caches,
            "staleDue": self.stale_due,
            "erroringCaches": self.erroring_caches,
            "neverSucceeded": self.never_succeeded,
            "oldestSuccessAgeMinutes": self.oldest_success_age_minutes,
            "oldestRangeStartAgeMinutes": _minutes(self.oldest_range_start_age_seconds),
            "successAgeP50Minutes": _minutes(self.success_age_p50_seconds),
            "successAgeP95Minutes": _minutes(self.success_age_p95_seconds),
            "oldestNeverSucceededAgeMinutes": _minutes(self.oldest_never_succeeded_age_seconds),
            "invalidSourceRows": self.invalid_source_rows,
            **self.runs.as_json(),
        }


@dataclass(frozen=True)
class WorkspaceStaleness:
    """One enabled workspace with a cache row, for the ``--per-workspace`` series."""

    workspace_id: str
    #: None until its first successful refresh.
    success_age_seconds: float | None
    consecutive_failures: int


def _iso(at: datetime | None) -> str | None:
    return iso_utc_or_none(at)


def _seconds_since(at: datetime, then: datetime | None) -> float | None:
    return None if then is None else (at - then).total_seconds()


def _minutes(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds / 60, 2)


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def staleness(conn: db.Connection, source_table: str, now: datetime) -> StalenessReport:
    """Compute the report at ``now``.

    The cache numbers come from one statement (one consistent snapshot), the invalid
    source rows from a second (:func:`source.fetch_invalid_rows`), the run numbers from a
    third (:func:`run_history`).
    """
    # Binary results: timestamps read whatever the DateStyle (see db.py).
    with conn.cursor(row_factory=dict_row, binary=True) as cur:
        cur.execute(queries.with_source(queries.STALENESS, source_table), {"now": now})
        row = cur.fetchone()
    assert row is not None  # an aggregate always returns one row
    workspaces, caches = int(row["workspaces"]), int(row["caches"])
    missing = workspaces - caches
    return StalenessReport(
        at=now,
        workspaces=workspaces,
        caches=caches,
        missing_caches=missing,
        stale_due=int(row["stale_due"]),
        erroring_caches=int(row["erroring_caches"]),
        never_succeeded=missing + int(row["caches_never_succeeded"]),
        oldest_success_age_seconds=_seconds_since(now, row["oldest_success"]),
        oldest_range_start_age_seconds=_seconds_since(now, row["oldest_range_start"]),
        success_age_p50_seconds=_float(row["success_age_p50_seconds"]),
        success_age_p95_seconds=_float(row["success_age_p95_seconds"]),
        runs=run_history(conn, now),
        oldest_never_succeeded_age_seconds=_seconds_since(
            now, row["oldest_never_succeeded_created_at"]),
        invalid_source_rows=fetch_invalid_rows(conn, source_table).total,
    )


def run_history(conn: db.Connection, now: datetime) -> RunHistory:
    """The job's run numbers at ``now`` from availability_cron_runs, in one statement."""
    # Binary results: timestamps read whatever the DateStyle (see db.py).
    with conn.cursor(row_factory=dict_row, binary=True) as cur:
        cur.execute(queries.RUN_HISTORY, {"since": now - RUN_WINDOW})
        row = cur.fetchone()
    assert row is not None
    runs = int(row["runs"])

    def rounded(value: Any) -> float | None:
        return None if value is None else round(float(value), 1)

    return RunHistory(
        last_run_at=row["last_run_at"],
        last_completed_run_at=row["last_completed_run_at"],
        last_refreshing_run_at=row["last_refreshing_run_at"],
        lock_skip_streak=None if row["last_run_at"] is None else int(row["lock_skip_streak"]),
        runs_24h=runs,
        runs_failed_24h=int(row["runs_failed"]) if runs else None,
        runs_over_budget_24h=int(row["runs_over_budget"]) if runs else None,
        run_duration_p50_ms=rounded(row["duration_p50_ms"]),
        run_duration_p95_ms=rounded(row["duration_p95_ms"]),
    )


def workspace_staleness(
    conn: db.Connection, source_table: str, now: datetime
) -> list[WorkspaceStaleness]:
    """Every enabled workspace that has a cache row, by id (one row each: thousands)."""
    query = queries.with_source(queries.WORKSPACE_STALENESS, source_table)
    # Binary results: timestamps read whatever the DateStyle (see db.py).
    with conn.cursor(row_factory=class_row(WorkspaceStaleness), binary=True) as cur:
        cur.execute(query, {"now": now})
        return cur.fetchall()


# --- Prometheus text exposition format ------------------------------------------------------

PREFIX = "availability_cron_"


def _timestamp(at: datetime | None) -> float | None:
    return None if at is None else at.timestamp()


def _ms_to_seconds(ms: float | None) -> float | None:
    return None if ms is None else ms / 1000


def _gauges(report: StalenessReport) -> list[tuple[str, str, float | None]]:
    """(name without prefix, help, value) of every report-wide gauge."""
    r = report.runs
    return [
        ("workspaces", "Enabled workspaces in the source relation.", report.workspaces),
        ("caches", "Enabled workspaces that have a cache row.", report.caches),
        ("missing_caches", "Enabled workspaces with no cache row.", report.missing_caches),
        ("stale_due_caches", "Cache rows of enabled workspaces due for refresh (stale_at <= now).",
         report.stale_due),
        ("erroring_caches", "Cache rows of enabled workspaces whose last attempt failed.",
         report.erroring_caches),
        ("never_succeeded_workspaces",
         "Enabled workspaces without any successful refresh (missing or always failed).",
         report.never_succeeded),
        ("invalid_source_rows",
         "Enabled source rows breaking the data contract: a NULL or over-long workspace_id "
         "(skipped), or a NULL created_at without a cache row (planned last).",
         report.invalid_source_rows),
        ("oldest_success_age_seconds",
         "Age of the oldest last successful refresh among enabled workspaces.",
         report.oldest_success_age_seconds),
        ("oldest_range_start_age_seconds",
         "Age of the oldest availability window start among enabled workspaces.",
         report.oldest_range_start_age_seconds),
        ("oldest_never_succeeded_age_seconds",
         "Time since the oldest enabled workspace without any successful refresh was created.",
         report.oldest_never_succeeded_age_seconds),
        ("success_age_p50_seconds",
         "Median age of the last successful refresh (percentile_cont, workspaces that ever "
         "succeeded).", report.success_age_p50_seconds),
        ("success_age_p95_seconds",
         "95th percentile age of the last successful refresh (percentile_cont, workspaces that "
         "ever succeeded).", report.success_age_p95_seconds),
        ("last_run_timestamp_seconds",
         "Unix time the most recently started run finished, whatever its outcome.",
         _timestamp(r.last_run_at)),
        ("last_completed_run_timestamp_seconds",
         "Unix time the most recently started completed run finished.",
         _timestamp(r.last_completed_run_at)),
        ("last_success_timestamp_seconds",
         "Unix time the most recently started run that refreshed at least one cache finished.",
         _timestamp(r.last_refreshing_run_at)),
        ("lock_skip_streak",
         "Most recent consecutive runs skipped on the lock (locked or lock-stuck).",
         r.lock_skip_streak),
        ("runs_24h", "Runs started in the last 24 hours (refresh --workspace excluded).",
         r.runs_24h),
        ("runs_failed_24h", "Runs started in the last 24 hours that failed (exit 1).",
         r.runs_failed_24h),
        ("runs_over_budget_24h",
         "Runs started in the last 24 hours that completed but not within their budget.",
         r.runs_over_budget_24h),
        ("run_duration_p50_seconds",
         "Median duration of the runs started in the last 24 hours that were not skipped on "
         "the lock.", _ms_to_seconds(r.run_duration_p50_ms)),
        ("run_duration_p95_seconds",
         "95th percentile duration of the runs started in the last 24 hours that were not "
         "skipped on the lock.", _ms_to_seconds(r.run_duration_p95_ms)),
    ]


def _value(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def escape_label_value(value: str) -> str:
    """A label value as the exposition format wants it: ``\\``, ``"`` and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _family(name: str, help_text: str, samples: Iterator[tuple[str, float]]) -> list[str]:
    lines = [f"# HELP {PREFIX}{name} {_help(help_text)}", f"# TYPE {PREFIX}{name} gauge"]
    lines += [f"{PREFIX}{name}{labels} {_value(value)}" for labels, value in samples]
    return lines


def render_prometheus(
    report: StalenessReport, workspaces: Sequence[WorkspaceStaleness] | None = None
) -> str:
    """The report as Prometheus text (format 0.0.4): one gauge per number, HELP and TYPE.

    A number with no data (None) keeps its HELP and TYPE lines but has no sample, so
    that an alert on it does not fire on a made-up 0. Per-workspace series appear only
    when ``workspaces`` is given.
    """
    lines: list[str] = []
    for name, help_text, value in _gauges(report):
        lines += _family(name, help_text, iter([] if value is None else [("", value)]))
    if workspaces is not None:
        lines += _family(
            "workspace_success_age_seconds",
            "Age of the workspace's last successful refresh (absent until its first).",
            ((f'{{workspace="{escape_label_value(w.workspace_id)}"}}', w.success_age_seconds)
             for w in workspaces if w.success_age_seconds is not None),
        )
        lines += _family(
            "workspace_consecutive_failures",
            "Failed refreshes of the workspace since its last success.",
            ((f'{{workspace="{escape_label_value(w.workspace_id)}"}}', w.consecutive_failures)
             for w in workspaces),
        )
    return "\n".join(lines) + "\n"


def write_textfile(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically, for node_exporter's textfile collector.

    The text goes to a temporary file in the same directory (a dot-file not ending in
    ``.prom``, which the collector ignores), is fsynced, made mode 0644 and renamed over
    ``path``: a reader sees the old file or the new one, never a partial one. On error
    the temporary file is removed and ``path`` is left as it was.
    """
    directory = path.absolute().parent
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    # The rename itself is durable once the directory is synced.
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# --- Nagios / Icinga check ------------------------------------------------------------------


class NagiosStatus(IntEnum):
    """Exit codes of a Nagios plugin (the monitoring-plugins guidelines)."""

    OK = 0
    WARNING = 1
    CRITICAL = 2
    #: The check cannot tell: database unreachable, schema missing, no data at all.
    UNKNOWN = 3


CHECK_NAME = "AVAILABILITY-CRON"


def validate_thresholds(warn: float | None, crit: float | None) -> tuple[float, float] | None:
    """(warn, crit), or None when neither is given; ConfigError unless both are finite
    numbers above 0 with warn <= crit."""
    if warn is None and crit is None:
        return None
    if warn is None or crit is None:
        raise ConfigError("--warn-after and --critical-after must be given together")
    for flag, value in (("--warn-after", warn), ("--critical-after", crit)):
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{flag} must be a number of minutes above 0, got {value}")
    if warn > crit:
        raise ConfigError(
            f"--warn-after must not be above --critical-after, got {_num(warn)} > {_num(crit)}"
        )
    return warn, crit


def _num(value: float) -> str:
    """A plain decimal (no exponent: perfdata parsers choke on 1e+06), no trailing zeros."""
    return f"{value:.6f}".rstrip("0").rstrip(".")


def _state(value: float, warn: float, crit: float) -> NagiosStatus:
    # The plugin-guidelines threshold "N" means "alert when above N": N itself is fine.
    if value > crit:
        return NagiosStatus.CRITICAL
    if value > warn:
        return NagiosStatus.WARNING
    return NagiosStatus.OK


def nagios_unknown(reason: str) -> tuple[NagiosStatus, str]:
    """The UNKNOWN status line for ``reason`` (kept on one line)."""
    return NagiosStatus.UNKNOWN, f"{CHECK_NAME} UNKNOWN - {' '.join(reason.split())}"


def nagios_check(report: StalenessReport, warn: float, crit: float) -> tuple[NagiosStatus, str]:
    """Evaluate the report against thresholds in minutes: (status, one status line).

    Two measures: the data age in minutes, the larger of the oldest success age and the
    time the oldest workspace without any success has existed (as the JSON shows them,
    rounded to 0.01), and the lock-skip streak, read as minutes since runs start every minute.
    Each is WARNING above ``warn`` and CRITICAL above ``crit``; the status is the worse
    of the two. A measure with no data is shown as n/a (perfdata ``U``) and ignored;
    with neither, the status is UNKNOWN.
    """
    # Data that never arrived counts too: a workspace created an hour ago whose refreshes
    # all fail is an hour without data, though it has no "last success" to age.
    waiting = _minutes(report.oldest_never_succeeded_age_seconds)
    ages = [a for a in (report.oldest_success_age_minutes, waiting) if a is not None]
    age = max(ages) if ages else None
    streak = report.runs.lock_skip_streak
    if age is None and streak is None:
        return nagios_unknown(
            "no data: no enabled workspace was ever refreshed successfully and no run is "
            "recorded"
        )
    states = [_state(v, warn, crit) for v in (age, streak) if v is not None]
    status = (NagiosStatus.CRITICAL if NagiosStatus.CRITICAL in states
              else NagiosStatus.WARNING if NagiosStatus.WARNING in states
              else NagiosStatus.OK)

    def shown(value: float | None, suffix: str) -> str:
        if value is None:
            return "n/a"
        text = f"{_num(value)}{suffix}"
        state = _state(value, warn, crit)
        if state is not NagiosStatus.OK:
            text += f" (> {_num(crit if state is NagiosStatus.CRITICAL else warn)})"
        return text

    def perf(label: str, value: float | None) -> str:
        return f"{label}={'U' if value is None else _num(value)};{_num(warn)};{_num(crit)}"

    return status, (
        f"{CHECK_NAME} {status.name} - data age {shown(age, ' min')}, "
        f"lock-skip streak {shown(streak, '')} | "
        f"{perf('data_age_minutes', age)} {perf('lock_skip_streak', streak)}"
    )
