"""The ``calcom`` provider: the free slots of one Cal.com event type, from API v2.

One call per refresh: ``GET {base_url}/v2/slots`` with ``cal-api-version`` and, when a
token is configured, ``Authorization: Bearer``; the event type is named by id, or by
slug and username. The answer is ``{"status": "success", "data": {"<date>": [{"start":
"<ISO-8601 with offset>"}, ...]}}``; ``{"status": "error", "error": {...}}`` is a
permanent error even under HTTP 200. See docs/providers/calcom.md.

provider_config keys:
  event_type_id    (integer or digits)   the event type; or else both of:
  event_type_slug  (string)              the event type's slug, and
  username         (string)              its owner's username
  organization_slug (string, optional)   with slug and username: the owner's organization
  token / token_env                      API key, or the variable holding it (optional:
                                         public event types need none)
  api_version      (string, 2024-09-04)  the cal-api-version header
  base_url         (URL, https://api.cal.com)
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ._config import ConfigReader
from ._http import DEFAULT_RATE_LIMIT_SECONDS, credential_key, path_of
from ._shape import excerpt as _excerpt
from ._shape import instant as _instant
from ._shape import kind as _kind
from ._shape import number as _number
from ._shape import shown as _shown
from .base import FetchRequest, PermanentProviderError, Provider

DEFAULT_BASE_URL = "https://api.cal.com"
#: The version whose /v2/slots answer is the date-keyed shape parsed below.
DEFAULT_API_VERSION = "2024-09-04"

_KEYS = {"event_type_id", "event_type_slug", "username", "organization_slug", "token",
         "token_env", "api_version", "base_url"}
_VERSION = re.compile(r"\d{4}-\d{2}-\d{2}")
_REMAINING = "x-ratelimit-remaining-"
_RESET = "x-ratelimit-reset-"


@dataclass(frozen=True)
class CalcomConfig:
    """One workspace's validated provider_config."""

    base_url: str
    api_version: str
    token: str | None
    event_type_id: str | None
    event_type_slug: str | None
    username: str | None
    organization_slug: str | None

    def params(self, request: FetchRequest) -> dict[str, str]:
        if self.event_type_id is not None:
            event = {"eventTypeId": self.event_type_id}
        else:
            assert self.event_type_slug is not None and self.username is not None
            event = {"eventTypeSlug": self.event_type_slug, "username": self.username}
            if self.organization_slug is not None:
                event["organizationSlug"] = self.organization_slug
        return {**event, "start": _iso(request.window_start), "end": _iso(request.window_end),
                "timeZone": "UTC"}


def read_config(config: Mapping[str, Any], environ: Mapping[str, str]) -> CalcomConfig:
    """Validate ``config``; PermanentProviderError naming the key if it is unusable."""
    reader = ConfigReader("calcom", config, environ)
    reader.only(_KEYS)
    event_type_id = reader.identifier("event_type_id")
    slug = reader.text("event_type_slug")
    username = reader.text("username")
    organization = reader.text("organization_slug")
    if event_type_id is not None:
        if not (event_type_id.isascii() and event_type_id.isdigit()):
            raise reader.error("event_type_id", "a positive integer")
        if slug is not None or username is not None or organization is not None:
            raise PermanentProviderError(
                "calcom: set provider_config.event_type_id, or event_type_slug with "
                "username (and organization_slug), not both"
            )
    elif slug is None and username is None:
        raise reader.error("event_type_id", "set (or event_type_slug with username)")
    elif slug is None:
        raise reader.error("event_type_slug", "set together with username")
    elif username is None:
        raise reader.error("username", "set together with event_type_slug")
    api_version = reader.text("api_version", default=DEFAULT_API_VERSION)
    assert api_version is not None
    if not _VERSION.fullmatch(api_version):
        raise reader.error("api_version", "a date like 2024-09-04")
    return CalcomConfig(
        base_url=reader.url("base_url", default=DEFAULT_BASE_URL),
        api_version=api_version,
        token=reader.secret(required=False),
        event_type_id=event_type_id,
        event_type_slug=slug,
        username=username,
        organization_slug=organization,
    )


class CalcomProvider(Provider):
    """Cal.com API v2 ``/v2/slots`` for one event type."""

    name = "calcom"

    def validate_config(self, config: Mapping[str, Any]) -> None:
        read_config(config, self.context.environ)

    def fetch(self, request: FetchRequest) -> list[datetime]:
        config = read_config(request.config, self.context.environ)
        url = f"{config.base_url}/v2/slots"
        headers = {"cal-api-version": config.api_version}
        if config.token is not None:
            headers["Authorization"] = f"Bearer {config.token}"
        what = f"calcom: GET {path_of(url)}"
        body = self.context.http.get(
            request, url, what=what, params=config.params(request), headers=headers,
            gate_key=credential_key(self.name, config.base_url, config.token),
            rate_limit=rate_limit_wait,
        )
        return parse_slots(body, what)


def parse_slots(body: Any, what: str) -> list[datetime]:
    """The slot starts of a /v2/slots answer; PermanentProviderError saying what is wrong."""
    if not isinstance(body, dict):
        raise PermanentProviderError(f"{what}: expected a JSON object, got {_kind(body)}")
    status = body.get("status")
    if status == "error" or (status is None and body.get("error") is not None):
        raise PermanentProviderError(f"{what}: the API answered with an error: "
                                     f"{_error_message(body.get('error'))}")
    if status is not None and status != "success":
        raise PermanentProviderError(f"{what}: status is {_shown(status)}, expected 'success'")
    data = body.get("data")
    if not isinstance(data, dict):
        raise PermanentProviderError(
            f"{what}: data must be an object of dates to slot lists, got {_kind(data)}"
        )
    slots: list[datetime] = []
    for day, items in data.items():
        where = f"data[{_shown(day)}]"
        if not isinstance(items, list):
            raise PermanentProviderError(f"{what}: {where} must be a list of slots, "
                                         f"got {_kind(items)}")
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise PermanentProviderError(f"{what}: {where}[{i}] must be an object with a "
                                             f"start, got {_kind(item)}")
            slots.append(_instant(item.get("start"), f"{where}[{i}].start", what))
    return slots


def rate_limit_wait(headers: Mapping[str, str], now_epoch: float) -> float | None:
    """Seconds until an exhausted Cal.com limit resets, or None while requests remain.

    Cal.com sends ``X-RateLimit-Remaining-{Name}`` and ``X-RateLimit-Reset-{Name}`` for
    each limit it applies; the reset is the seconds left in the limit's window (its
    throttler's time-to-expire), not a Unix time, so ``now_epoch`` plays no part. The
    longest wait of the limits at 0 wins. An exhausted limit without a readable reset
    waits the default 60 s.
    """
    lowered = {name.lower(): value for name, value in headers.items()}
    waits: list[float] = []
    for name, value in lowered.items():
        if not name.startswith(_REMAINING):
            continue
        remaining = _number(value)
        if remaining is None or remaining > 0:
            continue
        reset = _number(lowered.get(_RESET + name.removeprefix(_REMAINING)))
        waits.append(DEFAULT_RATE_LIMIT_SECONDS if reset is None else max(0.0, reset))
    return max(waits) if waits else None


# --- reading values ----------------------------------------------------------------------


def _iso(instant: datetime) -> str:
    return instant.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")



def _error_message(error: Any) -> str:
    if isinstance(error, dict):
        error = error.get("message") or error.get("code")
    if isinstance(error, str) and error.strip():
        return _excerpt(error)
    return "no message"




