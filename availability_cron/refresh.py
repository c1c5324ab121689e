"""The refresh job: plan the due caches, sweep them through the providers, write each result.

The run, step by step (``run_refresh``):

1. Lock: a session advisory lock on a dedicated connection (:mod:`.lock`). Held by
   another run: return a *skipped* summary naming the holder.
2. Plan: due caches stalest first and missing caches oldest first, read without the
   slot payloads, then :func:`plan` (pure) decides the queue.
3. Sweep: :func:`sweep` runs the queue on a bounded thread pool under the deadline.
4. Write: each batch of finished calls is written as it completes
   (:func:`write_outcomes`); staleness always counts from the last *success*.
5. Summary: a frozen :class:`RunSummary`; the CLI prints it and picks the exit code.
"""

from __future__ import annotations

import functools
import logging
import math
import random
import re
import threading
import traceback
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, TypeVar

from psycopg.rows import class_row
from psycopg.types.json import Jsonb

from . import db, lock, queries
from .clock import iso_utc

# GRACE_SECONDS: how long past the budget calls are waited for (the run's bounds: deadline.py).
from .deadline import CLOSE_SECONDS, GRACE_SECONDS, Deadline, StopRequest, database_left
from .errors import AvailabilityCronError, ConfigError, ConnectionLost
from .providers import (
    FetchRequest,
    PermanentProviderError,
    Provider,
    ProviderRegistry,
    RetryableProviderError,
)
from .providers.scopes import Call, calling
from .settings import Settings, scrub
from .source import caps, row_error, warn_invalid_rows

log = logging.getLogger(__name__)

#: A stored error message is cut to this many characters.
MAX_ERROR_CHARS = 500
#: More slots than this from one workspace is garbage, not availability
#: (30 days of 5-minute slots around the clock is 8,640).
MAX_SLOTS = 20_000
#: Successful caches go stale after TTL minus up to this share of it, at random, so
#: caches refreshed together drift apart instead of all expiring in the same minute.
TTL_JITTER = 0.1
#: Backoff delays are multiplied by a factor from [1 - BACKOFF_JITTER, 1].
BACKOFF_JITTER = 0.2
#: How often the sweep checks that the lock connection (and so the lock) is still alive.
LOCK_CHECK_SECONDS = 1.0
#: A write's server-side bounds end this much before its client-side bound.
SERVER_FIRST_SECONDS = 0.25
ABANDONED_ERROR = (
    "[retryable] timed out: the provider call was still running at the end of the time budget"
)

Reason = Literal["stale", "missing", "requested"]


# --- rows -----------------------------------------------------------------------------------


# provider and provider_config come from the source as they are: provider may be NULL in a
# view, and provider_config is None (with provider_config_error saying why) when it is over
# the caps of source.py. source.row_error() turns either into the workspace's error.


@dataclass(frozen=True)
class DueCache:
    """A cache row whose stale_at has passed (no slots loaded)."""

    workspace_id: str
    provider: str | None
    provider_config: Any
    stale_at: datetime
    refreshed_at: datetime | None
    consecutive_failures: int
    provider_config_error: str | None = None
    #: The source row's created_at: which workspace with this id the cache is written for.
    created_at: datetime | None = None


@dataclass(frozen=True)
class MissingWorkspace:
    """An enabled workspace with no cache row yet."""

    workspace_id: str
    provider: str | None
    provider_config: Any
    #: NULL in a view that breaks the contract: planned after every dated workspace.
    created_at: datetime | None
    provider_config_error: str | None = None


@dataclass(frozen=True)
class WorkspaceState:
    """One workspace and its cache state, for ``refresh --workspace``."""

    workspace_id: str
    provider: str | None
    provider_config: Any
    enabled: bool | None
    created_at: datetime | None
    stale_at: datetime | None
    refreshed_at: datetime | None
    consecutive_failures: int
    has_cache: bool
    provider_config_error: str | None = None


@dataclass(frozen=True)
class PlannedRefresh:
    """One entry of the queue."""

    workspace_id: str
    provider: str
    provider_config: Any
    reason: Reason
    #: stale_at for a stale cache, created_at for a missing one.
    due_since: datetime
    consecutive_failures: int = 0
    #: Why the source row cannot be refreshed (source.row_error): the call then fails
    #: with this as a permanent error, before any provider is touched.
    source_error: str | None = None
    #: The source row's created_at, stored with the result (workspace_created_at): the
    #: write is skipped if the id has meanwhile been reused by a newer workspace.
    created_at: datetime | None = None

    def overdue_seconds(self, now: datetime) -> float:
        return (now - self.due_since).total_seconds()


@dataclass(frozen=True)
class Plan:
    """The queue, in the order work is started."""

    queue: tuple[PlannedRefresh, ...]
    missing_reserved: int

    @property
    def missing(self) -> int:
        return sum(1 for item in self.queue if item.reason == "missing")

    @property
    def stale(self) -> int:
        return sum(1 for item in self.queue if item.reason == "stale")


# --- planning (pure) ------------------------------------------------------------------------


def reserved_for_missing(limit: int, reserve: float) -> int:
    """Slots of the limit kept for missing caches: ceil, so any reserve > 0 keeps at least one."""
    if limit <= 0 or reserve <= 0:
        return 0
    # The small epsilon keeps 0.2 * 5 from rounding up to 2 through float error.
    return min(limit, max(1, math.ceil(limit * reserve - 1e-9)))


