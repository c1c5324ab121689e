"""The ``ics`` provider: free slots computed from an iCalendar (RFC 5545) feed.

The feed is read from ``url`` (one GET through the run's HTTP session) or from ``path``
(a local file, only inside the directory named by AVAILABILITY_CRON_ICS_FILE_ROOT).
Every VEVENT occurrence in the window is busy time, except transparent
(``TRANSP:TRANSPARENT``) and cancelled (``STATUS:CANCELLED``) ones; recurrence (RRULE,
RDATE, EXDATE, moved or modified instances) is expanded by ``recurring_ical_events``.
Free slots are then laid on the weekly working ``hours`` in the workspace's ``timezone``.
See docs/providers/ics.md.

provider_config keys:
  url                 (http, https or webcal URL)  the feed; or else
  path                (string)                     a file inside AVAILABILITY_CRON_ICS_FILE_ROOT
  timezone            (IANA name, required)        working hours, all-day and floating times
  hours               (object, Mon-Fri 09-17)      {"mon": [["09:00", "17:00"]], ...}
  slot_minutes        (int 5..480, default 30)     slot length and step
  min_notice_minutes  (int, default 0)             no slot starts sooner than this
  token / token_env   (optional, url only)         sent as ``Authorization: Bearer``
  headers             (object, optional, url only) extra request headers

"Now", for min_notice_minutes, is the request's ``window_start``: the job starts the
window at its own clock reading for this call (to the minute), so the provider needs no
clock of its own and a test controls "now" through the window it asks for.
"""

from __future__ import annotations

import bisect
import errno
import logging
import math
import os
import re
import stat
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import icalendar
import recurring_ical_events  # type: ignore[import-untyped]  # ships no py.typed

from ._body import MAX_BODY_BYTES
from ._config import ConfigReader
from ._memory import Reservation
from .base import (
    FetchRequest,
    PermanentProviderError,
    Provider,
    ProviderContext,
    RetryableProviderError,
)

log = logging.getLogger(__name__)

#: The only directory ``path`` feeds may be read from; unset means no local files at all.
FILE_ROOT_ENV = "AVAILABILITY_CRON_ICS_FILE_ROOT"
#: More event occurrences than this in the (padded) window is an error, not a calendar.
MAX_OCCURRENCES = 50_000
#: Recurrence rules are expanded from their DTSTART (dateutil walks every period up to
#: the window), at a few microseconds and ~60-100 bytes a step (dateutil keeps each
#: instance); past this many steps the feed is refused before any expansion, so one
#: hostile RRULE cannot hold a worker (and the GIL) for seconds, nor 50 MB of memory.
MAX_RULE_STEPS = 250_000
#: The Accept header of feed requests: the job's own, so it is sent on every redirect hop.
FEED_ACCEPT = "text/calendar, text/plain;q=0.9, */*;q=0.5"
#: What parsing and expanding costs, in bytes of memory (peak RSS, measured with icalendar
#: 7.3 and recurring_ical_events 3.8; benchmarks/README.md): per VEVENT (its parsed
#: component, its series and one occurrence), per other component, per content line, per
#: list value, per recurrence rule, and per step a rule takes from its DTSTART (dateutil
#: keeps every instance it steps through).
EVENT_BYTES = 5_000
COMPONENT_BYTES = 1_000
LINE_BYTES = 450
VALUE_BYTES = 600
RULE_BYTES = 8_000
RULE_STEP_BYTES = 96
#: A feed whose census weighs more than this is refused before parsing. With the
#: longest rule expansion allowed (MAX_RULE_STEPS * RULE_STEP_BYTES, 24 MB) it still
#: fits the run's parse budget (_memory.PARSE_MEMORY_BYTES, 64 MiB), which every feed
#: being parsed shares; see benchmarks/README.md for the arithmetic.
MAX_FEED_BYTES = 40 * 1024 * 1024
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
DEFAULT_HOURS: Mapping[str, Sequence[Sequence[str]]] = {
    day: (("09:00", "17:00"),) for day in DAYS[:5]
}
#: Events are queried this far beyond the window on each side: a floating or all-day
#: event is placed in the workspace's zone only after the query, up to 14 hours away
#: from UTC, and slots at the window's edges must still see the events next to them.
QUERY_PADDING = timedelta(days=2)

