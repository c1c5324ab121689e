"""The ``http`` provider: free slots from an in-house JSON endpoint.

provider_config keys:
  url           (required) URL template, http or https; ``{workspace_id}`` is replaced by
                the workspace id, URL-quoted (``https://cal.internal/v1/{workspace_id}/free``)
  headers       (object of strings) extra request headers
  token         (string) sent as ``Authorization: Bearer <token>``, or as the raw value
                of the header named by ``token_header``
  token_env     (string) the environment variable holding the token (instead of ``token``)
  token_header  (string) send the token in this header instead of Authorization
  start_param   (string, default "start") query parameter for the window start
  end_param     (string, default "end") query parameter for the window end
  params        (object of strings or integers) extra constant query parameters

The call is ``GET url?start=...&end=...`` with both instants in ISO-8601 UTC
(``2026-12-01T00:00:00Z``). The documented answers, all with instants that carry an
offset (``Z`` or ``+hh:mm``)::

    ["2026-12-01T09:00:00Z", "2026-12-01T09:30:00+01:00"]
    [{"start": "2026-12-01T09:00:00Z", "end": "..."}]
    {"slots": <either list above>}

Anything else is a PermanentProviderError saying what was wrong and where
("http: slots[3] is not an ISO-8601 instant with an offset"). Instants outside the
window and duplicates are allowed: the refresh job drops and merges them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from ._config import ConfigReader
from ._http import credential_key, path_of
from ._shape import kind as _kind
from ._shape import shown as _shown
from .base import (
    FetchRequest,
    PermanentProviderError,
    Provider,
    ProviderError,
    RetryableProviderError,
)

_KEYS = {"url", "headers", "token", "token_env", "token_header", "start_param", "end_param",
         "params"}
_PLACEHOLDER = "{workspace_id}"
_ANY_PLACEHOLDER = re.compile(r"\{[^{}]*\}")
#: RFC 9110 token characters: what a header name may be made of.
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
#: Visible ASCII, space and tab: what this job sends as a header value.
_HEADER_VALUE = re.compile(r"[\t\x20-\x7e]*")
#: Longer strings are not instants; they are not even parsed.
_MAX_INSTANT_CHARS = 64


@dataclass(frozen=True)
class _Settings:
    url_template: str
    headers: dict[str, str]
    token: str | None
    token_header: str | None
    start_param: str
    end_param: str
    params: dict[str, str]


class HttpJsonProvider(Provider):
    """Slots from ``GET <url>?start=...&end=...`` answering a JSON list of instants."""

    name = "http"

    def validate_config(self, config: Mapping[str, Any]) -> None:
        self._settings(config)

    def fetch(self, request: FetchRequest) -> list[datetime]:
        settings = self._settings(request.config)
        url = settings.url_template.replace(_PLACEHOLDER, quote(request.workspace_id, safe=""))
        params = dict(settings.params)
        params[settings.start_param] = _iso_z(request.window_start)
        params[settings.end_param] = _iso_z(request.window_end)
        url = _with_params(url, params)
        headers = dict(settings.headers)
        if settings.token is not None:
            if settings.token_header is None:
                headers["Authorization"] = f"Bearer {settings.token}"
            else:
                headers[settings.token_header] = settings.token
        what = f"http: GET {path_of(url)}"
        try:
            body = self.context.http.get(
                request, url, what=what, headers=headers,
                gate_key=_gate_key(settings, url),
            )
            return _parse(body)
        except ProviderError as exc:
            # The error body excerpt or a slot value may echo the token back: strip it
            # here too, so the message is clean wherever it ends up.
            raise _without_secret(exc, settings.token) from None

    def _settings(self, config: Mapping[str, Any]) -> _Settings:
        reader = ConfigReader("http", config, self.context.environ)
        reader.only(_KEYS)
        reader.url("url")  # scheme, host and no user:password@
        template = reader.required_text("url")
        for placeholder in _ANY_PLACEHOLDER.findall(template):
            if placeholder != _PLACEHOLDER:
                raise reader.error(
                    "url", f"a URL whose only placeholder is {_PLACEHOLDER}, found {placeholder}"
                )
        if not _has_valid_port(template.replace(_PLACEHOLDER, "x")):
            raise reader.error("url", "a URL with a valid port number")

        headers = reader.headers("headers")
        for name, value in headers.items():
            if not _HEADER_NAME.fullmatch(name):
                raise reader.error("headers", f"valid header names, not {_shown(name)}")
            if not _HEADER_VALUE.fullmatch(value):
                raise reader.error(
                    "headers", f"printable ASCII header values (check headers.{name})"
                )

        token = reader.secret(required=False)
        if token is not None and not _HEADER_VALUE.fullmatch(token):
            # Never show the value: a newline from `echo $TOKEN > file` is the usual culprit.
            raise PermanentProviderError(
                "http: the token contains characters not allowed in an HTTP header "
                "(a trailing newline?)"
            )
        token_header = reader.text("token_header")
        if token_header is not None:
            if not _HEADER_NAME.fullmatch(token_header):
                raise reader.error("token_header", "a valid HTTP header name")
            if token is None:
                raise PermanentProviderError(
                    "http: provider_config.token_header is set but neither token nor "
                    "token_env is"
                )
        if token is not None:
            sent_as = (token_header or "Authorization").lower()
            if any(name.lower() == sent_as for name in headers):
                raise PermanentProviderError(
                    f"http: provider_config.headers sets {token_header or 'Authorization'}, "
                    "which carries the token; set it in one place only"
                )

        start_param = reader.text("start_param", default="start")
        end_param = reader.text("end_param", default="end")
        assert start_param is not None and end_param is not None
        if start_param == end_param:
            raise reader.error("end_param", f"different from start_param ({start_param!r})")
        params = _params(reader)
        in_url = {k for k, _ in parse_qsl(urlsplit(template).query, keep_blank_values=True)}
        for key, name in (("start_param", start_param), ("end_param", end_param)):
            for where, names in (("params", params), ("url", in_url)):
                if name in names:
                    raise PermanentProviderError(
                        f"http: provider_config.{where} sets {name!r}, which is the window's "
                        f"{key}; remove it from {where}"
                    )
        return _Settings(template, headers, token, token_header, start_param, end_param, params)


def _params(reader: ConfigReader) -> dict[str, str]:
    value = reader.config.get("params", {})
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and k and isinstance(v, str | int) and not isinstance(v, bool)
        for k, v in value.items()
    ):
        raise reader.error("params", "an object of parameter names to strings or integers")
    return {k: str(v) for k, v in value.items()}


def _gate_key(settings: _Settings, url: str) -> str:
    """The rate-limit gate's key: which workspaces share one throttle.

    With a credential (a token or configured headers), the template with its constant
    params, at this request's origin: workspaces sharing that credential on that server
    share its throttle, whatever their ids. Without one, this very URL: nothing shows
    that two tokenless workspaces are the same client, so they never share.
    """
    if settings.token is None and not settings.headers:
        return credential_key("http", url)
    template = urlsplit(_with_params(settings.url_template, settings.params))
    origin = urlsplit(url)
    keyed = urlunsplit(template._replace(scheme=origin.scheme, netloc=origin.netloc))
    return credential_key("http", keyed, settings.token, headers=settings.headers)


def _with_params(url: str, params: Mapping[str, str]) -> str:
    """``url`` with ``params`` appended to its query (httpx's params= would replace it)."""
    parts = urlsplit(url)
    query = "&".join(q for q in (parts.query, urlencode(params)) if q)
    return urlunsplit(parts._replace(query=query))


def _has_valid_port(url: str) -> bool:
    try:
        urlsplit(url).port  # noqa: B018 (the property raises ValueError on a bad port)
    except ValueError:
        return False
    return True


def _iso_z(instant: datetime) -> str:
    return instant.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _parse(body: Any) -> list[datetime]:
    """The slot instants of a documented answer; PermanentProviderError naming the bad part."""
    slots = body
    if isinstance(body, dict):
        if "slots" not in body:
            # Each key quoted whole or described: an echoed token must never be cut.
            keys = ", ".join(sorted(_shown(k) for k in body)[:5]) or "none"
            raise PermanentProviderError(
                f'http: the response is an object without "slots" (keys: {keys}); expected '
                'a list of instants or {"slots": [...]}'
            )
        slots = body["slots"]
    elif not isinstance(body, list):
        raise PermanentProviderError(
            f"http: the response is {_kind(body)}; expected a list of instants or "
            '{"slots": [...]}'
        )
    if not isinstance(slots, list):
        raise PermanentProviderError(f'http: "slots" is {_kind(slots)}, expected a list')

    instants: list[datetime] = []
    for index, item in enumerate(slots):
        label = f"slots[{index}]"
        if isinstance(item, dict):
            if "start" not in item:
                raise PermanentProviderError(f'http: {label} is an object without "start"')
            item, label = item["start"], f"{label}.start"
        instants.append(_instant(item, label))
    return instants


def _instant(value: Any, label: str) -> datetime:
    if not isinstance(value, str):
        raise PermanentProviderError(
            f"http: {label} is {_kind(value)}, expected an ISO-8601 instant string"
        )
    shown = _shown(value, json.dumps)  # whole or described, never cut: it may echo the token
    try:
        if len(value) > _MAX_INSTANT_CHARS:
            raise ValueError("too long")
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise PermanentProviderError(
            f"http: {label} is not an ISO-8601 instant with an offset: {shown}"
        ) from None
    if parsed.tzinfo is None or parsed.utcoffset() is None:
        raise PermanentProviderError(
            f"http: {label} is not an ISO-8601 instant with an offset (no Z or +hh:mm): {shown}"
        )
    try:
        return parsed.astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:00+05:00 is before year 1 in UTC
        raise PermanentProviderError(f"http: {label} is out of range: {shown}") from None



def _without_secret(exc: ProviderError, secret: str | None) -> ProviderError:
    """``exc`` itself if its message does not contain ``secret``, else a scrubbed copy."""
    message = str(exc)
    if not secret or secret not in message:
        return exc
    message = message.replace(secret, "***")
    if isinstance(exc, RetryableProviderError):
        return RetryableProviderError(message, retry_after=exc.retry_after,
                                      rate_limited=exc.rate_limited)
    return type(exc)(message)
