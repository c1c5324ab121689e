"""Redirects of ics feeds: configured headers stay at their origin, HTTPS never drops to HTTP.

Two loopback servers on different ports are two origins; each records the headers it
received. The HTTPS server uses a throwaway CA (trustme) that only the test's
HttpSession trusts.
"""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

import pytest
import trustme
from helpers import refreshing
from httpserver import LocalServer, Reply

from availability_cron.providers import FetchRequest, PermanentProviderError, ProviderContext
from availability_cron.providers._http import MAX_REDIRECTS, HttpSession, redirect_hop
from availability_cron.providers.ics import IcsProvider
from availability_cron.providers.scopes import SecretScopes

FEED = "\r\n".join(["BEGIN:VCALENDAR", "VERSION:2.0", "PRODID:-//t//t//EN", "END:VCALENDAR", ""])
ENVIRON = {"ICS_TOKEN": "tok-s3cret"}
SECRET_HEADERS = {"X-Api-Key": "key-s3cret", "X-Team": "blue"}


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def https_server(ca: trustme.CA) -> Iterator[LocalServer]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    server = LocalServer(tls=context).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def other_server() -> Iterator[LocalServer]:
    """A second origin: the same host on another port."""
    server = LocalServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def provider(ca: trustme.CA, http_server, https_server) -> Iterator[IcsProvider]:
    """The ics provider, trusting the test CA; the operator lets the token go to the two
    first origins (http_server, https_server) only, never to other_server."""
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    scopes = SecretScopes.from_setting(json.dumps({"ICS_TOKEN": {
        "workspaces": "*", "hosts": [http_server.base_url, https_server.base_url]}}))
    p = IcsProvider(ProviderContext(environ=ENVIRON, http=HttpSession(verify=client_context),
                                    secret_scopes=scopes))
    yield p
    p.context.http.close()


def fetch(provider: IcsProvider, url: str) -> list[datetime]:
    config: Mapping[str, Any] = {"url": url, "timezone": "UTC", "token_env": "ICS_TOKEN",
                                 "headers": SECRET_HEADERS}
    with refreshing("ws-1", provider.context):
        provider.validate_config(config)
        start = datetime(2026, 10, 20, tzinfo=UTC)
        request = FetchRequest("ws-1", config, start, start.replace(day=21),
                               deadline=time.monotonic() + 10)
        return list(provider.fetch(request))


def redirect(to: str, status: int = 302) -> Reply:
    return Reply(status, "", headers={"Location": to})


def feed_at(server: LocalServer, path: str = "/feed.ics") -> str:
    server.route(path, Reply(200, FEED, headers={"Content-Type": "text/calendar"}))
    return server.url(path)


def assert_no_configured_header(headers: Mapping[str, str]) -> None:
    assert "authorization" not in headers
    assert "x-api-key" not in headers and "x-team" not in headers
    assert "s3cret" not in repr(headers)


# --- where configured headers go ------------------------------------------------------------


def test_configured_headers_and_the_token_are_not_sent_to_another_origin(
    provider, http_server, other_server
):
    http_server.route("/feed.ics", redirect(feed_at(other_server)))

    fetch(provider, http_server.url("/feed.ics"))

    first, = http_server.requests
    assert first.headers["authorization"] == "Bearer tok-s3cret"
    assert first.headers["x-api-key"] == "key-s3cret"
    there, = other_server.requests
    assert_no_configured_header(there.headers)
    # The job's own headers still go along.
    assert there.headers["accept"].startswith("text/calendar")
    assert there.headers["user-agent"].startswith("availability-cron")


def test_a_redirect_within_the_origin_keeps_the_configured_headers(provider, http_server):
    feed_at(http_server, "/new.ics")
    http_server.route("/old.ics", redirect("/new.ics", 301))

    fetch(provider, http_server.url("/old.ics"))

    assert [seen.path for seen in http_server.requests] == ["/old.ics", "/new.ics"]
    assert http_server.requests[1].headers["x-api-key"] == "key-s3cret"
    assert http_server.requests[1].headers["authorization"] == "Bearer tok-s3cret"