_KEYS = {"url", "path", "timezone", "hours", "slot_minutes", "min_notice_minutes", "token",
         "token_env", "headers"}
_HHMM = re.compile(r"(?:[01]\d|2[0-3]):[0-5]\d|24:00")
_BEGIN = re.compile(r"^[ \t]*BEGIN:", re.IGNORECASE | re.MULTILINE)
_BEGIN_VEVENT = re.compile(r"^[ \t]*BEGIN:VEVENT", re.IGNORECASE | re.MULTILINE)
_RRULE = re.compile(r"^[ \t]*RRULE[;:]", re.IGNORECASE | re.MULTILINE)
_HOURS_SHAPE = 'an object of day names (mon..sun) to lists of ["HH:MM", "HH:MM"] intervals'
#: What malformed feed data makes icalendar and recurring_ical_events raise (their own
#: errors are ValueError subclasses; a missing DTSTART is a KeyError).
_DATA_ERRORS = (ValueError, KeyError, TypeError, AttributeError, OverflowError)
#: Shortest possible period of each FREQ, in seconds (a month counts as 28 days), so
#: that ``span / period`` over-estimates the number of periods a rule steps through.
_FREQ_SECONDS = {"SECONDLY": 1, "MINUTELY": 60, "HOURLY": 3600, "DAILY": 86_400,
                 "WEEKLY": 7 * 86_400, "MONTHLY": 28 * 86_400, "YEARLY": 365 * 86_400}
#: The sub-daily fields a BY part names: (level, values per parent unit, the parent's
#: length in seconds). A BY part at or above its rule's FREQ level limits (RFC 5545's
#: table in 3.3.10): FREQ=SECONDLY;BYMINUTE=0 keeps the seconds of one minute an hour.
_LIMIT_FIELDS = {"BYSECOND": (0, 60, 60), "BYMINUTE": (1, 60, 3600), "BYHOUR": (2, 24, 86_400)}
_FREQ_LEVEL = {"SECONDLY": 0, "MINUTELY": 1, "HOURLY": 2}
#: A rule whose BY parts limit it is still walked period by period from DTSTART by
#: dateutil, which filters each one: a walked period costs this fraction of a kept step
#: (measured ~1/50 for SECONDLY and ~1/17 for MINUTELY; halved for a margin).
_WALK_COST = {"SECONDLY": 1 / 25, "MINUTELY": 1 / 8, "HOURLY": 1 / 4}
#: The FBTYPE of free time in a VFREEBUSY; every other type is busy.
_FREE_FBTYPES = frozenset({"FREE"})
#: How many days one BYDAY value can select in one period of this FREQ.
_BYDAY_SPREAD = {"MONTHLY": 5, "YEARLY": 53}

Interval = tuple[datetime, datetime]


@dataclass(frozen=True)
class IcsConfig:
    """One workspace's validated provider_config."""

    url: str | None
    path: str | None
    timezone: ZoneInfo
    #: Working hours by weekday (0 = Monday): sorted (start, end) minutes since midnight.
    hours: tuple[tuple[tuple[int, int], ...], ...]
    slot_minutes: int
    min_notice_minutes: int
    token: str | None
    headers: Mapping[str, str]


def read_config(config: Mapping[str, Any], environ: Mapping[str, str]) -> IcsConfig:
    """Validate ``config``; PermanentProviderError naming the key if it is unusable."""
    reader = ConfigReader("ics", config, environ)
    reader.only(_KEYS)
    url_text = reader.text("url")
    path = reader.text("path")
    if (url_text is None) == (path is None):
        raise PermanentProviderError("ics: provider_config needs exactly one of url and path")
    if path is not None:
        url_only = sorted({"token", "token_env", "headers"} & set(config))
        if url_only:
            raise PermanentProviderError(
                f"ics: provider_config.{url_only[0]} applies to url feeds only, not to path"
            )
        if "\x00" in path:
            raise reader.error("path", "a file name without NUL characters")
        if not environ.get(FILE_ROOT_ENV):
            raise PermanentProviderError(
                f"ics: provider_config.path needs {FILE_ROOT_ENV} set in the job's environment "
                "(local feeds are read only from inside that directory)"
            )
    headers = reader.headers("headers")
    token = reader.secret(required=False)
    if token is not None and any(name.lower() == "authorization" for name in headers):
        raise PermanentProviderError(
            "ics: set provider_config.token/token_env or an Authorization header, not both"
        )
    return IcsConfig(
        url=None if url_text is None else _feed_url(reader, url_text),
        path=path,
        timezone=_zone(reader),
        hours=_hours(reader, config.get("hours", DEFAULT_HOURS)),
        slot_minutes=reader.integer("slot_minutes", default=30, lo=5, hi=480),
        min_notice_minutes=reader.integer("min_notice_minutes", default=0, lo=0,
                                          hi=366 * 24 * 60),
        token=token,
        headers=headers,
    )