def plan(
    due: Sequence[DueCache],
    missing: Sequence[MissingWorkspace],
    *,
    limit: int,
    reserve: float,
    now: datetime,
) -> Plan:
    """Decide which refreshes this run attempts, and in which order.

    - At most ``limit`` entries. ``reserved_for_missing(limit, reserve)`` of them go to
      missing caches (oldest workspace first, those without a created_at last, by id)
      when there are that many; capacity one side leaves unused goes to the other, so
      nothing is wasted.
    - Order: the reserved missing entries first, so that a deadline that cuts the run
      short still starts them; then stale caches, stalest first (``stale_at``
      ascending, ties by id); then any extra missing entries.
    - Entries not yet due at ``now`` (a racing writer pushed them out) are dropped.
    - Each workspace at most once: the reads return one row per workspace_id, but a cache
      row written between them makes a workspace both missing and due (kept as missing).
    """
    new = _first_of_each(sorted(missing, key=lambda m: (m.created_at is None,
                                                        m.created_at or now, m.workspace_id)))
    seen = {m.workspace_id for m in new}
    stale = _first_of_each(sorted(
        (d for d in due if d.stale_at <= now and d.workspace_id not in seen),
        key=lambda d: (d.stale_at, d.workspace_id)))
    limit = max(0, limit)

    reserved = min(len(new), reserved_for_missing(limit, reserve))
    stale_take = min(len(stale), limit - reserved)
    extra_missing = min(len(new) - reserved, limit - reserved - stale_take)

    def as_missing(m: MissingWorkspace) -> PlannedRefresh:
        return PlannedRefresh(m.workspace_id, m.provider or "", m.provider_config, "missing",
                              m.created_at or now, 0,
                              row_error(m.provider, m.provider_config_error), m.created_at)

    queue = [as_missing(m) for m in new[:reserved]]
    queue += [
        PlannedRefresh(d.workspace_id, d.provider or "", d.provider_config, "stale",
                       d.stale_at, d.consecutive_failures,
                       row_error(d.provider, d.provider_config_error), d.created_at)
        for d in stale[:stale_take]
    ]
    queue += [as_missing(m) for m in new[reserved:reserved + extra_missing]]
    return Plan(queue=tuple(queue), missing_reserved=reserved)


_Row = TypeVar("_Row", DueCache, MissingWorkspace)


def _first_of_each(rows: Sequence[_Row]) -> list[_Row]:
    """``rows`` without the later rows of a workspace_id that came before."""
    seen: set[str] = set()
    out = []
    for row in rows:
        if row.workspace_id not in seen:
            seen.add(row.workspace_id)
            out.append(row)
    return out


def success_stale_at(refreshed_at: datetime, ttl: timedelta, rng: random.Random) -> datetime:
    """When a fresh cache becomes due: TTL minus up to TTL_JITTER of it (never later than TTL)."""
    return refreshed_at + ttl * (1.0 - TTL_JITTER * rng.random())


def backoff_delay(
    failures: int,
    *,
    base: timedelta,
    cap: timedelta,
    rng: random.Random,
    retry_after: float | None = None,
) -> timedelta:
    """Delay before retrying after ``failures`` consecutive failures (1 = the first).

    ``base * 2**(failures-1)``, capped at ``cap``, times a jitter factor in
    [1 - BACKOFF_JITTER, 1]; never shorter than the provider's ``retry_after``
    (itself capped at ``cap``, so a hostile header cannot park a workspace for ever).
    """
    # Compare in float seconds before building a timedelta: 2**n overflows it quickly.
    cap_s = cap.total_seconds()
    exponent = min(max(failures, 1) - 1, 64)
    delay_s = min(cap_s, base.total_seconds() * 2.0**exponent)
    delay_s *= 1.0 - BACKOFF_JITTER * rng.random()
    if retry_after is not None and retry_after > 0:  # NaN compares False and is ignored
        delay_s = max(delay_s, min(cap_s, retry_after))
    return timedelta(seconds=delay_s)


# --- provider calls -------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What one provider call produced; exactly one of ``slots`` and ``error`` is set."""

    item: PlannedRefresh
    started_at: datetime
    finished_at: datetime
    window_start: datetime
    window_end: datetime
    slots: tuple[str, ...] | None = None
    error: str | None = None
    retry_after: float | None = None
    #: The call was still running at budget + grace and was given up on.
    abandoned: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None


_SECRET_KEY = re.compile(
    r"(token|secret|password|passwd|api[_-]?key|access[_-]?key|key$|authorization|auth"
    r"|credential|cookie|signature|private)", re.I)
#: What a ``*_env`` key may hold: the name of a variable (as providers._config checks it).
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


def config_secrets(config: Any, environ: Mapping[str, str]) -> list[str]:
    """Values in a provider_config that must never be printed or stored.

    Any string under a key that looks secret (token, secret, password, api_key, ...),
    and the environment value of any ``*_env`` key (e.g. ``token_env``), scoped or not:
    a careless plugin may read and echo a variable the scopes refused. The *name* a
    ``*_env`` key holds is not a secret, set or not (the operator needs it in "token_env
    names X, which is not set"); a value that is no variable name at all is kept secret,
    as it is most likely a token pasted under the wrong key. (This lets a tenant
    whose server echoes guesses tell, from the ``***``, that a guess equals a whole value
    it named; that needs the whole value guessed, where not scrubbing would hand it over.)
    """
    found: list[str] = []

    def visit(value: Any, key: str = "") -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                visit(v, str(k))
        elif isinstance(value, list):
            for v in value:
                visit(v, key)
        elif isinstance(value, str):
            if key.endswith("_env") and _ENV_NAME.fullmatch(value.strip()):
                found.append(environ.get(value.strip(), ""))
            elif _SECRET_KEY.search(key):
                found.append(value)

    visit(config)
    return [s for s in found if s]


def redact_config(config: Any) -> Any:
    """``config`` fit to print: by the rules of :func:`config_secrets`.

    A ``*_env`` key keeps its value, the *name* of a variable (never its value, which is
    not read here); anything else under a key that looks secret becomes ``"***"``,
    whatever its type. Other values are kept as they are.
    """
    def visit(value: Any, key: str = "") -> Any:
        if key.endswith("_env"):
            return value
        if _SECRET_KEY.search(key) and value is not None:
            return "***"
        if isinstance(value, str) and "://" in value:
            return _url_shown(value)
        if isinstance(value, Mapping):
            return {str(k): visit(v, str(k)) for k, v in value.items()}
        if isinstance(value, list):
            return [visit(v, key) for v in value]
        return value

    return visit(config)