def test_headers_dropped_at_a_cross_origin_hop_are_not_restored_on_the_way_back(
    provider, http_server, other_server
):
    feed_at(http_server, "/back.ics")
    http_server.route("/feed.ics", redirect(other_server.url("/bounce")))
    other_server.route("/bounce", redirect(http_server.url("/back.ics"), 307))

    fetch(provider, http_server.url("/feed.ics"))

    assert [seen.path for seen in http_server.requests] == ["/feed.ics", "/back.ics"]
    assert_no_configured_header(other_server.requests[0].headers)
    assert_no_configured_header(http_server.requests[1].headers)


def test_an_https_redirect_to_another_https_origin_drops_the_configured_headers(
    provider, https_server, ca
):
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    second = LocalServer(tls=context).start()
    try:
        https_server.route("/feed.ics", redirect(feed_at(second), 308))

        fetch(provider, https_server.url("/feed.ics"))

        assert https_server.requests[0].headers["x-api-key"] == "key-s3cret"
        assert_no_configured_header(second.requests[0].headers)
    finally:
        second.stop()


# --- what is refused ------------------------------------------------------------------------


def test_a_redirect_from_https_to_http_is_refused_before_any_plain_request(
    provider, https_server, other_server
):
    https_server.route("/feed.ics", redirect(feed_at(other_server)))

    with pytest.raises(PermanentProviderError, match="from https to http") as info:
        fetch(provider, https_server.url("/feed.ics"))

    assert other_server.requests == []
    assert "s3cret" not in str(info.value)


def test_redirects_are_followed_a_bounded_number_of_times(provider, http_server):
    http_server.route("/loop.ics", redirect("/loop.ics"))

    with pytest.raises(PermanentProviderError, match=f"more than {MAX_REDIRECTS} redirects"):
        fetch(provider, http_server.url("/loop.ics"))

    assert len(http_server.requests) == MAX_REDIRECTS + 1


@pytest.mark.parametrize("location", ["file:///etc/passwd", "ftp://127.0.0.1/feed.ics",
                                      "http://user:pw@127.0.0.1/feed.ics"])
def test_a_redirect_to_a_url_the_job_would_not_accept_in_config_is_refused(
    provider, http_server, location
):
    http_server.route("/feed.ics", redirect(location))

    with pytest.raises(PermanentProviderError, match="redirected to") as info:
        fetch(provider, http_server.url("/feed.ics"))

    assert "passwd" not in str(info.value) and "pw@" not in str(info.value)
    assert len(http_server.requests) == 1


def test_a_redirect_without_a_location_is_a_permanent_error(provider, http_server):
    http_server.route("/feed.ics", Reply(302, ""))

    with pytest.raises(PermanentProviderError, match="without a Location"):
        fetch(provider, http_server.url("/feed.ics"))


# --- the hop rule itself --------------------------------------------------------------------

CONFIGURED = {"X-Api-Key": "k", "Authorization": "Bearer t"}
OWN = {"Accept": "text/calendar"}


@pytest.mark.parametrize(("current", "location", "target"), [
    ("https://cal.example/a/b.ics", "c.ics", "https://cal.example/a/c.ics"),
    ("https://cal.example/a/b.ics?x=1", "/d.ics", "https://cal.example/d.ics"),
    ("https://cal.example/a.ics", "https://CAL.example:443/e.ics", "https://CAL.example:443/e.ics"),
    ("http://cal.example:80/a.ics", "http://cal.example/f.ics", "http://cal.example/f.ics"),
])
def test_a_hop_within_the_origin_keeps_the_headers(current, location, target):
    assert redirect_hop(current, location, CONFIGURED, OWN, "t") == (target, CONFIGURED)


@pytest.mark.parametrize(("current", "location"), [
    ("https://cal.example/a.ics", "https://other.example/a.ics"),  # host
    ("https://cal.example/a.ics", "https://cal.example:8443/a.ics"),  # port
    ("http://cal.example/a.ics", "https://cal.example/a.ics"),  # scheme
    ("https://cal.example/a.ics", "//evil.example/a.ics"),  # scheme-relative
])
def test_a_hop_to_another_origin_keeps_only_the_jobs_own_headers(current, location):
    target, headers = redirect_hop(current, location, CONFIGURED, OWN, "t")

    assert headers == OWN
    assert target.endswith("/a.ics")