def _feed_url(reader: ConfigReader, text: str) -> str:
    # Never echo the URL: private feed addresses carry their secret in the path.
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme == "webcal":  # a calendar-app alias for https
        parts = parts._replace(scheme="https")
    elif scheme not in ("http", "https"):
        raise reader.error("url", "an absolute http, https or webcal URL")
    if not parts.hostname:
        raise reader.error("url", "an absolute http, https or webcal URL")
    if parts.username or parts.password:
        raise reader.error("url", "a URL without credentials (use token or token_env)")
    return urlunsplit(parts)


def _zone(reader: ConfigReader) -> ZoneInfo:
    name = reader.required_text("timezone")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise reader.error("timezone", f"an IANA time zone name like Europe/Berlin, got {name!r}"
                           ) from None


def _hours(reader: ConfigReader, value: Any) -> tuple[tuple[tuple[int, int], ...], ...]:
    if not isinstance(value, Mapping):
        raise reader.error("hours", _HOURS_SHAPE)
    unknown = sorted(str(key) for key in value if key not in DAYS)
    if unknown:
        raise PermanentProviderError(
            f"ics: provider_config.hours has an unknown day {unknown[0]!r}; "
            f"days are {', '.join(DAYS)}"
        )
    week: list[tuple[tuple[int, int], ...]] = []
    for day in DAYS:
        intervals = value.get(day, ())
        if not isinstance(intervals, list | tuple):
            raise reader.error(f"hours.{day}", 'a list of ["HH:MM", "HH:MM"] intervals')
        parsed: list[tuple[int, int]] = []
        for i, pair in enumerate(intervals):
            if (
                not isinstance(pair, list | tuple) or len(pair) != 2
                or not all(isinstance(t, str) and _HHMM.fullmatch(t) for t in pair)
                or _minutes(pair[0]) >= _minutes(pair[1])
            ):
                raise reader.error(
                    f"hours.{day}[{i}]",
                    'a pair ["HH:MM", "HH:MM"] from 00:00 to 24:00 with the start first',
                )
            parsed.append((_minutes(pair[0]), _minutes(pair[1])))
        parsed.sort()
        if any(earlier[1] > later[0] for earlier, later in zip(parsed, parsed[1:], strict=False)):
            raise reader.error(f"hours.{day}", "intervals that do not overlap")
        week.append(tuple(parsed))
    return tuple(week)


def _minutes(hhmm: str) -> int:
    hours, minutes = hhmm.split(":")
    return int(hours) * 60 + int(minutes)


