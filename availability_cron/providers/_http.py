"""HTTP for providers: one shared httpx client per run, deadline-bounded calls, error classes.

What every HTTP provider gets from :meth:`HttpSession.get`:

- connection reuse across workspaces (one ``httpx.Client`` per run, thread-safe);
- a timeout that is never longer than what is left of the run, and a total-time check
  while the body streams in (httpx's timeouts are per phase, so a server dripping one
  byte a second would otherwise outlive the run);
- a body size cap (:data:`MAX_BODY_BYTES`) on the bytes received and on the decoded body,
  with gzip and deflate inflated step by step (``_body``), and a bound on what a JSON
  answer may build, so a hostile server cannot exhaust memory, not even with a
  compression bomb;
- redirects followed only when asked (``follow_redirects``), by :func:`redirect_hop`
  one hop at a time: configured headers stay at the first origin, never https->http;
- status codes mapped once: 429 and 5xx/408 and network errors are retryable, 401/403,
  404 and other 4xx are permanent;
- at most :data:`ATTEMPTS` tries for transient failures (tenacity), never sleeping past
  the deadline; a 429 is not retried within the run: the workspace backs off instead;
- a per-run rate-limit gate: once a provider says a credential is exhausted (429, or a
  remaining count of 0), further calls with the same credential in this run fail fast
  with the provider's retry-after instead of adding to the overload;
- error messages with the status, the URL path (never the query) and a short excerpt of
  the provider's error, and no token.

httpx is imported on first use only: a run with no HTTP provider never loads it.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import math
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urljoin, urlsplit

from ._body import ACCEPT_ENCODING, MAX_JSON_WEIGHT, json_weight, load_json, read_capped
from ._body import MAX_BODY_BYTES as MAX_BODY_BYTES  # where the providers have always found it
from ._shape import excerpt
from .errors import PermanentProviderError, RetryableProviderError
from .scopes import Destinations

if TYPE_CHECKING:
    import ssl

    import httpx

    from .base import FetchRequest

#: Tries per request for transient failures (5xx, 408, timeouts, connection errors).
ATTEMPTS = 3
#: A retry is only made when at least this much time is left after the wait.
MIN_SECONDS_FOR_RETRY = 1.0
#: When a 429 names no delay, back off this long.
DEFAULT_RATE_LIMIT_SECONDS = 60.0
#: The longest wait a provider's Retry-After or rate-limit headers are taken at: a day,
#: past any backoff the job would keep (AVAILABILITY_CRON_MAX_BACKOFF_MS caps it anyway).
MAX_RETRY_AFTER_SECONDS = 86_400.0

#: Redirect hops followed at most, when a provider follows them at all (ics feeds).
MAX_REDIRECTS = 5
#: The statuses followed as redirects (303 too: every request here is a GET).
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_DEFAULT_PORTS = {"http": 80, "https": 443}

#: Reads a provider's own rate-limit headers: seconds until the limit resets, if exhausted.
RateLimitReader = Callable[["httpx.Headers", float], float | None]


def retry_after_seconds(value: str | None, now_epoch: float) -> float | None:
    """Parse a Retry-After header: delta-seconds or an HTTP date. None if absent or invalid.

    Not a finite number ("1e309", "inf", "nan") is invalid; a time in the past is 0; the
    wait is at most :data:`MAX_RETRY_AFTER_SECONDS`.
    """
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp() - now_epoch
    return capped_wait(seconds)


def capped_wait(seconds: float) -> float | None:
    """A provider's wait fit to keep and print: None unless finite, else 0..MAX."""
    if not math.isfinite(seconds):
        return None
    return min(max(0.0, seconds), MAX_RETRY_AFTER_SECONDS)