def _url_shown(url: str) -> str:
    """A URL fit to print: scheme, host and port only when it carries more.

    Private calendar feeds (Google, iCloud, Outlook) keep their secret in the path, and
    in-house endpoints often in the query: neither is shown."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "***"
    rest = parts.path.strip("/") or parts.query or parts.fragment
    return f"{parts.scheme}://{host}{port}" + ("/***" if rest else "")


def normalize_slots(
    raw: Iterable[datetime], window_start: datetime, window_end: datetime
) -> tuple[str, ...]:
    """Sorted, de-duplicated ISO-8601 UTC instants inside [start, end).

    Instants outside the window are dropped (providers often pad to whole days);
    anything that is not a timezone-aware datetime, or more than MAX_SLOTS of them,
    is a PermanentProviderError: garbage must never reach the cache.
    """
    if isinstance(raw, str | bytes | Mapping) or not isinstance(raw, Iterable):
        raise PermanentProviderError(
            f"provider returned {type(raw).__name__}, expected a list of datetimes"
        )
    instants: set[datetime] = set()
    for count, value in enumerate(raw, start=1):
        if count > MAX_SLOTS:
            raise PermanentProviderError(f"provider returned more than {MAX_SLOTS} slots")
        if not isinstance(value, datetime):
            raise PermanentProviderError(
                f"provider returned a {type(value).__name__} where a datetime was expected"
            )
        if value.tzinfo is None or value.utcoffset() is None:
            raise PermanentProviderError("provider returned a naive datetime (no time zone)")
        try:
            instant = value.astimezone(UTC)
        except OverflowError:  # e.g. 0001-01-01T00:00+05:00
            raise PermanentProviderError("provider returned an instant out of range") from None
        if window_start <= instant < window_end:
            instants.add(instant)
    return tuple(_iso_utc(i) for i in sorted(instants))


@functools.lru_cache(maxsize=1 << 16)
def _iso_utc(instant: datetime) -> str:
    # Cached: formatting dominates the per-refresh CPU cost, and workspaces mostly share
    # the same slot grid (on the hour, on the half hour), so hits are the norm.
    return instant.isoformat().replace("+00:00", "Z")


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def short_error(kind: str, exc: BaseException, secrets: list[str]) -> str:
    """``[kind] message`` on one line, secrets removed, at most MAX_ERROR_CHARS.

    Control characters go: PostgreSQL text cannot hold NUL, and one provider echoing a
    NUL byte must not make every batch write (and so every run) fail.
    """
    # Scrubbed first, folded and cut after: a secret holding a tab or two spaces would no
    # longer match once folded, and a cut before the scrub could leave part of one behind.
    text = " ".join(_CONTROL.sub(" ", scrub(str(exc), secrets)).split()) or type(exc).__name__
    return f"[{kind}] {text}"[:MAX_ERROR_CHARS]


@dataclass(frozen=True)
class CallContext:
    """What a worker needs to turn a PlannedRefresh into an Outcome."""

    registry: ProviderRegistry
    lookahead: timedelta
    deadline: float
    clock: Callable[[], datetime]
    monotonic: Callable[[], float]
    environ: Mapping[str, str]
    secrets: list[str] = field(default_factory=list)


def call_provider(item: PlannedRefresh, ctx: CallContext) -> Outcome:
    """Run one provider call; never raises (every failure becomes an error Outcome)."""
    started = ctx.clock()
    window_start = started.astimezone(UTC).replace(second=0, microsecond=0)
    window_end = window_start + ctx.lookahead
    provider_context = ctx.registry.context
    secrets = ctx.secrets + config_secrets(item.provider_config, ctx.environ)
    slots: tuple[str, ...] | None = None
    error: str | None = None
    retry_after: float | None = None
    # Every secret the provider resolves, and every request it sends, is checked against
    # the operator's scopes for *this* workspace (providers.scopes).
    call = Call(item.workspace_id, provider_context.secret_scopes,
                provider_context.destinations)
    try:
        if item.source_error is not None:
            raise PermanentProviderError(item.source_error)
        if not isinstance(item.provider_config, Mapping):
            raise PermanentProviderError(
                f"provider_config must be a JSON object, got {type(item.provider_config).__name__}"
            )
        # Loaded (once per run) outside the call: a provider's constructor must not run
        # as this workspace's and resolve secrets for the rest of the run.
        provider = ctx.registry.get(item.provider)
        with calling(call):
            slots = _fetch(provider, ctx, item, window_start, window_end)
    except RetryableProviderError as exc:
        error, retry_after = short_error("retryable", exc, secrets), exc.retry_after
    except PermanentProviderError as exc:
        error = short_error("permanent", exc, secrets)
    except Exception as exc:  # a buggy plugin is that workspace's problem, not the run's
        # The traceback's message may hold a token: scrubbed like the stored error.
        log.debug("provider %s raised: %s", item.provider,
                  scrub(traceback.format_exc(), secrets))
        error = short_error(f"unexpected {type(exc).__name__}", exc, secrets)
    return Outcome(item, started, ctx.clock(), window_start, window_end, slots, error, retry_after)


def _fetch(provider: Provider, ctx: CallContext, item: PlannedRefresh, window_start: datetime,
           window_end: datetime) -> tuple[str, ...]:
    provider.validate_config(item.provider_config)
    request = FetchRequest(
        workspace_id=item.workspace_id,
        config=item.provider_config,
        window_start=window_start,
        window_end=window_end,
        deadline=ctx.deadline,
        monotonic=ctx.monotonic,
    )
    return normalize_slots(provider.fetch(request), window_start, window_end)


# --- sweep ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepResult:
    """The counts of one sweep. Always: ``started = succeeded + failed + lost + interrupted``
    and ``len(queue) = started + skipped_deadline + not_started``."""

    #: Calls started.
    started: int
    #: Calls that succeeded, their result written.
    succeeded: int
    #: Calls that failed, their error written (abandoned calls included).
    failed: int
    #: Planned but never started because the deadline margin was reached.
    skipped_deadline: int
    #: Started but still running at budget + grace; recorded as timeouts (part of failed).
    abandoned: int
    #: Successes not written because a newer success was already stored (part of succeeded).
    superseded: int
    missing_started: int
    stale_started: int
    #: Finished calls whose results were never stored: their batch's write failed, or the
    #: run stopped (a lost connection) before writing them.
    lost: int = 0
    #: Calls still running when the run stopped early (a lost connection, a signal): not
    #: waited for, nothing stored.
    interrupted: int = 0
    #: Planned but never started because the run stopped early (not the deadline).
    not_started: int = 0
    #: Why the sweep stopped early on request (a signal's name), if it did.
    stopped: str | None = None
    #: The error that kept the results finished at the stop from being written, if any.
    stop_error: str | None = None


@dataclass(frozen=True)
class SweepProgress:
    """The counts so far, for a progress display (see ``on_progress`` of :func:`sweep`)."""

    planned: int
    started: int
    #: Calls whose outcome has been written (succeeded + failed).
    done: int
    succeeded: int
    failed: int


Writer = Callable[[Sequence[Outcome]], int]


def sweep(
    queue: Sequence[PlannedRefresh],
    *,
    call: Callable[[PlannedRefresh], Outcome],
    write: Writer,
    concurrency: int,
    deadline: float,
    margin: float,
    grace: float = GRACE_SECONDS,
    clock: Callable[[], datetime],
    monotonic: Callable[[], float],
    alive: Callable[[], bool] | None = None,
    on_progress: Callable[[SweepProgress], None] | None = None,
    stop: StopRequest | None = None,
) -> SweepResult:
    """Run ``queue`` in order on ``concurrency`` threads and ``write`` results as they finish.

    No call starts once less than ``margin`` seconds are left before ``deadline``
    (monotonic). Finished calls are replaced by new ones *before* their results are
    written, so workers never idle behind the database; results are written in
    batches of up to FLUSH_ROWS, at most FLUSH_SECONDS after they arrive, and all of
    them before this returns. Calls still running at ``deadline + grace`` are
    abandoned: an error Outcome is written for each and the function returns without
    waiting for their threads (the caller must then end the process without joining
    them; see ``cli._exit``). ``write`` returns how many successes it actually stored.

    ``alive`` (the lock check) is called every LOCK_CHECK_SECONDS whatever else happens;
    once it returns False no call starts, what finished is written (the write rules make
    that safe) and ConnectionLost is raised. Any AvailabilityCronError raised here
    carries the counts so far in ``partial`` (a SweepResult).

    ``on_progress`` (a display) is called on this thread when the sweep starts and after
    each written batch; it must be quick. If it raises, it is not called again and the
    sweep goes on.

    ``stop`` is read at least every STOP_POLL_SECONDS: once requested, no call starts,
    the calls still running are left (counted as interrupted), what finished is written
    (a failure to write it is kept in ``stop_error``, those results counted as lost) and
    the result carries ``stopped``.
    """
    state = _Sweep(queue, call, write, concurrency, deadline, margin, grace, clock,
                   monotonic, alive, on_progress, stop)
    try:
        return state.run()
    except AvailabilityCronError as exc:
        state.give_up()
        exc.partial = state.result()  # type: ignore[attr-defined]
        raise


#: A batch of results is written once it has this many rows...
FLUSH_ROWS = 100
#: ...or once its oldest result has waited this long, whichever comes first.
FLUSH_SECONDS = 0.2
#: The longest the sweep goes without looking at a stop request.
STOP_POLL_SECONDS = 0.1


class _Sweep:
    """The state of one sweep; see :func:`sweep` for the contract."""

    def __init__(
        self,
        queue: Sequence[PlannedRefresh],
        call: Callable[[PlannedRefresh], Outcome],
        write: Writer,
        concurrency: int,
        deadline: float,
        margin: float,
        grace: float,
        clock: Callable[[], datetime],
        monotonic: Callable[[], float],
        alive: Callable[[], bool] | None = None,
        on_progress: Callable[[SweepProgress], None] | None = None,
        stop: StopRequest | None = None,
    ) -> None:
        self.queue, self.call, self.write = queue, call, write
        self.stop = stop
        self.stopped: str | None = None
        self.stop_error: str | None = None
        self.alive = alive
        self.on_progress = on_progress
        self.next_check = monotonic() + LOCK_CHECK_SECONDS
        self.concurrency, self.deadline, self.margin, self.grace = (
            concurrency, deadline, margin, grace)
        self.clock, self.monotonic = clock, monotonic
        self.items: Iterator[PlannedRefresh] = iter(queue)
        self.exhausted = False
        self.pending: dict[Future[Outcome], PlannedRefresh] = {}
        # When each call was submitted: an abandoned call's failure must carry its real
        # start, so that it cannot override a success stored by someone else meanwhile.
        self.submitted_at: dict[Future[Outcome], datetime] = {}
        self.unwritten: list[Outcome] = []
        self.oldest_unwritten = 0.0
        self.started = self.missing_started = self.stale_started = 0
        self.succeeded = self.failed = self.superseded = self.abandoned = 0
        self.lost = self.interrupted = 0
        #: The deadline margin, not an early stop, is why the rest of the queue did not start.
        self.deadline_reached = False

    def run(self) -> SweepResult:
        executor = ThreadPoolExecutor(max_workers=self.concurrency,
                                      thread_name_prefix="refresh")
        self._report()
        try:
            while True:
                if self.stop is not None and self.stop.reason is not None:
                    self._stop_early(self.stop.reason)
                    break
                self._check_alive()
                self._fill(executor)
                if not self.pending:
                    break
                remaining = self.deadline + self.grace - self.monotonic()
                if remaining <= 0:
                    self._abandon_pending()
                    break
                if self.unwritten:
                    flush_in = self.oldest_unwritten + FLUSH_SECONDS - self.monotonic()
                    remaining = min(remaining, max(0.0, flush_in))
                if self.alive is not None:
                    remaining = min(remaining, max(0.0, self.next_check - self.monotonic()))
                if self.stop is not None:
                    remaining = min(remaining, STOP_POLL_SECONDS)
                done, _ = wait(self.pending, timeout=remaining, return_when=FIRST_COMPLETED)
                for future in done:
                    del self.pending[future]
                    del self.submitted_at[future]
                    self._collect(future.result())
                self._fill(executor)  # new work first: workers must not wait on the write
                self._flush(force=not self.pending)
            self._flush(force=True)
        finally:
            executor.shutdown(wait=False, cancel_futures=True)
        return self.result()

    def result(self) -> SweepResult:
        left = len(self.queue) - self.started
        return SweepResult(
            started=self.started,
            succeeded=self.succeeded,
            failed=self.failed,
            skipped_deadline=left if self.deadline_reached else 0,
            abandoned=self.abandoned,
            superseded=self.superseded,
            missing_started=self.missing_started,
            stale_started=self.stale_started,
            lost=self.lost,
            interrupted=self.interrupted,
            not_started=0 if self.deadline_reached else left,
            stopped=self.stopped,
            stop_error=self.stop_error,
        )

    def _stop_early(self, reason: str) -> None:
        log.warning("%s received: starting no more calls; writing what finished, leaving "
                    "%d calls running", reason, len(self.pending))
        self.stopped = reason
        self.exhausted = True
        self.interrupted += len(self.pending)
        self.pending.clear()
        self.submitted_at.clear()
        try:
            self._flush(force=True)
        except AvailabilityCronError as exc:  # counted as lost; the stop is still the story
            self.stop_error = exc.message

    def give_up(self) -> None:
        """The sweep is failing: count what finished but was not written as lost, and the
        calls still running as interrupted (neither is waited for)."""
        self.exhausted = True
        self.lost += len(self.unwritten)
        self.unwritten = []
        self.interrupted += len(self.pending)
        self.pending.clear()
        self.submitted_at.clear()

    def _check_alive(self) -> None:
        if self.alive is None or self.monotonic() < self.next_check:
            return
        self.next_check = self.monotonic() + LOCK_CHECK_SECONDS
        if self.alive():
            return
        self.exhausted = True  # start nothing more; keep what finished
        self._flush(force=True)
        raise ConnectionLost(
            "the lock connection was lost mid-run; stopping so that runs cannot overlap"
        )

    def _fill(self, executor: ThreadPoolExecutor) -> None:
        while not self.exhausted and len(self.pending) < self.concurrency:
            if self.stop is not None and self.stop.requested():
                return
            if self.deadline - self.monotonic() < self.margin:
                self.exhausted = self.deadline_reached = True
                return
            item = next(self.items, None)
            if item is None:
                self.exhausted = True
                return
            submitted = self.clock()
            future = executor.submit(self.call, item)
            self.pending[future] = item
            self.submitted_at[future] = submitted
            self.started += 1
            self.missing_started += item.reason == "missing"
            self.stale_started += item.reason == "stale"

    def _collect(self, outcome: Outcome) -> None:
        if not self.unwritten:
            self.oldest_unwritten = self.monotonic()
        self.unwritten.append(outcome)

    def _flush(self, *, force: bool) -> None:
        if not self.unwritten:
            return
        due = self.monotonic() - self.oldest_unwritten >= FLUSH_SECONDS
        if not (force or due or len(self.unwritten) >= FLUSH_ROWS):
            return
        batch, self.unwritten = self.unwritten, []
        try:
            stored = self.write(batch)
        except BaseException:
            self.lost += len(batch)
            raise
        ok = sum(1 for o in batch if o.ok)
        self.succeeded += ok
        self.failed += len(batch) - ok
        self.superseded += ok - stored
        # Counted once written: an abandoned call whose timeout was never stored is lost.
        self.abandoned += sum(1 for o in batch if o.abandoned)
        self._report()

    def _report(self) -> None:
        if self.on_progress is None:
            return
        try:
            self.on_progress(SweepProgress(
                planned=len(self.queue), started=self.started,
                done=self.succeeded + self.failed, succeeded=self.succeeded,
                failed=self.failed,
            ))
        except Exception:  # a display must never stop the run
            log.debug("progress display failed; not calling it again", exc_info=True)
            self.on_progress = None

    def _abandon_pending(self) -> None:
        now = self.clock()
        for future, item in self.pending.items():
            self._collect(Outcome(item, self.submitted_at[future], now, now, now,
                                  error=ABANDONED_ERROR, abandoned=True))
        self.pending.clear()
        self.submitted_at.clear()


# --- database side --------------------------------------------------------------------------


def fetch_due(conn: db.Connection, source: str, now: datetime, limit: int) -> list[DueCache]:
    # Binary results: timestamps read whatever the DateStyle (see db.py).
    with conn.cursor(row_factory=class_row(DueCache), binary=True) as cur:
        cur.execute(queries.with_source(queries.DUE_CACHES, source),
                    {"now": now, "limit": limit, **caps()})
        return cur.fetchall()


def fetch_missing(conn: db.Connection, source: str, limit: int) -> list[MissingWorkspace]:
    """Missing caches, without the rows that cannot be cached (source.fetch_invalid_rows)."""
    # Binary results: timestamps read whatever the DateStyle (see db.py).
    with conn.cursor(row_factory=class_row(MissingWorkspace), binary=True) as cur:
        cur.execute(queries.with_source(queries.MISSING_CACHES, source),
                    {"limit": limit, **caps()})
        return cur.fetchall()


def fetch_workspace(conn: db.Connection, source: str, workspace_id: str) -> WorkspaceState | None:
    # Binary results: timestamps read whatever the DateStyle (see db.py).
    with conn.cursor(row_factory=class_row(WorkspaceState), binary=True) as cur:
        cur.execute(queries.with_source(queries.ONE_WORKSPACE, source),
                    {"workspace_id": workspace_id, **caps()})
        return cur.fetchone()


@dataclass(frozen=True)
class WritePolicy:
    ttl: timedelta
    max_backoff: timedelta
    rng: random.Random
    #: The source relation: nothing is written for a workspace no longer in it.
    source: str = "availability_workspaces"


def write_outcomes(conn: db.Connection, outcomes: Sequence[Outcome], policy: WritePolicy) -> int:
    """Store a batch of outcomes in one transaction; return how many successes were stored.

    Success: slots, window, fetched_at = refreshed_at = the call's finish time,
    stale_at = that + TTL (jittered), error cleared. Failure: only the attempt, the
    error and a backed-off stale_at; slots, range and refreshed_at are left alone.
    Neither is stored for a workspace gone from ``policy.source`` meanwhile, nor over the
    row of a newer workspace with the same id (queries.STILL_IN_SOURCE); a success not
    stored counts as superseded.
    """
    successes = [
        {
            "workspace_id": o.item.workspace_id,
            "slots": Jsonb(list(o.slots or ())),
            "slot_count": len(o.slots or ()),
            "range_start": o.window_start,
            "range_end": o.window_end,
            "fetched_at": o.finished_at,
            "refreshed_at": o.finished_at,
            "stale_at": success_stale_at(o.finished_at, policy.ttl, policy.rng),
            "workspace_created_at": o.item.created_at,
        }
        for o in outcomes
        if o.ok
    ]
    failures = [
        {
            "workspace_id": o.item.workspace_id,
            "fetched_at": o.finished_at,
            "attempt_started_at": o.started_at,
            "error": o.error,
            "stale_at": o.finished_at
            + backoff_delay(
                o.item.consecutive_failures + 1,
                base=policy.ttl,
                cap=policy.max_backoff,
                rng=policy.rng,
                retry_after=o.retry_after,
            ),
            "workspace_created_at": o.item.created_at,
        }
        for o in outcomes
        if not o.ok
    ]
    stored = 0
    with conn.transaction(), conn.cursor() as cur:
        if successes:
            cur.executemany(queries.with_source(queries.WRITE_SUCCESS, policy.source), successes)
            stored = max(cur.rowcount, 0)
        if failures:
            cur.executemany(queries.with_source(queries.WRITE_FAILURE, policy.source), failures)
    for o in outcomes:
        if not o.ok:
            log.warning("workspace %s: %s", o.item.workspace_id, o.error)
    return stored


#: Most orphan cache rows one run deletes: a backlog (a mass deletion of workspaces) is
#: worked off over the next runs, each statement staying short.
ORPHAN_PRUNE_BATCH = 1000


def prune_orphans(conn: db.Connection, source: str) -> int:
    """Delete up to ORPHAN_PRUNE_BATCH cache rows of workspaces no longer in ``source`` (none
    when it has no row at all: queries.PRUNE_ORPHAN_CACHES); return how many."""
    cur = conn.execute(queries.with_source(queries.PRUNE_ORPHAN_CACHES, source),
                       {"batch": ORPHAN_PRUNE_BATCH})
    return max(cur.rowcount, 0)


# --- the run --------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSummary:
    """The one JSON object a run prints (keys as the dashboards know them).

    The counts always add up: ``attempted = refreshed + errors + lost + interrupted`` and
    ``planned = attempted + skippedDeadline + notStarted``; ``superseded`` is part of
    ``refreshed`` and ``unfinished`` part of ``errors``.
    """

    success: bool
    skipped: bool
    reason: str | None
    run_id: str
    started_at: datetime
    duration_ms: int
    time_budget_ms: int
    concurrency: int
    limit: int
    planned: int = 0
    attempted: int = 0
    refreshed: int = 0
    errors: int = 0
    missing_attempted: int = 0
    stale_attempted: int = 0
    skipped_deadline: int = 0
    unfinished: int = 0
    superseded: int = 0
    #: Finished calls whose results could not be stored (see SweepResult.lost).
    lost: int = 0
    #: Calls still running when the run stopped early (see SweepResult.interrupted).
    interrupted: int = 0
    #: Planned but not started because the run stopped early (see SweepResult.not_started).
    not_started: int = 0
    #: Source rows breaking the contract on a key column (source.InvalidRows), named in a
    #: WARNING: skipped, or (a NULL created_at) planned after every dated workspace.
    invalid_source_rows: int = 0
    #: Cache rows of workspaces gone from the source, deleted by this run (prune_orphans).
    pruned_caches: int = 0
    finished_within_budget: bool = False
    workspace: str | None = None
    holder: dict[str, object] | None = None
    error: str | None = None

    def as_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "success": self.success,
            "skipped": self.skipped,
            "reason": self.reason,
            "runId": self.run_id,
            "startedAt": iso_utc(self.started_at),
            "durationMs": self.duration_ms,
            "timeBudgetMs": self.time_budget_ms,
            "concurrency": self.concurrency,
            "limit": self.limit,
            "planned": self.planned,
            "attempted": self.attempted,
            "refreshed": self.refreshed,
            "errors": self.errors,
            "missingAttempted": self.missing_attempted,
            "staleAttempted": self.stale_attempted,
            "skippedDeadline": self.skipped_deadline,
            "unfinished": self.unfinished,
            "superseded": self.superseded,
            "lost": self.lost,
            "interrupted": self.interrupted,
            "notStarted": self.not_started,
            "invalidSourceRows": self.invalid_source_rows,
            "prunedCaches": self.pruned_caches,
            "finishedWithinBudget": self.finished_within_budget,
        }
        if self.workspace is not None:
            out["workspace"] = self.workspace
        if self.holder is not None:
            out["holder"] = self.holder
        if self.error is not None:
            out["error"] = self.error
        return out


@dataclass(frozen=True)
class Runtime:
    """The run's collaborators: clocks, randomness, connections and providers."""

    run_id: str
    #: time.monotonic() at process start; the deadline counts from here.
    started_monotonic: float
    clock: Callable[[], datetime]
    monotonic: Callable[[], float]
    rng: random.Random
    #: purpose ("lock", "work") -> a new autocommit connection
    connect: Callable[[str], db.Connection]
    registry: ProviderRegistry
    environ: Mapping[str, str]

    def started_at(self) -> datetime:
        return self.clock() - timedelta(seconds=self.monotonic() - self.started_monotonic)

    def elapsed_ms(self) -> int:
        return int((self.monotonic() - self.started_monotonic) * 1000)