class IcsProvider(Provider):
    """Free slots on the workspace's working hours, minus the busy time of an iCalendar feed."""

    name = "ics"

    def __init__(self, context: ProviderContext) -> None:
        super().__init__(context)
        # icalendar warns each time it reads a "globally unique" TZID (Evolution and
        # Thunderbird write /freeassociation.sourceforge.net/Europe/Berlin) that it took
        # the zone after the vendor prefix: the only reading there is, the same every
        # run, and nothing an operator can act on; it would quote the tenant's feed.
        # (filterwarnings replaces an equal filter, so one provider per run adds one.)
        warnings.filterwarnings("ignore", category=icalendar.GloballyUniqueTZIDGuessed)

    def validate_config(self, config: Mapping[str, Any]) -> None:
        read_config(config, self.context.environ)

    def fetch(self, request: FetchRequest) -> list[datetime]:
        config = read_config(request.config, self.context.environ)
        if config.url is not None:
            text = self._download(request, config, config.url)
        else:
            assert config.path is not None
            text = read_feed_file(config.path, self.context.environ)
        census = check_feed_size(text)
        # Reserved with room for the longest rule expansion allowed, then shrunk to what
        # the feed's rules need once they are checked (a reservation never grows).
        worst = census.weight + (RULE_STEP_BYTES * MAX_RULE_STEPS if census.rules else 0)
        with self.context.memory.reserve(worst, request, "ics") as held:
            found = _busy_time(text, census, config.timezone, request, held)
        if found.unreadable:
            # The cache row has no place for a note: the run's log carries it.
            log.warning("workspace %s: ics: skipped %d of the feed's %d events: %s cannot be "
                        "read or expanded; the others are used", request.workspace_id,
                        found.unreadable, found.events,
                        "it" if found.unreadable == 1 else "they")
        busy = found.intervals
        not_before = request.window_start + timedelta(minutes=config.min_notice_minutes)
        return free_slots(config, busy, request.window_start, request.window_end, not_before)

    def _download(self, request: FetchRequest, config: IcsConfig, url: str) -> str:
        headers = dict(config.headers)
        if config.token is not None:
            headers["Authorization"] = f"Bearer {config.token}"
        # Redirects are followed (feeds move); the configured headers and the token go
        # only to the feed's own origin, and never in clear text after https.
        text: str = self.context.http.get(
            request, url, what=f"ics: GET {feed_label(url)}", parse_json=False,
            follow_redirects=True, headers=headers, accept=FEED_ACCEPT,
        )
        return text


def _busy_time(text: str, census: FeedCensus, zone: ZoneInfo, request: FetchRequest,
               held: Reservation) -> BusyTime:
    # The parsed calendar lives only in this frame: it is gone when the reservation ends.
    calendar = parse_calendar(text)
    return busy_intervals(calendar, zone, request.window_start - QUERY_PADDING,
                          request.window_end + QUERY_PADDING,
                          on_checked=lambda steps: held.shrink(
                              census.weight + RULE_STEP_BYTES * steps))


def check_feed_size(text: str) -> FeedCensus:
    """The census of ``text``; PermanentProviderError if parsing it could take too much memory.

    Runs before icalendar sees the text: a 4.5 MB feed of 40,000 events would take
    ~500 MB and 12 s of CPU to parse and expand, and is refused here in milliseconds.
    """
    census = FeedCensus.of(text)
    if census.weight > MAX_FEED_BYTES:
        raise PermanentProviderError(
            f"ics: the feed is too large to expand: {census.events} events, "
            f"{census.components} other components, {census.lines} lines and "
            f"{census.values} list values need an estimated {_mb(census.weight)} of memory; "
            f"the limit is {_mb(MAX_FEED_BYTES)}"
        )
    return census


def _mb(size: int) -> str:
    return f"{size / 1e6:.0f} MB"


def feed_label(url: str) -> str:
    """Host and path of ``url`` for messages, with secret-looking path segments hidden.

    Private feed addresses (Google's ``private-<key>``, iCloud's and Outlook's long
    tokens) carry their secret in the path, so any segment longer than 16 characters or
    starting with private/secret/token/key is shown as "…"; the query is never shown.
    """
    parts = urlsplit(url)
    segments = [
        s if len(s) <= 16 and not s.lower().startswith(("private", "secret", "token", "key"))
        else "…"
        for s in parts.path.split("/")
    ]
    return parts.netloc + ("/".join(segments) or "/")


