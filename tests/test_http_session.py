"""The shared HTTP layer of the providers, against a real loopback server."""

from __future__ import annotations

import time

import pytest
from httpserver import Reply

from availability_cron.providers import (
    FetchRequest,
    PermanentProviderError,
    RetryableProviderError,
)
from availability_cron.providers._http import (
    DEFAULT_RATE_LIMIT_SECONDS,
    MAX_BODY_BYTES,
    MAX_RETRY_AFTER_SECONDS,
    HttpSession,
    credential_key,
    retry_after_seconds,
)


def request(seconds: float = 5.0) -> FetchRequest:
    from datetime import UTC, datetime, timedelta

    start = datetime(2026, 12, 1, tzinfo=UTC)
    return FetchRequest("ws-1", {}, start, start + timedelta(days=30),
                        deadline=time.monotonic() + seconds)


@pytest.fixture
def session():
    s = HttpSession()
    yield s
    s.close()


def test_a_json_body_is_returned_parsed(http_server, session):
    http_server.route("/ok", Reply(200, {"a": [1, 2]}))
    assert session.get(request(), http_server.url("/ok"), what="t") == {"a": [1, 2]}


def test_a_429_is_retryable_with_its_retry_after_and_is_not_retried_in_the_run(
    http_server, session
):
    http_server.route("/limited", Reply(429, {"message": "slow down"},
                                        headers={"Retry-After": "30"}))
    key = credential_key("t", http_server.url(), "tok")
    with pytest.raises(RetryableProviderError) as info:
        session.get(request(), http_server.url("/limited"), what="t", gate_key=key)
    assert info.value.retry_after == 30 and info.value.rate_limited
    assert "HTTP 429" in str(info.value) and "slow down" in str(info.value)
    assert len(http_server.requests) == 1
    # The same credential is not called again in this run.
    with pytest.raises(RetryableProviderError, match="rate limited"):
        session.get(request(), http_server.url("/limited"), what="t", gate_key=key)
    assert len(http_server.requests) == 1


@pytest.mark.parametrize("value", ["1e309", "inf", "-inf", "nan", "NaN"])
def test_a_retry_after_that_is_no_finite_number_is_ignored_not_printed(http_server, session,
                                                                         value):
    http_server.route("/limited", Reply(429, {}, headers={"Retry-After": value}))
    with pytest.raises(RetryableProviderError) as info:
        session.get(request(), http_server.url("/limited"), what="t")
    assert info.value.retry_after == DEFAULT_RATE_LIMIT_SECONDS
    assert "retry after 60s" in str(info.value)
    assert "inf" not in str(info.value) and "nan" not in str(info.value)


def test_a_huge_retry_after_is_capped_at_a_day(http_server, session):
    http_server.route("/limited", Reply(429, {}, headers={"Retry-After": "1e300"}))
    with pytest.raises(RetryableProviderError) as info:
        session.get(request(), http_server.url("/limited"), what="t")
    assert info.value.retry_after == MAX_RETRY_AFTER_SECONDS == 86_400
    assert "retry after 86400s" in str(info.value)


def test_a_5xx_is_retried_and_a_later_success_wins(http_server, session):
    answers = iter([Reply(503, {"message": "busy"}), Reply(502), Reply(200, [1])])
    http_server.route("/flaky", lambda _seen: next(answers))
    assert session.get(request(), http_server.url("/flaky"), what="t") == [1]
    assert len(http_server.requests) == 3


def test_a_5xx_is_not_retried_when_too_little_time_is_left(http_server, session):
    http_server.route("/down", Reply(500))
    with pytest.raises(RetryableProviderError, match="HTTP 500"):
        session.get(request(seconds=0.8), http_server.url("/down"), what="t")
    assert len(http_server.requests) == 1


@pytest.mark.parametrize(("status", "text"), [(401, "authentication failed"),
                                              (403, "authentication failed"),
                                              (404, "not found"), (400, "HTTP 400")])
def test_client_errors_are_permanent_and_not_retried(http_server, session, status, text):
    http_server.route("/no", Reply(status, {"message": "nope"}))
    with pytest.raises(PermanentProviderError, match=text):
        session.get(request(), http_server.url("/no"), what="t")
    assert len(http_server.requests) == 1


def test_a_body_over_the_cap_is_a_permanent_error(http_server, session):
    http_server.route("/huge", Reply(200, b"[" + b"1," * (MAX_BODY_BYTES // 2) + b"1]"))
    with pytest.raises(PermanentProviderError, match="exceeds"):
        session.get(request(), http_server.url("/huge"), what="t")


def test_a_body_that_is_not_json_is_a_permanent_error(http_server, session):
    http_server.route("/html", Reply(200, "<html>maintenance</html>"))
    with pytest.raises(PermanentProviderError, match="not valid JSON"):
        session.get(request(), http_server.url("/html"), what="t")


def test_a_server_slower_than_the_deadline_gives_a_timeout_in_time(http_server, session):
    http_server.route("/slow", Reply(200, [1], delay=5))
    started = time.monotonic()
    with pytest.raises(RetryableProviderError, match="timed out"):
        session.get(request(seconds=1.0), http_server.url("/slow"), what="t")
    assert time.monotonic() - started < 2.5


def test_a_body_dripping_past_the_deadline_is_cut_off(http_server, session):
    http_server.route("/drip", Reply(200, {"slots": list(range(50))}, drip=0.05))
    started = time.monotonic()
    with pytest.raises(RetryableProviderError, match="timed out"):
        session.get(request(seconds=1.0), http_server.url("/drip"), what="t")
    assert time.monotonic() - started < 2.5


def test_a_refused_connection_is_retryable(session):
    with pytest.raises(RetryableProviderError, match="connection failed"):
        session.get(request(seconds=0.5), "http://127.0.0.1:1/x", what="t")


def test_retry_after_accepts_seconds_and_http_dates():
    assert retry_after_seconds("120", 0) == 120
    assert retry_after_seconds("Thu, 01 Jan 1970 00:01:40 GMT", 40.0) == 60
    assert retry_after_seconds("soon", 0) is None
    assert retry_after_seconds(None, 0) is None
    assert retry_after_seconds("1e309", 0) is None
    assert retry_after_seconds("Fri, 31 Dec 9999 23:59:59 GMT", 0) == MAX_RETRY_AFTER_SECONDS