def credential_key(provider: str, url: str, secret: str | None = None, *,
                   headers: Mapping[str, str] | None = None) -> str:
    """Identify one credential at one origin, without keeping the secret itself.

    The fingerprint covers everything that may carry a credential: the token, the
    configured headers (names case-folded), and the URL's path and query (for the ``http``
    provider a token often lives there). Two workspaces share a key, and so one 429, only
    when all of these are identical; one tenant's throttle never gates another tenant.
    Pass the URL as configured (for ``http`` the template, before the workspace id is put
    in), so workspaces that really share one credential share its key too.
    """
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    origin = f"{parts.scheme.lower()}://{(parts.hostname or '').lower()}"
    origin += f":{port}" if port else ""
    material = json.dumps([
        secret or "",
        sorted((name.lower(), value) for name, value in (headers or {}).items()),
        parts.path.rstrip("/"),
        sorted(parse_qsl(parts.query, keep_blank_values=True)),
    ])
    fingerprint = hashlib.sha256(material.encode()).hexdigest()[:24]
    return f"{provider}|{origin}|{fingerprint}"


class HttpSession:
    """The run's shared HTTP client and rate-limit gate. Thread-safe; close once."""

    def __init__(self, user_agent: str = "availability-cron",
                 wall_clock: Callable[[], float] = time.time,
                 verify: ssl.SSLContext | None = None) -> None:
        self.user_agent = user_agent
        self.wall_clock = wall_clock
        #: TLS verification: None is the system's default trust; tests pass their own CA.
        self.verify = verify
        self._client: httpx.Client | None = None
        self._lock = threading.Lock()
        #: credential key -> wall-clock epoch until which it is rate limited
        self._blocked_until: dict[str, float] = {}
        #: Where the operator's scoped secrets may go (see scopes); set by ProviderContext.
        self._destinations = Destinations()

    def protect(self, destinations: Destinations) -> None:
        """Refuse, from now on, every request carrying a scoped secret where its rules do
        not allow it: on every thread and every redirect hop, whoever built the request."""
        self._destinations = destinations

    def client(self) -> httpx.Client:
        with self._lock:
            if self._client is None:
                import httpx

                self._client = httpx.Client(
                    headers={"User-Agent": self.user_agent, "Accept": "application/json",
                             "Accept-Encoding": ACCEPT_ENCODING},
                    follow_redirects=False,
                    verify=True if self.verify is None else self.verify,
                    limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
                    # One client serves every workspace of the run: a cookie one tenant's
                    # server sets must never ride along on another tenant's request.
                    cookies=CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])),
                    # The last check before bytes leave, also for a plugin that uses the
                    # client directly (the explicit check in _get_once words the error).
                    event_hooks={"request": [self._check_request]},
                )
            return self._client

    def _check_request(self, outgoing: httpx.Request) -> None:
        self._destinations.check(str(outgoing.url), dict(outgoing.headers),
                                 what=f"{outgoing.method} {outgoing.url.path}")

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    # --- rate-limit gate ---------------------------------------------------------------

    def block(self, key: str, seconds: float) -> None:
        until = self.wall_clock() + max(0.0, seconds)
        with self._lock:
            self._blocked_until[key] = max(until, self._blocked_until.get(key, 0.0))

    def blocked_for(self, key: str) -> float | None:
        with self._lock:
            until = self._blocked_until.get(key)
        if until is None:
            return None
        left = until - self.wall_clock()
        return left if left > 0 else None

    # --- requests ----------------------------------------------------------------------

    def get(
        self,
        request: FetchRequest,
        url: str,
        *,
        what: str,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        accept: str | None = None,
        gate_key: str | None = None,
        rate_limit: RateLimitReader | None = None,
        follow_redirects: bool = False,
        parse_json: bool = True,
    ) -> Any:
        """GET ``url`` and return its JSON (or text, with ``parse_json=False``).

        ``what`` names the call in messages ("calcom: GET /v2/slots"). ``headers`` are
        the configured ones (tokens, API keys): with ``follow_redirects`` they are sent
        only while the redirects stay at ``url``'s origin (see :func:`redirect_hop`);
        ``accept`` is the job's own Accept header, sent on every hop. Raises
        RetryableProviderError or PermanentProviderError; never anything else.
        """
        if gate_key is not None:
            blocked = self.blocked_for(gate_key)
            if blocked is not None:
                raise RetryableProviderError(
                    f"{what}: rate limited by the provider earlier in this run; "
                    f"not calling again for {blocked:.0f}s",
                    retry_after=blocked, rate_limited=True,
                )
        from tenacity import (
            Retrying,
            retry_if_exception,
            stop_after_attempt,
            wait_exponential,
        )

        def transient(exc: BaseException) -> bool:
            if not isinstance(exc, RetryableProviderError) or exc.rate_limited:
                return False
            wait = exc.retry_after or 0.5
            return request.time_left() - wait >= MIN_SECONDS_FOR_RETRY

        def wait_for(state: Any) -> float:
            exc = state.outcome.exception()
            hinted = getattr(exc, "retry_after", None)
            backoff: float = wait_exponential(multiplier=0.25, max=2)(state)
            return min(max(hinted or 0.0, backoff), max(0.0, request.time_left() - 0.5))

        retrying = Retrying(
            stop=stop_after_attempt(ATTEMPTS),
            wait=wait_for,
            retry=retry_if_exception(transient),
            reraise=True,
            sleep=time.sleep,
        )
        for attempt in retrying:
            with attempt:
                return self._get_once(request, url, what=what, params=params, headers=headers,
                                      accept=accept, gate_key=gate_key, rate_limit=rate_limit,
                                      follow_redirects=follow_redirects, parse_json=parse_json)
        raise AssertionError("unreachable")  # pragma: no cover

    def _get_once(
        self,
        request: FetchRequest,
        url: str,
        *,
        what: str,
        params: Mapping[str, str] | None,
        headers: Mapping[str, str] | None,
        accept: str | None,
        gate_key: str | None,
        rate_limit: RateLimitReader | None,
        follow_redirects: bool,
        parse_json: bool,
    ) -> Any:
        import httpx

        own = {} if accept is None else {"Accept": accept}
        hop_url: str = url
        hop_headers: Mapping[str, str] = {**own, **(headers or {})}
        left = request.time_left()
        try:
            # Redirects are followed here, not by httpx: httpx keeps every header but
            # Authorization and Cookie on a hop to another host, and follows https->http.
            # Each hop has what is left of the deadline and the same body bounds.
            for hop in range(MAX_REDIRECTS + 1):
                # Before anything leaves: may a scoped secret go there?
                self._destinations.check(hop_url, hop_headers, params if hop == 0 else None,
                                         what=what)
                left = request.time_left()
                if left <= 0.05:
                    raise RetryableProviderError(f"{what}: no time left in the run's budget")
                with self.client().stream(
                    "GET", hop_url, params=params if hop == 0 else None, headers=hop_headers,
                    timeout=httpx.Timeout(left),
                ) as response:
                    if follow_redirects and response.status_code in REDIRECT_STATUSES:
                        hop_url, hop_headers = redirect_hop(
                            str(response.request.url), response.headers.get("Location"),
                            hop_headers, own, what)
                        continue
                    body = read_capped(response, request, what)
                    status, response_headers = response.status_code, response.headers
                    break
            else:
                raise PermanentProviderError(f"{what}: more than {MAX_REDIRECTS} redirects")
        except httpx.TimeoutException:
            raise RetryableProviderError(f"{what}: timed out after {left:.1f}s") from None
        except httpx.TransportError as exc:
            raise RetryableProviderError(
                f"{what}: connection failed ({type(exc).__name__})"
            ) from None
        except httpx.InvalidURL:
            raise PermanentProviderError(f"{what}: invalid URL") from None
        except UnicodeEncodeError:  # its message would quote the character and its place
            raise PermanentProviderError(
                f"{what}: a header or the URL holds characters HTTP cannot carry (not shown)"
            ) from None

        now_epoch = self.wall_clock()
        provider_reset = rate_limit(response_headers, now_epoch) if rate_limit else None
        if provider_reset is not None:  # a plugin's reader may return anything
            provider_reset = capped_wait(provider_reset)
        if 200 <= status < 300:
            if provider_reset is not None and gate_key is not None:
                self.block(gate_key, provider_reset)  # exhausted: spare the next calls
            if not parse_json:
                return body.decode("utf-8", errors="replace")
            return load_json(body, what, status)

        excerpt = _error_excerpt(body)
        retry_after = retry_after_seconds(response_headers.get("Retry-After"), now_epoch)
        if status == 429:
            delay = retry_after if retry_after is not None else provider_reset
            delay = DEFAULT_RATE_LIMIT_SECONDS if delay is None else delay
            if gate_key is not None:
                self.block(gate_key, delay)
            raise RetryableProviderError(
                f"{what}: HTTP 429 rate limited; retry after {delay:.0f}s{excerpt}",
                retry_after=delay, rate_limited=True,
            )
        if status >= 500 or status == 408:
            raise RetryableProviderError(f"{what}: HTTP {status}{excerpt}",
                                         retry_after=retry_after)
        if status in (401, 403):
            raise PermanentProviderError(
                f"{what}: HTTP {status}: authentication failed, check the token{excerpt}"
            )
        if status == 404:
            raise PermanentProviderError(f"{what}: HTTP 404 not found, check the ids{excerpt}")
        if 300 <= status < 400:
            raise PermanentProviderError(f"{what}: HTTP {status} redirect not followed")
        raise PermanentProviderError(f"{what}: HTTP {status}{excerpt}")