def read_feed_file(path: str, environ: Mapping[str, str]) -> str:
    """The text of ``path``, resolved inside the FILE_ROOT_ENV directory; never echoes it.

    Symlinks and ``..`` are resolved first, and anything that lands outside the root
    (or on the root itself) is refused; the final component is opened without following
    a symlink, so one swapped in after the check is refused too. Only regular files of
    at most MAX_BODY_BYTES are read (a FIFO would otherwise block the worker).
    """
    root_text = environ.get(FILE_ROOT_ENV)
    if not root_text:
        raise PermanentProviderError(
            f"ics: provider_config.path needs {FILE_ROOT_ENV} set in the job's environment"
        )
    try:
        root = Path(root_text).resolve()
        target = (root / path).resolve()
    except (OSError, RuntimeError, ValueError):  # RuntimeError: a symlink loop
        raise PermanentProviderError("ics: provider_config.path cannot be resolved") from None
    if not root.is_dir():
        if root.exists():
            raise PermanentProviderError(f"ics: {FILE_ROOT_ENV} is not a directory")
        # Most likely a volume not mounted (yet): retried with backoff, not given up on.
        raise RetryableProviderError(
            f"ics: {FILE_ROOT_ENV} names no directory (is its volume mounted?)")
    if target == root or not target.is_relative_to(root):
        raise PermanentProviderError(
            f"ics: provider_config.path must name a file inside {FILE_ROOT_ENV}; "
            "it resolves to a place outside that directory"
        )
    flags = (os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
             | getattr(os, "O_CLOEXEC", 0))
    try:
        fd = os.open(target, flags)
    except FileNotFoundError:
        raise PermanentProviderError(
            f"ics: provider_config.path names no file inside {FILE_ROOT_ENV}"
        ) from None
    except PermissionError:
        raise PermanentProviderError(
            "ics: provider_config.path cannot be read: permission denied"
        ) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise PermanentProviderError(
                "ics: provider_config.path is a symlink that changed after it was checked"
            ) from None
        code = errno.errorcode.get(exc.errno or 0, "error")
        raise RetryableProviderError(f"ics: reading provider_config.path failed ({code})"
                                     ) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise PermanentProviderError("ics: provider_config.path is not a regular file")
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_BODY_BYTES:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > MAX_BODY_BYTES:
        raise PermanentProviderError(
            f"ics: provider_config.path is larger than {MAX_BODY_BYTES} bytes"
        )
    return b"".join(chunks).decode("utf-8", errors="replace")


@dataclass(frozen=True)
class FeedCensus:
    """What drives the memory of parsing and expanding a feed, counted in its text.

    Counted with plain string searches, in a few milliseconds for a 5 MiB feed, before
    icalendar sees the text; every count over-estimates (a folded line counts as two, a
    comma in a summary as a list value), so the weight is an upper bound.
    """

    events: int  # BEGIN:VEVENT lines
    components: int  # other BEGIN: lines (alarms, time zones, to-dos...)
    lines: int
    values: int  # commas: each list value (EXDATE, RDATE, CATEGORIES...) is an object
    rules: int  # RRULE lines

    @classmethod
    def of(cls, text: str) -> FeedCensus:
        events = len(_BEGIN_VEVENT.findall(text))
        return cls(events=events, components=len(_BEGIN.findall(text)) - events,
                   lines=text.count("\n") + 1, values=text.count(","),
                   rules=len(_RRULE.findall(text)))

    @property
    def weight(self) -> int:
        """Bytes that parsing and expanding may take at most, rule steps not included."""
        return (EVENT_BYTES * self.events + COMPONENT_BYTES * self.components
                + LINE_BYTES * self.lines + VALUE_BYTES * self.values
                + RULE_BYTES * self.rules)


def parse_calendar(text: str) -> icalendar.Calendar:
    """The VCALENDAR in ``text``; PermanentProviderError otherwise.

    Messages never quote the feed (the parser's own do, so only its type is kept).
    """
    invalid = "ics: the feed is not a valid iCalendar file: "
    if not text.lstrip("\ufeff \t\r\n").upper().startswith("BEGIN:VCALENDAR"):
        raise PermanentProviderError(invalid + "it does not start with BEGIN:VCALENDAR")
    # Windows/.NET exporters often start the file with a UTF-8 byte order mark; decoded,
    # it is U+FEFF, which icalendar's text parser refuses as the first content line.
    text = text.removeprefix("\ufeff")
    try:
        calendar = icalendar.Calendar.from_ical(text)
    except _DATA_ERRORS as exc:
        raise PermanentProviderError(
            f"{invalid}it could not be parsed ({type(exc).__name__})"
        ) from None
    if not isinstance(calendar, icalendar.Calendar):
        raise PermanentProviderError(invalid + "it holds no single VCALENDAR")
    return calendar


@dataclass(frozen=True)
class BusyTime:
    """The busy time of a feed, and how many of its events were skipped as unreadable."""

    #: Sorted, merged, in UTC.
    intervals: list[Interval]
    #: VEVENTs that could not be read or expanded, and were left out.
    unreadable: int = 0
    #: VEVENTs in the feed, the unreadable ones included.
    events: int = 0