def _summary(settings: Settings, rt: Runtime, **fields: Any) -> RunSummary:
    return RunSummary(
        run_id=rt.run_id,
        started_at=rt.started_at(),
        duration_ms=rt.elapsed_ms(),
        time_budget_ms=settings.time_budget_ms,
        concurrency=settings.concurrency,
        limit=settings.limit,
        **fields,
    )


def _sweep_summary(
    settings: Settings, rt: Runtime, planned: int, result: SweepResult, **fields: Any
) -> RunSummary:
    duration_ms = rt.elapsed_ms()
    return _summary(
        settings,
        rt,
        planned=planned,
        attempted=result.started,
        refreshed=result.succeeded,
        errors=result.failed,
        missing_attempted=result.missing_started,
        stale_attempted=result.stale_started,
        skipped_deadline=result.skipped_deadline,
        unfinished=result.abandoned,
        superseded=result.superseded,
        lost=result.lost,
        interrupted=result.interrupted,
        not_started=result.not_started,
        finished_within_budget=(
            result.skipped_deadline == 0
            and result.not_started == 0
            and result.abandoned == 0
            and result.lost == 0
            and result.interrupted == 0
            and duration_ms <= settings.time_budget_ms
        ),
        **fields,
    )


def _run_sweep(
    settings: Settings,
    rt: Runtime,
    work: db.Connection,
    queue: Sequence[PlannedRefresh],
    *,
    alive: Callable[[], bool] | None = None,
    on_progress: Callable[[SweepProgress], None] | None = None,
    invalid_source_rows: int = 0,
    stop: StopRequest | None = None,
) -> SweepResult:
    deadline = rt.started_monotonic + settings.time_budget_ms / 1000
    secrets = settings.secrets()
    ctx = CallContext(
        registry=rt.registry,
        lookahead=timedelta(days=settings.lookahead_days),
        deadline=deadline,
        clock=rt.clock,
        monotonic=rt.monotonic,
        environ=rt.environ,
        secrets=secrets,
    )
    policy = WritePolicy(
        ttl=timedelta(milliseconds=settings.cache_ttl_ms),
        max_backoff=timedelta(milliseconds=settings.max_backoff_ms),
        rng=rt.rng,
        source=settings.source_table,
    )

    bounds = Deadline.of(rt.started_monotonic, settings.time_budget_ms, rt.monotonic)

    def left() -> float:
        return database_left(bounds, stop)

    def write(outcomes: Sequence[Outcome]) -> int:
        left_now = left()
        # The server's bounds, local to the write's transaction (DATABASE_URL may be a
        # transaction pooler), stop a lock wait, a little before the client's, which stop
        # a silent network: the server's error says what held the write.
        server_ms = max(100, int((left_now - SERVER_FIRST_SECONDS) * 1000))
        with db.translate_errors(secrets), db.answer_within(left, work), \
                db.bounded_transaction(work, server_ms):
            return write_outcomes(work, outcomes, policy)

    try:
        return sweep(
            queue,
            call=lambda item: call_provider(item, ctx),
            write=write,
            concurrency=settings.concurrency,
            deadline=deadline,
            margin=settings.deadline_margin_ms / 1000,
            clock=rt.clock,
            monotonic=rt.monotonic,
            alive=alive,
            on_progress=on_progress,
            stop=stop,
        )
    except AvailabilityCronError as exc:
        partial = getattr(exc, "partial", None)
        if isinstance(partial, SweepResult):
            reason, error = "error", exc.message
            if stop is not None and stop.reason is not None:  # it failed while stopping
                reason, error = "terminated", f"stopped by {stop.reason}, then: {exc.message}"
            exc.summary = _sweep_summary(
                settings, rt, len(queue), partial, success=False, skipped=False,
                reason=reason, error=error, invalid_source_rows=invalid_source_rows,
            )
        raise
    finally:
        _close_bounded(rt.registry)