def redirect_hop(current: str, location: str | None, headers: Mapping[str, str],
                 own: Mapping[str, str], what: str) -> tuple[str, Mapping[str, str]]:
    """Where a redirect from ``current`` leads, and the headers to send there.

    ``headers`` are those sent to ``current``; ``own`` are the job's own (no secret in
    them). A hop to another origin (scheme, host or port) carries only ``own``, and so
    does every later hop, even one back to the first origin. Raises
    PermanentProviderError, naming neither URL (feed URLs hold secrets), for a redirect
    without a Location, to anything but an http(s) URL without credentials, or from
    https to http.
    """
    if not location or not location.strip():
        raise PermanentProviderError(f"{what}: a redirect without a Location header")
    target = urljoin(current, location.strip())
    parts = urlsplit(target)
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise PermanentProviderError(f"{what}: redirected to a URL that is not http or https")
    if parts.username is not None or parts.password is not None:
        raise PermanentProviderError(f"{what}: redirected to a URL with credentials in it")
    if urlsplit(current).scheme == "https" and parts.scheme == "http":
        raise PermanentProviderError(
            f"{what}: redirected from https to http; a feed is never fetched in clear text"
        )
    if _origin(current) != _origin(target):
        headers = own
    return target, headers


def _origin(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = -1  # an invalid port is its own origin; the request then reports the URL
    return (parts.scheme, (parts.hostname or "").lower(),
            _DEFAULT_PORTS.get(parts.scheme, -1) if port is None else port)


def _error_excerpt(body: bytes) -> str:
    """A short, single-line hint from an error body: its JSON message field, if any."""
    if json_weight(body) > MAX_JSON_WEIGHT:
        return ""  # an error body is only read for a hint: not worth 100 MB of objects
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return ""
    message: Any = None
    if isinstance(data, dict):
        for key in ("message", "error_description", "title", "error", "msg"):
            value = data.get(key)
            if isinstance(value, dict):
                value = value.get("message") or value.get("code")
            if isinstance(value, str) and value.strip():
                message = value
                break
    if not isinstance(message, str):
        return ""
    # Cut between words only: a token the server echoed stays whole, so it is scrubbed.
    return ": " + excerpt(message)


def path_of(url: str) -> str:
    """The path of a URL, for messages: never the query string, which may hold a token."""
    return urlsplit(url).path or "/"


def epoch_ms(instant: datetime) -> str:
    return str(int(instant.timestamp() * 1000))