def busy_intervals(calendar: icalendar.Calendar, zone: ZoneInfo, start: datetime,
                   end: datetime, *,
                   on_checked: Callable[[int], None] | None = None) -> BusyTime:
    """The busy time of ``calendar`` between ``start`` and ``end``.

    Busy is every VEVENT occurrence overlapping the span that is neither transparent nor
    cancelled, and every VFREEBUSY period that is not ``FBTYPE=FREE``. Dates are whole
    local days in ``zone`` (DTEND exclusive, one day when it is missing); floating times
    are wall-clock times in ``zone``. An event that cannot be read or expanded (a broken
    DTSTART, RDATE or RRULE, no DTSTART) is left out and counted in ``unreadable``, so
    one bad event does not cost the calendar. Raises PermanentProviderError for a feed
    that cannot be expanded or is too large to, or none of whose events can be read.
    ``on_checked`` is told the estimated rule steps once the rules passed the checks,
    before any expansion.
    """
    steps = _check_expansion_cost(calendar, zone, start, end)
    if on_checked is not None:
        on_checked(steps)
    try:
        # An unknown X-WR-TIMEZONE would fail the whole feed inside the library; a feed
        # naming a zone nobody knows is better read as if it named none.
        x_wr = calendar.get("X-WR-TIMEZONE")
        if x_wr is not None and _known_zone(str(x_wr)) is None:
            del calendar["X-WR-TIMEZONE"]
        events = len(calendar.walk("VEVENT"))
        unreadable = _drop_unreadable_events(calendar)
        # Series the library cannot build (a bad rule, an end before the start) are left
        # out by it; they are the UIDs missing from what it built.
        pending = recurring_ical_events.of(calendar, skip_bad_series=True).series
        uids = Counter(_uid(event) for event in calendar.walk("VEVENT"))
        unreadable += uids.total() - sum(uids[str(series.uid)] for series in pending)

        def skip(series: Any) -> None:
            nonlocal unreadable
            unreadable += uids[str(series.uid)] or 1

        intervals: list[Interval] = []
        count = 0
        for event in _occurrences(pending, start, end, skip):
            count += 1
            _check_occurrences(count)
            if (str(event.get("TRANSP", "")).strip().upper() == "TRANSPARENT"
                    or str(event.get("STATUS", "")).strip().upper() == "CANCELLED"):
                continue
            begin, finish = _instant(event.start, zone), _instant(event.end, zone)
            if finish > begin:  # a zero-length event blocks no time
                intervals.append((begin, finish))
        for period in _free_busy_periods(calendar, zone, start, end):
            count += 1
            _check_occurrences(count)
            intervals.append(period)
    except _DATA_ERRORS as exc:
        raise PermanentProviderError(
            f"ics: the feed has an event that cannot be read or expanded ({type(exc).__name__})"
        ) from None
    if unreadable and unreadable >= events and not intervals:
        raise PermanentProviderError(
            f"ics: the feed's events cannot be read or expanded (all {events} of them)")
    return BusyTime(_merge(intervals), unreadable, events)


def _drop_unreadable_events(calendar: icalendar.Calendar) -> int:
    """Take out the VEVENTs icalendar could not read (it keeps their parse errors) and
    those without a DTSTART; return how many."""
    kept: list[icalendar.Component] = []
    for component in calendar.subcomponents:
        if component.name == "VEVENT" and (getattr(component, "errors", None)
                                           or "DTSTART" not in component):
            continue
        kept.append(component)
    dropped = len(calendar.subcomponents) - len(kept)
    calendar.subcomponents[:] = kept
    return dropped


def _uid(event: icalendar.Component) -> str:
    # How recurring_ical_events groups events into series: by UID, or alone without one.
    return str(event.get("UID", str(id(event))))


def _check_occurrences(count: int) -> None:
    if count > MAX_OCCURRENCES:
        raise PermanentProviderError(
            f"ics: the feed has more than {MAX_OCCURRENCES} event occurrences in the "
            "window; that is the limit"
        )