def _close_bounded(registry: ProviderRegistry, seconds: float = CLOSE_SECONDS) -> None:
    """Close the providers, but never wait more than ``seconds``: a plugin's close() may hang
    on a worker that is itself hung, and the lock must still be released."""
    closer = threading.Thread(target=registry.close, name="refresh-close", daemon=True)
    closer.start()
    closer.join(seconds)
    if closer.is_alive():
        log.warning("providers did not close within %.0fs; leaving them", seconds)


def run_refresh(
    settings: Settings,
    rt: Runtime,
    *,
    default_source: str,
    on_progress: Callable[[SweepProgress], None] | None = None,
    stop: StopRequest | None = None,
) -> RunSummary:
    """The cron run: lock, plan, sweep, summary. Raises AvailabilityCronError on real failures.

    ``on_progress``: see :func:`sweep` (the CLI passes a display when stderr is a terminal).
    ``stop`` (the CLI's SIGTERM/SIGINT handler sets it): the sweep stops early, and the
    summary is a failure with reason "terminated" (nothing else changes; a stop requested
    after the sweep ended is ignored: the run is already reporting).
    """
    secrets = settings.secrets()
    bounds = Deadline.of(rt.started_monotonic, settings.time_budget_ms, rt.monotonic)
    with db.translate_errors(secrets):
        lock_conn = rt.connect("lock")

        def answering(*conns: db.Connection) -> AbstractContextManager[None]:
            # Every round trip waits at most for what is left of budget + grace, or of the
            # stop's bound once a stop is requested (deadline.py).
            return db.answer_within(lambda: database_left(bounds, stop), *conns)

        try:
            with rt.connect("work") as work:
                with answering(lock_conn, work):
                    # First: a lock taken in another database, or on a server session that
                    # a pooler shares with the work connection, keeps nothing apart.
                    db.ensure_same_database(lock_conn, work)
                    db.ensure_primary(lock_conn)
                    # The work connection writes: it may have a role, or a pooler's database,
                    # of its own, and a read-only one must stop the run before any call.
                    db.ensure_writable(work)
                    db.ensure_schema(lock_conn, settings.source_table, default_source)
                with lock.take(lock_conn, settings.lock_key,
                               guard=lambda: answering(lock_conn)) as taken:
                    if taken is None:
                        with answering(lock_conn):
                            holder = lock.find_holder(lock_conn, settings.lock_key)
                        return _skipped(settings, rt, holder)
                    now = rt.clock()
                    with answering(work):
                        the_plan, invalid = _plan_now(work, settings, now)
                    log.info(
                        "planned %d refreshes (%d missing, %d stale)",
                        len(the_plan.queue), the_plan.missing, the_plan.stale,
                    )
                    result = _run_sweep(
                        settings, rt, work, the_plan.queue,
                        alive=taken.alive,
                        on_progress=on_progress,
                        invalid_source_rows=invalid,
                        stop=stop,
                    )
                    if result.stopped is not None:
                        return _sweep_summary(
                            settings, rt, len(the_plan.queue), result,
                            success=False, skipped=False, reason="terminated",
                            invalid_source_rows=invalid, error=_stopped_error(result),
                        )
                    with answering(work):
                        pruned = _prune_orphans(settings, rt, work)
                    return _sweep_summary(
                        settings, rt, len(the_plan.queue), result,
                        success=True, skipped=False, reason=None,
                        invalid_source_rows=invalid, pruned_caches=pruned,
                    )
        finally:
            lock_conn.close()


