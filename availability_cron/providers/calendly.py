"""The ``calendly`` provider: the available times of one Calendly event type, from API v2.

``GET {base_url}/event_type_available_times?event_type=<URI>&start_time=&end_time=`` with
``Authorization: Bearer``. Calendly refuses a start in the past and caps the span of
one request (7 days historically, 31 since July 2026), so the window is fetched as
consecutive ``[start_time, end_time)`` requests of at most ``max_span_days``, the first
starting no earlier than a minute from now. The answer is ``{"collection": [{"status":
"available", "invitees_remaining": 1, "start_time": "<ISO-8601>"}, ...]}``; a body with
no collection but a ``title``/``message`` is a permanent error even under HTTP 200.
See docs/providers/calendly.md.

provider_config keys:
  event_type      (https URI, required)  the event type's URI from GET /event_types
  token / token_env (required)           personal access token or OAuth token
  max_span_days   (integer 1..31, 7)     longest span of one request
  base_url        (URL, https://api.calendly.com)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from ._config import ConfigReader
from ._http import DEFAULT_RATE_LIMIT_SECONDS, credential_key, path_of
from ._shape import excerpt as _excerpt
from ._shape import instant as _instant
from ._shape import kind as _kind
from ._shape import number as _number
from ._shape import split_window
from .base import FetchRequest, PermanentProviderError, Provider

DEFAULT_BASE_URL = "https://api.calendly.com"
#: The span Calendly allowed per request before July 2026; still accepted after.
DEFAULT_MAX_SPAN_DAYS = 7
MAX_SPAN_DAYS = 31
#: How far ahead of now the first request starts: Calendly rejects a start in the past,
#: and the request takes a moment to arrive.
START_LEAD = timedelta(minutes=1)

_KEYS = {"event_type", "token", "token_env", "max_span_days", "base_url"}


@dataclass(frozen=True)
class CalendlyConfig:
    """One workspace's validated provider_config."""

    base_url: str
    event_type: str
    token: str
    max_span: timedelta


def read_config(config: Mapping[str, Any], environ: Mapping[str, str]) -> CalendlyConfig:
    """Validate ``config``; PermanentProviderError naming the key if it is unusable."""
    reader = ConfigReader("calendly", config, environ)
    reader.only(_KEYS)
    event_type = reader.url("event_type", schemes=("https",))
    token = reader.secret(required=True)
    assert token is not None
    days = reader.integer("max_span_days", default=DEFAULT_MAX_SPAN_DAYS, lo=1, hi=MAX_SPAN_DAYS)
    return CalendlyConfig(
        base_url=reader.url("base_url", default=DEFAULT_BASE_URL),
        event_type=event_type,
        token=token,
        max_span=timedelta(days=days),
    )


class CalendlyProvider(Provider):
    """Calendly API v2 ``/event_type_available_times`` for one event type.

    "Now" is the run's HTTP wall clock (``context.http.wall_clock``), the clock the
    rate-limit gate also uses, so tests fix it by handing in an ``HttpSession``.
    """

    name = "calendly"

    def validate_config(self, config: Mapping[str, Any]) -> None:
        read_config(config, self.context.environ)

    def fetch(self, request: FetchRequest) -> list[datetime]:
        config = read_config(request.config, self.context.environ)
        http = self.context.http
        now = datetime.fromtimestamp(math.ceil(http.wall_clock()), UTC)
        url = f"{config.base_url}/event_type_available_times"
        what = f"calendly: GET {path_of(url)}"
        headers = {"Authorization": f"Bearer {config.token}"}
        gate_key = credential_key(self.name, config.base_url, config.token)
        slots: list[datetime] = []
        # Every part must succeed: a window with a missing week must not be cached as whole.
        for start, end in split_window(max(request.window_start, now + START_LEAD),
                                       request.window_end, config.max_span):
            params = {"event_type": config.event_type, "start_time": _iso(start),
                      "end_time": _iso(end)}
            body = http.get(request, url, what=what, params=params, headers=headers,
                            gate_key=gate_key, rate_limit=rate_limit_wait)
            slots.extend(parse_available_times(body, what))
        return slots



def parse_available_times(body: Any, what: str) -> list[datetime]:
    """Start times of the available entries; PermanentProviderError saying what is wrong."""
    if not isinstance(body, dict):
        raise PermanentProviderError(f"{what}: expected a JSON object, got {_kind(body)}")
    if "collection" not in body:
        if "title" in body or "message" in body:
            raise PermanentProviderError(
                f"{what}: the API answered with an error: {_error_message(body)}"
            )
        raise PermanentProviderError(f"{what}: the response has no collection")
    collection = body["collection"]
    if not isinstance(collection, list):
        raise PermanentProviderError(
            f"{what}: collection must be a list of available times, got {_kind(collection)}"
        )
    slots: list[datetime] = []
    for i, item in enumerate(collection):
        where = f"collection[{i}]"
        if not isinstance(item, dict):
            raise PermanentProviderError(f"{what}: {where} must be an object, got {_kind(item)}")
        status = item.get("status")
        if not isinstance(status, str):
            raise PermanentProviderError(
                f"{what}: {where}.status must be a string, got {_kind(status)}"
            )
        remaining = item.get("invitees_remaining")
        if remaining is not None and (isinstance(remaining, bool)
                                      or not isinstance(remaining, int)):
            raise PermanentProviderError(
                f"{what}: {where}.invitees_remaining must be an integer, got {_kind(remaining)}"
            )
        start = _instant(item.get("start_time"), f"{where}.start_time", what)
        if status == "available" and (remaining is None or remaining > 0):
            slots.append(start)
    return slots


def rate_limit_wait(headers: Mapping[str, str], now_epoch: float) -> float | None:
    """Seconds until an exhausted Calendly limit resets, or None while requests remain.

    Calendly sends ``X-RateLimit-Remaining`` and ``X-RateLimit-Reset``, the latter in
    seconds *from now* (not a Unix time). Exhausted without a readable reset: 60 s.
    """
    lowered = {name.lower(): value for name, value in headers.items()}
    remaining = _number(lowered.get("x-ratelimit-remaining"))
    if remaining is None or remaining > 0:
        return None
    reset = _number(lowered.get("x-ratelimit-reset"))
    return DEFAULT_RATE_LIMIT_SECONDS if reset is None else max(0.0, reset)


# --- reading values ----------------------------------------------------------------------


def _iso(instant: datetime) -> str:
    # The format of Calendly's own examples: microseconds and Z.
    return instant.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")



def _error_message(body: dict[str, Any]) -> str:
    parts = [v for v in (body.get("title"), body.get("message"))
             if isinstance(v, str) and v.strip()]
    return _excerpt(": ".join(parts)) or "no message"