def _free_busy_periods(calendar: icalendar.Calendar, zone: ZoneInfo, start: datetime,
                       end: datetime) -> Iterator[Interval]:
    """The busy periods of the calendar's VFREEBUSY components overlapping [start, end].

    Free/busy URLs (Fastmail, Nextcloud, Zimbra) publish no VEVENTs, only ``FREEBUSY``
    properties: each a list of periods (start/end or start/duration) of one ``FBTYPE``.
    BUSY (the default), BUSY-TENTATIVE and BUSY-UNAVAILABLE are busy; FREE is not; an
    unknown type is busy, as RFC 5545 (3.2.9) asks.
    """
    for component in calendar.walk("VFREEBUSY"):
        values = component.get("FREEBUSY")
        if values is None:
            continue
        for period in values if isinstance(values, list) else [values]:
            if str(period.params.get("FBTYPE", "BUSY")).strip().upper() in _FREE_FBTYPES:
                continue
            first, end_or_length = period.dt
            begin = _instant(first, zone)
            finish = (begin + end_or_length if isinstance(end_or_length, timedelta)
                      else _instant(end_or_length, zone))
            if finish > begin and begin < end and finish > start:
                yield begin, finish


def _occurrences(pending: list[Any], start: datetime, end: datetime,
                 on_unreadable: Callable[[Any], None]) -> Iterator[icalendar.Event]:
    """Every occurrence of the ``pending`` series overlapping [start, end], one at a time.

    What ``recurring_ical_events.of(calendar).between(start, end)`` returns, but as a
    generator: ``between`` builds a copy of every occurrence first (~2 KB each), so a
    feed over the occurrence limit would cost its whole expansion before being counted.
    Each series is let go once expanded: its rules cache every instance they stepped
    through from DTSTART (dateutil's ``cache=True``, ~60 bytes a step), so only the
    series being expanded holds such a cache, not all of them at once. A series that
    fails while expanding is passed to ``on_unreadable``; what it yielded stays busy.
    """
    pending.reverse()  # popped from the end: the library's order
    while pending:
        series = pending.pop()
        try:
            for occurrence in series.between(start, end):
                yield occurrence.as_component(False)
        except _DATA_ERRORS:
            on_unreadable(series)
        del series


def _known_zone(name: str) -> ZoneInfo | None:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        return None


def _instant(value: date | datetime, zone: ZoneInfo) -> datetime:
    """A DATE is local midnight in ``zone``; a floating DATE-TIME is wall-clock in ``zone``."""
    if isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            value = value.replace(tzinfo=zone)
        return value.astimezone(UTC)
    return datetime.combine(value, time(0), tzinfo=zone).astimezone(UTC)


def _merge(intervals: list[Interval]) -> list[Interval]:
    merged: list[Interval] = []
    for begin, finish in sorted(intervals):
        if merged and begin <= merged[-1][1]:
            if finish > merged[-1][1]:
                merged[-1] = (merged[-1][0], finish)
        else:
            merged.append((begin, finish))
    return merged


def _check_expansion_cost(calendar: icalendar.Calendar, zone: ZoneInfo, start: datetime,
                          end: datetime) -> int:
    """Refuse, before expanding, recurrence rules too costly to expand; else their steps.

    The estimate is generous (every BY* value multiplies, a month is 28 days), so a
    real calendar stays far below the limits; unreadable rules are left to the
    expansion, which reports them.
    """
    steps = in_window = 0
    for event in calendar.walk("VEVENT"):
        rules = event.get("RRULE")
        if not rules or not isinstance(event, icalendar.Event):
            continue
        try:
            first = _instant(event.start, zone)
            for rule in rules if isinstance(rules, list) else [rules]:
                total, window = _rule_cost(rule, first, zone, start, end)
                steps += total
                in_window += window
        except _DATA_ERRORS:
            continue
    if in_window > MAX_OCCURRENCES:
        raise PermanentProviderError(
            f"ics: the feed's recurrence rules have more than {MAX_OCCURRENCES} event "
            "occurrences in the window"
        )
    if steps > MAX_RULE_STEPS:
        raise PermanentProviderError(
            "ics: the feed's recurrence rules are too costly to expand (estimated "
            f"{steps} steps from their first occurrence; the limit is {MAX_RULE_STEPS})"
        )
    return steps