def _prune_orphans(settings: Settings, rt: Runtime, work: db.Connection) -> int:
    """prune_orphans, bounded like a write; a failure is logged, never the run's: every
    result is already written, and the rows are pruned by a later run."""
    left_ms = int((rt.started_monotonic + settings.time_budget_ms / 1000 + GRACE_SECONDS
                   - rt.monotonic()) * 1000)
    try:
        with (db.translate_errors(settings.secrets()),
              db.bounded_transaction(work, max(1000, left_ms))):
            pruned = prune_orphans(work, settings.source_table)
    except AvailabilityCronError as exc:
        log.warning("cache rows of removed workspaces not pruned (a later run will): %s",
                    exc.message)
        return 0
    if pruned:
        log.info("pruned %d cache rows of workspaces no longer in %s", pruned,
                 settings.source_table)
    return pruned


def _stopped_error(result: SweepResult) -> str:
    error = (f"stopped by {result.stopped}: {result.not_started} planned refreshes not "
             f"started, {result.interrupted} calls left running")
    if result.stop_error is not None:
        error += f"; {result.lost} finished results could not be written: {result.stop_error}"
    return error


def stuck_after_seconds(settings: Settings) -> float:
    """A holder older than this cannot be a healthy run (lock.stuck_after_seconds)."""
    return lock.stuck_after_seconds(settings.time_budget_ms)


