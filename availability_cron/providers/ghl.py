"""The ``ghl`` provider: the free slots of one GoHighLevel (LeadConnector) calendar.

``GET {base_url}/calendars/{calendar_id}/free-slots?startDate=&endDate=&timezone=UTC``
(dates in epoch milliseconds) with ``Authorization: Bearer`` and ``Version``. The window
is fetched as consecutive parts of at most ``max_span_days``. The answer is keyed by
date: ``{"2026-12-01": {"slots": ["<ISO-8601 with offset>", ...]}, "traceId": "..."}``;
only keys shaped like YYYY-MM-DD are read. A body with ``statusCode`` >= 400, an
``error``, or a ``message`` and no dates is a permanent error even under HTTP 200.
See docs/providers/ghl.md.

provider_config keys:
  calendar_id     (string, required)      the calendar's id
  token / token_env (required)            Private Integration token or OAuth access token
  api_version     (string, 2021-04-15)    the Version header
  max_span_days   (integer 1..31, 31)     longest span of one request
  base_url        (URL, https://services.leadconnectorhq.com)
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from ._config import ConfigReader
from ._http import credential_key, epoch_ms, path_of
from ._shape import excerpt as _excerpt
from ._shape import instant as _instant
from ._shape import kind as _kind
from ._shape import number as _number
from ._shape import split_window
from .base import FetchRequest, PermanentProviderError, Provider

DEFAULT_BASE_URL = "https://services.leadconnectorhq.com"
DEFAULT_API_VERSION = "2021-04-15"
DEFAULT_MAX_SPAN_DAYS = 31
MAX_SPAN_DAYS = 31
#: The documented burst window (100 requests per 10 s), when the header is missing.
DEFAULT_BURST_SECONDS = 10.0

_KEYS = {"calendar_id", "token", "token_env", "api_version", "max_span_days", "base_url"}
_VERSION = re.compile(r"\d{4}-\d{2}-\d{2}")
_DATE_KEY = re.compile(r"\d{4}-\d{2}-\d{2}")
#: Calendar ids go into the URL path: nothing that could change the path.
_CALENDAR_ID = re.compile(r"[A-Za-z0-9_-]{1,100}")


@dataclass(frozen=True)
class GhlConfig:
    """One workspace's validated provider_config."""

    base_url: str
    calendar_id: str
    token: str
    api_version: str
    max_span: timedelta


def read_config(config: Mapping[str, Any], environ: Mapping[str, str]) -> GhlConfig:
    """Validate ``config``; PermanentProviderError naming the key if it is unusable."""
    reader = ConfigReader("ghl", config, environ)
    reader.only(_KEYS)
    calendar_id = reader.identifier("calendar_id", required=True)
    assert calendar_id is not None
    if not _CALENDAR_ID.fullmatch(calendar_id):
        raise reader.error("calendar_id", "an id of letters, digits, '-' and '_'")
    api_version = reader.text("api_version", default=DEFAULT_API_VERSION)
    assert api_version is not None
    if not _VERSION.fullmatch(api_version):
        raise reader.error("api_version", "a date like 2021-04-15")
    token = reader.secret(required=True)
    assert token is not None
    days = reader.integer("max_span_days", default=DEFAULT_MAX_SPAN_DAYS, lo=1, hi=MAX_SPAN_DAYS)
    return GhlConfig(
        base_url=reader.url("base_url", default=DEFAULT_BASE_URL),
        calendar_id=calendar_id,
        token=token,
        api_version=api_version,
        max_span=timedelta(days=days),
    )


class GhlProvider(Provider):
    """GoHighLevel API 2.0 ``/calendars/{id}/free-slots`` for one calendar."""

    name = "ghl"

    def validate_config(self, config: Mapping[str, Any]) -> None:
        read_config(config, self.context.environ)

    def fetch(self, request: FetchRequest) -> list[datetime]:
        config = read_config(request.config, self.context.environ)
        url = f"{config.base_url}/calendars/{config.calendar_id}/free-slots"
        what = f"ghl: GET {path_of(url)}"
        headers = {"Authorization": f"Bearer {config.token}", "Version": config.api_version}
        gate_key = credential_key(self.name, config.base_url, config.token)
        slots: list[datetime] = []
        # Every part must succeed: a window with a missing week must not be cached as whole.
        for start, end in split_window(request.window_start, request.window_end,
                                       config.max_span):
            params = {"startDate": epoch_ms(start), "endDate": epoch_ms(end), "timezone": "UTC"}
            body = self.context.http.get(request, url, what=what, params=params,
                                         headers=headers, gate_key=gate_key,
                                         rate_limit=rate_limit_wait)
            slots.extend(parse_free_slots(body, what))
        return slots



def parse_free_slots(body: Any, what: str) -> list[datetime]:
    """The slots under the date keys; PermanentProviderError saying what is wrong."""
    if not isinstance(body, dict):
        raise PermanentProviderError(f"{what}: expected a JSON object, got {_kind(body)}")
    days = {key: value for key, value in body.items() if _DATE_KEY.fullmatch(key)}
    status = body.get("statusCode")
    failed = isinstance(status, int) and not isinstance(status, bool) and status >= 400
    if failed or body.get("error") or (not days and "message" in body):
        raise PermanentProviderError(
            f"{what}: the API answered with an error: {_error_message(body)}"
        )
    slots: list[datetime] = []
    for day, entry in days.items():
        if not isinstance(entry, dict):
            raise PermanentProviderError(
                f"{what}: {day!r} must be an object with a slots list, got {_kind(entry)}"
            )
        listed = entry.get("slots")
        if not isinstance(listed, list):
            raise PermanentProviderError(
                f"{what}: {day!r}.slots must be a list of date-times, got {_kind(listed)}"
            )
        for i, value in enumerate(listed):
            slots.append(_instant(value, f"{day!r}.slots[{i}]", what))
    return slots


def rate_limit_wait(headers: Mapping[str, str], now_epoch: float) -> float | None:
    """Seconds until an exhausted GoHighLevel limit resets, or None while requests remain.

    Two limits: the burst (``X-RateLimit-Remaining`` in a window of
    ``X-RateLimit-Interval-Milliseconds``; at 0, wait one window) and the daily one
    (``X-RateLimit-Daily-Remaining``; at 0, wait until the next UTC midnight). The
    longer wait wins.
    """
    lowered = {name.lower(): value for name, value in headers.items()}
    waits: list[float] = []
    burst = _number(lowered.get("x-ratelimit-remaining"))
    if burst is not None and burst <= 0:
        interval_ms = _number(lowered.get("x-ratelimit-interval-milliseconds"))
        waits.append(DEFAULT_BURST_SECONDS if interval_ms is None or interval_ms <= 0
                     else interval_ms / 1000)
    daily = _number(lowered.get("x-ratelimit-daily-remaining"))
    if daily is not None and daily <= 0:
        now = datetime.fromtimestamp(now_epoch, UTC)
        midnight = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), UTC)
        waits.append((midnight - now).total_seconds())
    return max(waits) if waits else None


# --- reading values ----------------------------------------------------------------------



def _error_message(body: dict[str, Any]) -> str:
    message = body.get("message") or body.get("error")
    if isinstance(message, list):  # validation errors come as a list of strings
        message = "; ".join(m for m in message if isinstance(m, str))
    if isinstance(message, str) and message.strip():
        return _excerpt(message)
    status = body.get("statusCode")
    return f"statusCode {status}" if isinstance(status, int) else "no message"