def _rule_cost(rule: Mapping[str, list[Any]], first: datetime, zone: ZoneInfo,
               start: datetime, end: datetime) -> tuple[int, int]:
    """Upper bounds on (steps from ``first`` to ``end``, occurrences in the span).

    A step is an occurrence dateutil keeps, or the equivalent CPU of the periods it walks
    and filters away when sub-daily BY parts limit the rule (see _WALK_COST).
    """
    freq = str(rule["FREQ"][0]).upper()
    period = _FREQ_SECONDS[freq] * max(1, int(rule.get("INTERVAL", [1])[0]))
    level = _FREQ_LEVEL.get(freq, len(_FREQ_LEVEL))
    limits = {key: len(values) for key, values in rule.items()
              if key in _LIMIT_FIELDS and _LIMIT_FIELDS[key][0] >= level}
    per_period = 1
    for key, values in rule.items():
        if key.startswith("BY") and key != "BYSETPOS" and key not in limits:
            per_period *= len(values) * (_BYDAY_SPREAD.get(freq, 1) if key == "BYDAY" else 1)
    stop = end
    if rule.get("UNTIL"):
        stop = min(stop, _instant(rule["UNTIL"][0], zone))

    def periods(begin: datetime) -> int:
        return 0 if stop < begin else int((stop - begin).total_seconds() // period) + 1

    def kept(begin: datetime) -> int:
        """Periods the limits let through: per unit of the coarsest limited field, the
        product of the values each field from FREQ's up to it may take."""
        walked = periods(begin)
        if not limits or walked == 0:
            return walked
        top, _, parent = max(_LIMIT_FIELDS[key] for key in limits)
        parents = int((stop - begin).total_seconds() // parent) + 2  # both ends partial
        per_parent = 1
        for key, (field_level, values, _) in _LIMIT_FIELDS.items():
            if level <= field_level <= top:
                per_parent *= limits.get(key, values)
        return min(walked, parents * per_parent)

    total, window = kept(first), kept(max(first, start))
    if rule.get("COUNT"):
        count = int(rule["COUNT"][0])
        total, window = min(total, count), min(window, count)
    walk = math.ceil(periods(first) * _WALK_COST[freq]) if limits else 0
    return total * per_period + walk, window * per_period


def free_slots(config: IcsConfig, busy: Sequence[Interval], window_start: datetime,
               window_end: datetime, not_before: datetime) -> list[datetime]:
    """Slot starts (UTC) on the working hours of each local day that no busy time touches.

    Slots step by ``slot_minutes`` from each working interval's start and must end (in
    wall-clock time) by the interval's end; a slot is free when ``[start, start +
    slot_minutes)`` overlaps no ``busy`` interval. Wall-clock times are converted per
    day, so daylight-saving changes are followed: a time in the spring-forward gap does
    not exist and is skipped; a time repeated at fall-back is taken once, at its first
    occurrence (fold=0). Only starts in ``[window_start, window_end)`` and not before
    ``not_before`` are returned.
    """
    zone = config.timezone
    length = timedelta(minutes=config.slot_minutes)
    busy_starts = [begin for begin, _ in busy]
    day = window_start.astimezone(zone).date()
    last_day = window_end.astimezone(zone).date()
    slots: list[datetime] = []
    while day <= last_day:
        for open_at, close_at in config.hours[day.weekday()]:
            for minute in range(open_at, close_at - config.slot_minutes + 1,
                                config.slot_minutes):
                instant = _wall_clock_utc(day, minute, zone)
                if (
                    instant is None
                    or not window_start <= instant < window_end
                    or instant < not_before
                    or _overlaps(busy, busy_starts, instant, instant + length)
                ):
                    continue
                slots.append(instant)
        day += timedelta(days=1)
    return slots


def _wall_clock_utc(day: date, minute: int, zone: ZoneInfo) -> datetime | None:
    """``day`` at ``minute`` past midnight in ``zone``, in UTC; None if that time does not exist.

    fold=0 (the default) picks the first of two occurrences of an ambiguous time.
    """
    wall = datetime.combine(day, time(minute // 60, minute % 60))
    instant = wall.replace(tzinfo=zone).astimezone(UTC)
    if instant.astimezone(zone).replace(tzinfo=None) != wall:
        return None  # in the spring-forward gap: the clock never shows this time
    return instant


def _overlaps(busy: Sequence[Interval], starts: Sequence[datetime], begin: datetime,
              finish: datetime) -> bool:
    # busy is merged (sorted, disjoint), so only the last interval starting before
    # ``finish`` can reach into [begin, finish).
    i = bisect.bisect_left(starts, finish) - 1
    return i >= 0 and busy[i][1] > begin