def _skipped(settings: Settings, rt: Runtime, holder: lock.LockHolder | None) -> RunSummary:
    """The summary of a run that found the lock held: fine, unless the holder is stuck.

    A skip is exit 0, but a holder older than stuck_after_seconds() means every run
    is being skipped by something that is not working (a wedged process, a vanished
    host): that is a real failure, reported as reason "lock-stuck" with exit 1.

    A holder that is not an availability-cron run (an app's session that took the key)
    is never judged stuck: its age is its session's (a pooled session may be days old
    and have taken the key a moment ago), and PostgreSQL does not say since when it has
    held the lock. The run is skipped as "locked", with a WARNING naming the holder; one
    that keeps the lock shows as a growing lockSkipStreak in `metrics`.
    """
    held = holder.held_for_seconds if holder else None
    limit = stuck_after_seconds(settings)
    if holder is not None and holder.foreign and holder.visible:
        log.warning("the refresh lock is held by backend pid %s (%s), which is not an "
                    "availability-cron run; skipping this run", holder.pid,
                    holder.application_name or "no application name")
    elif held is not None and held > limit:
        assert holder is not None
        log.error("the lock has been held by pid %s for %.0fs", holder.pid, held)
        return _summary(
            settings, rt, success=False, skipped=True, reason="lock-stuck",
            holder=holder.as_json(),
            error=(f"the refresh lock has been held for {held:.0f}s by backend pid "
                   f"{holder.pid} ({holder.application_name}), longer than any run may take "
                   f"({limit:.0f}s); if that process is wedged, end it with "
                   f"SELECT pg_terminate_backend({holder.pid})"),
        )
    else:
        log.info("another run holds the lock; skipping")
    return _summary(
        settings, rt, success=True, skipped=True, reason="locked", finished_within_budget=True,
        holder=holder.as_json() if holder else None,
    )


