"""Dead-man's switch: tell a Healthchecks.io-style monitor that a run started and how it ended.

The protocol (https://healthchecks.io/docs/http_api/), against ``AVAILABILITY_CRON_PING_URL``:

- ``POST <url>/start?rid=<uuid>`` when the run begins;
- ``POST <url>?rid=<uuid>`` with the JSON summary as the body when it ends with exit 0
  (a run skipped because another run holds the lock is alive, so it pings success);
- ``POST <url>/fail?rid=<uuid>`` with the summary (or the error) when it ends otherwise.

The monitor alerts when no success arrives in time, so a cron that stopped, a host that
died or a run that hangs are all noticed: exactly what an exit code cannot report.

``rid`` lets the monitor pair a start with its end (and time the run). Healthchecks
requires a UUID, so the CLI draws one UUID per run and takes the run id from it: the
``runId`` of the summary and of every log line is the first 12 hex digits of ``rid``.

Contract: a ping never fails the run and never changes its exit code. :meth:`Pinger.start`
returns at once (the request runs on a daemon thread, so a slow monitor does not eat the
run's budget); :meth:`Pinger.finish` returns within :data:`TIMEOUT_SECONDS`, whatever the
monitor does (hangs, drips, refuses, answers 500). Failures are logged at WARNING naming
only the scheme and host: the URL's path is the check's secret (whoever has it can ping).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

log = logging.getLogger(__name__)

#: The most a run waits for its pings, in seconds: the end of a run is delayed by at most
#: this much (the start ping runs alongside the run). Deployment timeouts count it in.
TIMEOUT_SECONDS = 3.0
#: Healthchecks stores at most 100 kB of a ping's body; a summary is well under 2 kB.
MAX_BODY_BYTES = 100_000


def where(url: str) -> str:
    """The scheme and host of ``url``, for log lines: never its path, query or credentials."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}"


class Pinger:
    """The pings of one run. Call :meth:`start` once, then :meth:`finish` once, from the
    main thread. Neither raises. Build it with :func:`pinger` (which does not raise either).
    """

    def __init__(
        self,
        url: str,
        rid: uuid.UUID,
        *,
        timeout: float = TIMEOUT_SECONDS,
        user_agent: str = "availability-cron",
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        # Imported here, on the main thread: a ping thread may be abandoned mid-request,
        # and it must not be the one holding httpx's import when the process exits.
        import httpx

        self.url = url.rstrip("/")
        self.rid = str(rid)
        self.timeout = timeout
        self.monotonic = monotonic
        self._where = where(url)
        self._client = httpx.Client(
            timeout=httpx.Timeout(timeout),
            follow_redirects=False,
            headers={"User-Agent": user_agent},
        )
        self._started: threading.Thread | None = None

    def start(self) -> None:
        """Send the start ping in the background and return at once. Never raises."""
        try:
            self._started = self._send("start", "/start", b"")
        except Exception as exc:  # e.g. no thread could be started: the run goes on
            log.warning("dead-man's-switch start ping to %s not sent: %s", self._where,
                        type(exc).__name__)

    def finish(self, body: str, *, ok: bool) -> None:
        """Send the success (``ok``) or fail ping with ``body``; return within the timeout.

        Waits for the start ping first (within the same bound), so that the monitor never
        sees the end of a run before its start. If the start ping is still unanswered at
        the bound, the end ping is not sent: that monitor is not answering anyway.
        Never raises.
        """
        try:
            self._finish(body, ok=ok)
        except Exception as exc:
            log.warning("dead-man's-switch ping to %s not sent: %s", self._where,
                        type(exc).__name__)

    def _finish(self, body: str, *, ok: bool) -> None:
        deadline = self.monotonic() + self.timeout
        if self._started is not None:
            self._started.join(max(0.0, deadline - self.monotonic()))
            if self._started.is_alive():
                log.warning("dead-man's-switch ping to %s: no answer to the start ping within "
                            "%.0fs; not sending the %s ping", self._where, self.timeout,
                            "success" if ok else "fail")
                return
        data = body.encode("utf-8")[:MAX_BODY_BYTES]
        sending = self._send("success" if ok else "fail", "" if ok else "/fail", data)
        sending.join(max(0.0, deadline - self.monotonic()))
        if sending.is_alive():
            log.warning("dead-man's-switch ping to %s: no answer within %.0fs; not waiting",
                        self._where, self.timeout)
        else:
            self._client.close()

    def _send(self, kind: str, suffix: str, body: bytes) -> threading.Thread:
        thread = threading.Thread(target=self._post, args=(kind, suffix, body),
                                  name=f"ping-{kind}", daemon=True)
        thread.start()
        return thread

    def _post(self, kind: str, suffix: str, body: bytes) -> None:
        import httpx

        try:
            response = self._client.post(
                ping_url(self.url, suffix, self.rid), content=body,
                headers={"Content-Type": "application/json"} if body else None,
            )
        except httpx.HTTPError as exc:
            # The exception's text may quote the URL; its type says enough.
            log.warning("dead-man's-switch %s ping to %s failed: %s", kind, self._where,
                        type(exc).__name__)
            return
        except Exception as exc:  # never let a ping break anything; still say so
            log.warning("dead-man's-switch %s ping to %s failed: unexpected %s", kind,
                        self._where, type(exc).__name__)
            return
        if not 200 <= response.status_code < 300:
            log.warning("dead-man's-switch %s ping to %s answered HTTP %d", kind, self._where,
                        response.status_code)
        else:
            log.debug("dead-man's-switch %s ping sent", kind)


def pinger(url: str | None, rid: uuid.UUID, *, user_agent: str) -> Pinger | None:
    """A :class:`Pinger` for ``url``, or None when no URL is set or it cannot be built
    (logged): the dead-man's switch must never be the reason a run does not happen."""
    if not url:
        return None
    try:
        return Pinger(url, rid, user_agent=user_agent)
    except Exception as exc:
        log.warning("dead-man's-switch ping to %s disabled for this run: %s", where(url),
                    type(exc).__name__)
        return None


def ping_url(base: str, suffix: str, rid: str) -> str:
    """``base`` with ``suffix`` ("/start", "/fail" or "") appended to its *path* and ``rid``
    added to its query, keeping any query it has (Healthchecks' ``?create=1``): appending
    to the string would put "/fail" inside the query, and a failing run would then be
    reported as a success."""
    parts = urlsplit(base)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "rid"]
    query.append(("rid", rid))
    return urlunsplit(parts._replace(path=parts.path.rstrip("/") + suffix,
                                     query=urlencode(query)))