def refresh_workspace(
    settings: Settings, rt: Runtime, workspace_id: str, *, default_source: str
) -> RunSummary:
    """Refresh one workspace now, whatever its staleness, through the same write path.

    Takes no lock (an engineer must not wait for the cron run); the write path's
    newer-success-wins rule keeps a concurrent cron run from being overwritten by
    older data. ``success`` is False when that one refresh failed.
    """
    secrets = settings.secrets()
    bounds = Deadline.of(rt.started_monotonic, settings.time_budget_ms, rt.monotonic)
    with db.translate_errors(secrets), rt.connect("work") as work:
        with db.answer_within(bounds.database_left, work):
            db.ensure_writable(work)
            db.ensure_schema(work, settings.source_table, default_source)
            state = fetch_workspace(work, settings.source_table, workspace_id)
        if state is None:
            raise ConfigError(
                f"--workspace: no workspace {workspace_id!r} in {settings.source_table}"
            )
        if not state.enabled:
            raise ConfigError(f"--workspace: workspace {workspace_id!r} is disabled")
        item = PlannedRefresh(
            state.workspace_id, state.provider or "", state.provider_config, "requested",
            # A NULL created_at (a view) does not keep an engineer from refreshing it.
            state.stale_at or state.created_at or rt.clock(), state.consecutive_failures,
            row_error(state.provider, state.provider_config_error), state.created_at,
        )
        result = _run_sweep(settings, rt, work, [item])
        if result.succeeded == 1:
            error = None
        elif result.started == 0:
            error = "not started: less than the deadline margin was left of the time budget"
        else:
            error = "the refresh of this workspace failed (see last_error in its cache row)"
        return _sweep_summary(
            settings, rt, 1, result, success=error is None, skipped=False, reason=None,
            workspace=workspace_id, error=error,
        )


@dataclass(frozen=True)
class DryRun:
    """What a run would do now: the queue in order, and whether the lock is held."""

    at: datetime
    plan: Plan
    #: None on a hot standby, which cannot see the primary's lock.
    lock_held: bool | None
    holder: dict[str, object] | None
    limit: int
    #: Source rows breaking the contract on a key column (source.InvalidRows).
    invalid_source_rows: int = 0

    def as_json(self) -> dict[str, object]:
        return {
            "dryRun": True,
            "at": iso_utc(self.at),
            "limit": self.limit,
            "planned": len(self.plan.queue),
            "missingPlanned": self.plan.missing,
            "stalePlanned": self.plan.stale,
            "missingReserved": self.plan.missing_reserved,
            "invalidSourceRows": self.invalid_source_rows,
            "lockHeld": self.lock_held,
            "holder": self.holder,
            "queue": [
                {
                    "position": i,
                    "workspaceId": item.workspace_id,
                    "provider": item.provider or None,
                    "reason": item.reason,
                    "overdueSeconds": round(item.overdue_seconds(self.at), 1),
                    "consecutiveFailures": item.consecutive_failures,
                    # The permanent error the call would end in, without calling anything.
                    "sourceError": item.source_error,
                }
                for i, item in enumerate(self.plan.queue, start=1)
            ],
        }


def _plan_now(conn: db.Connection, settings: Settings, now: datetime) -> tuple[Plan, int]:
    """The two planning reads, the plan, and the source's invalid rows (warned about once)."""
    the_plan = plan(
        fetch_due(conn, settings.source_table, now, settings.limit),
        fetch_missing(conn, settings.source_table, settings.limit),
        limit=settings.limit,
        reserve=settings.missing_reserve,
        now=now,
    )
    return the_plan, warn_invalid_rows(conn, settings.source_table)


def dry_run(settings: Settings, rt: Runtime, *, default_source: str) -> DryRun:
    """Plan without taking the lock, calling a provider or writing anything."""
    with db.translate_errors(settings.secrets()), rt.connect("dry-run") as conn:
        db.ensure_schema(conn, settings.source_table, default_source)
        now = rt.clock()
        the_plan, invalid = _plan_now(conn, settings, now)
        if lock.on_standby(conn):  # the plan reads fine on a replica; the lock does not
            log.warning("dry run: lockHeld is unknown: %s", lock.STANDBY_HINT)
            holder, lock_held = None, None
        else:
            holder = lock.find_holder(conn, settings.lock_key)
            lock_held = holder is not None
        return DryRun(
            at=now,
            plan=the_plan,
            lock_held=lock_held,
            holder=holder.as_json() if holder else None,
            limit=settings.limit,
            invalid_source_rows=invalid,
        )


__all__ = [
    "DryRun",
    "DueCache",
    "MissingWorkspace",
    "Outcome",
    "Plan",
    "PlannedRefresh",
    "RunSummary",
    "Runtime",
    "SweepProgress",
    "SweepResult",
    "backoff_delay",
    "dry_run",
    "plan",
    "refresh_workspace",
    "run_refresh",
    "sweep",
]
