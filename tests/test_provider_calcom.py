"""The calcom provider against a real loopback HTTP server, and end to end through a run."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from helpers import add_workspace, cache_row, refreshing, scopes_for
from httpserver import LocalServer, Reply, Seen
from provider_contract import error_messages, run

from availability_cron.providers import (
    FetchRequest,
    PermanentProviderError,
    ProviderContext,
    RetryableProviderError,
)
from availability_cron.providers._http import MAX_BODY_BYTES, HttpSession
from availability_cron.providers.calcom import CalcomProvider, rate_limit_wait
from availability_cron.providers.scopes import SecretScopes

START = datetime(2026, 12, 1, tzinfo=UTC)
END = START + timedelta(days=30)
#: The HTTP session's wall clock in these tests: fixed, so rate-limit waits are exact.
NOW = START - timedelta(hours=1)
TOKEN = "cal_live_4f1b2c3d4e5f60718293a4b5c6d7e8f9"
OTHER_TOKEN = "cal_live_other_0000000000000000000000"

SLOTS_BODY = {
    "status": "success",
    "data": {
        "2026-12-01": [{"start": "2026-12-01T09:00:00.000Z"},
                       {"start": "2026-12-01T09:30:00.000-05:00"}],
        "2026-12-02": [{"start": "2026-12-02T10:00:00+01:00"}],
    },
}


@pytest.fixture
def session() -> Iterator[HttpSession]:
    s = HttpSession(wall_clock=NOW.timestamp)
    yield s
    s.close()


def provider(session: HttpSession, environ: dict[str, str] | None = None,
             server: LocalServer | None = None) -> CalcomProvider:
    """The provider; with ``server``, the operator lets every workspace send the variables
    of ``environ`` to that loopback server (AVAILABILITY_CRON_SECRET_SCOPES)."""
    scopes = scopes_for(server.url(), *(environ or {})) if server else SecretScopes()
    return CalcomProvider(ProviderContext(environ=environ or {}, http=session,
                                          secret_scopes=scopes))


def config(server: LocalServer, **extra: Any) -> dict[str, Any]:
    return {"event_type_id": 123, "token": TOKEN, "base_url": server.url(), **extra}


def fetch_request(cfg: dict[str, Any], *, workspace: str = "ws-1",
                  seconds: float = 5.0) -> FetchRequest:
    return FetchRequest(workspace, cfg, START, END, deadline=time.monotonic() + seconds)


def fetch(session: HttpSession, cfg: dict[str, Any], **kwargs: Any) -> list[datetime]:
    p = provider(session)
    request = fetch_request(cfg, **kwargs)
    with refreshing(request.workspace_id, p.context):
        p.validate_config(cfg)
        return p.fetch(request)


# --- the documented request and answer ------------------------------------------------------


def test_slots_are_fetched_with_the_documented_request_and_converted_to_utc(
    http_server, session
):
    http_server.route("/v2/slots", Reply(200, SLOTS_BODY))
    slots = fetch(session, config(http_server))
    assert [s.isoformat() for s in slots] == [
        "2026-12-01T09:00:00+00:00", "2026-12-01T14:30:00+00:00", "2026-12-02T09:00:00+00:00",
    ]
    [seen] = http_server.requests
    assert seen.path == "/v2/slots"
    assert seen.query == {"eventTypeId": "123", "start": "2026-12-01T00:00:00Z",
                          "end": "2026-12-31T00:00:00Z", "timeZone": "UTC"}
    assert seen.headers["cal-api-version"] == "2024-09-04"
    assert seen.headers["authorization"] == f"Bearer {TOKEN}"


def test_a_public_event_type_is_named_by_slugs_and_username_and_sent_without_a_token(
    http_server, session
):
    http_server.route("/v2/slots", Reply(200, {"status": "success", "data": {}}))
    cfg = {"event_type_slug": "intro", "username": "ada", "organization_slug": "acme",
           "api_version": "2025-01-01", "base_url": http_server.url()}
    assert fetch(session, cfg) == []
    [seen] = http_server.requests
    assert seen.query == {"eventTypeSlug": "intro", "username": "ada", "organizationSlug": "acme",
                          "start": "2026-12-01T00:00:00Z", "end": "2026-12-31T00:00:00Z",
                          "timeZone": "UTC"}
    assert "authorization" not in seen.headers
    assert seen.headers["cal-api-version"] == "2025-01-01"


def test_a_token_is_read_from_the_variable_named_by_token_env(http_server, session):
    http_server.route("/v2/slots", Reply(200, SLOTS_BODY))
    cfg = {"event_type_id": "123", "token_env": "CALCOM_TOKEN", "base_url": http_server.url()}
    p = provider(session, environ={"CALCOM_TOKEN": TOKEN}, server=http_server)
    with refreshing("ws-1", p.context):
        assert len(p.fetch(fetch_request(cfg))) == 3
    assert http_server.requests[0].headers["authorization"] == f"Bearer {TOKEN}"


@pytest.mark.parametrize(("cfg", "message"), [
    ({"event_type_id": 1, "colour": "red"}, "unknown provider_config key 'colour'"),
    ({}, "provider_config.event_type_id must be set"),
    ({"event_type_id": True}, "provider_config.event_type_id must be a string or an integer"),
    ({"event_type_id": "12a"}, "provider_config.event_type_id must be a positive integer"),
    ({"event_type_id": 1, "username": "ada"}, "event_type_id, or event_type_slug with username"),
    ({"event_type_id": 1, "organization_slug": "acme"}, "not both"),
    ({"event_type_slug": "intro"}, "provider_config.username must be set"),
    ({"username": "ada"}, "provider_config.event_type_slug must be set"),
    ({"event_type_id": 1, "api_version": "latest"}, "provider_config.api_version must be a date"),
    ({"event_type_id": 1, "base_url": "ftp://cal.example"}, "provider_config.base_url must be"),
    ({"event_type_id": 1, "token": 42}, "provider_config.token must be a non-empty string"),
    ({"event_type_id": 1, "token_env": "CALCOM_TOKEN_WS_1"},
     "provider_config.token_env names CALCOM_TOKEN_WS_1, which is not set"),
])
def test_an_unusable_config_is_a_permanent_error_naming_the_key(session, cfg, message):
    with pytest.raises(PermanentProviderError, match=re.escape(message)):
        p = provider(session)
        with refreshing("ws-1", p.context):
            p.validate_config(cfg)


# --- rate limits ----------------------------------------------------------------------------


def limited(reset_in: float = 900, **headers: str) -> Reply:
    """A 429 as Cal.com's throttler sends it: X-RateLimit-Reset-{Name} is the seconds left
    in the window (not a Unix time)."""
    reset = str(int(reset_in))
    return Reply(429, {"status": "error", "error": {"code": "TooManyRequestsException",
                                                    "message": "Too many requests"}},
                 headers={"X-RateLimit-Limit-Default": "120",
                          "X-RateLimit-Remaining-Default": "0",
                          "X-RateLimit-Reset-Default": reset, **headers})


def test_a_429_waits_until_the_reset_in_calcoms_headers_and_spares_that_token_for_the_run(
    http_server, session
):
    http_server.route("/v2/slots", lambda seen: (
        limited() if seen.headers["authorization"] == f"Bearer {TOKEN}"
        else Reply(200, SLOTS_BODY)))
    with pytest.raises(RetryableProviderError, match="HTTP 429") as first:
        fetch(session, config(http_server), workspace="ws-1")
    assert first.value.rate_limited and first.value.retry_after == 900
    # Another workspace with the same token is not sent: it gets the remaining wait.
    with pytest.raises(RetryableProviderError, match="rate limited") as second:
        fetch(session, config(http_server), workspace="ws-2")
    assert second.value.retry_after == 900
    assert len(http_server.requests) == 1
    # Another token is a separate limit and is still called.
    assert len(fetch(session, config(http_server, token=OTHER_TOKEN), workspace="ws-3")) == 3
    assert len(http_server.requests) == 2


def test_a_429_retry_after_header_is_honoured(http_server, session):
    http_server.route("/v2/slots", Reply(429, {}, headers={"Retry-After": "120"}))
    with pytest.raises(RetryableProviderError) as info:
        fetch(session, config(http_server))
    assert info.value.retry_after == 120 and info.value.rate_limited


def test_a_success_that_exhausts_the_limit_keeps_its_slots_and_spares_the_next_call(
    http_server, session
):
    http_server.route("/v2/slots", Reply(200, SLOTS_BODY, headers={
        "X-RateLimit-Remaining-Default": "0", "X-RateLimit-Reset-Default": "30"}))
    assert len(fetch(session, config(http_server), workspace="ws-1")) == 3
    with pytest.raises(RetryableProviderError, match="rate limited") as info:
        fetch(session, config(http_server), workspace="ws-2")
    assert info.value.retry_after == 30
    assert len(http_server.requests) == 1


def test_rate_limit_wait_is_none_while_every_limit_has_requests_left():
    headers = {"X-RateLimit-Remaining-Default": "1", "X-RateLimit-Reset-Default": "40"}
    assert rate_limit_wait(headers, 1000.0) is None
    assert rate_limit_wait({}, 1000.0) is None


def test_rate_limit_wait_is_the_longest_wait_of_the_exhausted_limits():
    headers = {
        "x-ratelimit-remaining-short": "0", "x-ratelimit-reset-short": "10",
        "X-RateLimit-Remaining-Long": "0", "X-RateLimit-Reset-Long": "600",
        "X-RateLimit-Remaining-Default": "3", "X-RateLimit-Reset-Default": "5000",
    }
    assert rate_limit_wait(headers, 1000.0) == 600


def test_rate_limit_wait_reads_the_reset_as_seconds_left_in_the_window_whatever_the_clock():
    # Cal.com's throttler sends the seconds left in the window, e.g. 42 of a minute.
    headers = {"X-RateLimit-Remaining-Default": "0", "X-RateLimit-Reset-Default": "42"}
    assert rate_limit_wait(headers, NOW.timestamp()) == 42
    assert rate_limit_wait(headers, 0.0) == 42


def test_rate_limit_wait_of_an_exhausted_limit_without_a_usable_reset():
    assert rate_limit_wait({"X-RateLimit-Remaining-Default": "0"}, 1000.0) == 60
    assert rate_limit_wait({"X-RateLimit-Remaining-Default": "0",
                            "X-RateLimit-Reset-Default": "soon"}, 1000.0) == 60
    assert rate_limit_wait({"X-RateLimit-Remaining-Default": "0",
                            "X-RateLimit-Reset-Default": "-5"}, 1000.0) == 0
    assert rate_limit_wait({"X-RateLimit-Remaining-Default": "none"}, 1000.0) is None


# --- failures -------------------------------------------------------------------------------


def test_a_5xx_is_retried_and_the_later_answer_is_used(http_server, session):
    answers = iter([Reply(503, {"message": "busy"}), Reply(200, SLOTS_BODY)])
    http_server.route("/v2/slots", lambda _seen: next(answers))
    assert len(fetch(session, config(http_server))) == 3
    assert len(http_server.requests) == 2


def test_a_server_slower_than_the_deadline_is_a_timeout_within_the_budget(http_server, session):
    http_server.route("/v2/slots", Reply(200, SLOTS_BODY, delay=5))
    started = time.monotonic()
    with pytest.raises(RetryableProviderError, match="timed out"):
        fetch(session, config(http_server), seconds=1.0)
    assert time.monotonic() - started < 2.5


@pytest.mark.parametrize(("status", "message"), [(401, "authentication failed"),
                                                 (404, "not found")])
def test_auth_and_not_found_errors_are_permanent_and_not_retried(
    http_server, session, status, message
):
    http_server.route("/v2/slots", Reply(status, {"status": "error", "error": {
        "code": "X", "message": "no such event type"}}))
    with pytest.raises(PermanentProviderError, match=f"HTTP {status}.*{message}"):
        fetch(session, config(http_server))
    assert len(http_server.requests) == 1


def test_a_200_carrying_an_error_is_permanent_with_calcoms_message(http_server, session):
    http_server.route("/v2/slots", Reply(200, {"status": "error", "error": {
        "code": "BadRequestException", "message": "Event type with id=123 not found"}}))
    with pytest.raises(PermanentProviderError,
                       match="answered with an error: Event type with id=123 not found"):
        fetch(session, config(http_server))


def day(*items: Any) -> dict[str, Any]:
    return {"status": "success", "data": {"2026-12-01": list(items)}}


@pytest.mark.parametrize(("body", "message"), [
    ([], "expected a JSON object, got a list"),
    ({"status": "success", "data": []},
     "data must be an object of dates to slot lists, got a list"),
    ({"status": "success"}, "data must be an object of dates to slot lists, got null"),
    ({"status": "pending", "data": {}}, "status is 'pending', expected 'success'"),
    ({"status": "success", "data": {"2026-12-01": {"start": "x"}}},
     "data['2026-12-01'] must be a list of slots, got an object"),
    (day("2026-12-01T09:00:00Z"),
     "data['2026-12-01'][0] must be an object with a start, got a string"),
    (day({"time": "2026-12-01T09:00:00Z"}),
     "data['2026-12-01'][0].start must be an ISO-8601 date-time string, got null"),
    (day({"start": 1764579600}),
     "data['2026-12-01'][0].start must be an ISO-8601 date-time string, got a number"),
    (day({"start": "tomorrow at nine"}),
     "data['2026-12-01'][0].start is not an ISO-8601 date-time: 'tomorrow at nine'"),
    (day({"start": "2026-12-01T09:00:00"}), "data['2026-12-01'][0].start has no UTC offset"),
    (day({"start": "9999-12-31T23:59:59-05:00"}), "data['2026-12-01'][0].start is out of range"),
    (day({"start": "x" * 500}), "is not an ISO-8601 date-time: a string of 500 characters"),
    ("<html>maintenance</html>", "not valid JSON"),
])
def test_a_body_of_the_wrong_shape_is_a_permanent_error_saying_what_is_wrong(
    http_server, session, body, message
):
    http_server.route("/v2/slots", Reply(200, body))
    with pytest.raises(PermanentProviderError, match=re.escape(message)):
        fetch(session, config(http_server))


def test_a_huge_body_is_refused(http_server, session):
    http_server.route("/v2/slots", Reply(200, b'{"data": {"d": [' + b" " * MAX_BODY_BYTES))
    with pytest.raises(PermanentProviderError, match="exceeds"):
        fetch(session, config(http_server))


@pytest.mark.parametrize("source", ["token", "token_env"])
def test_the_token_never_appears_in_an_error_message(http_server, session, source):
    replies = iter([Reply(401, {"message": "invalid API key"}), Reply(200, day({"start": 1})),
                    Reply(200, {"status": "error", "error": {"message": "bad request"}}),
                    limited()])
    http_server.route("/v2/slots", lambda _seen: next(replies))
    cfg = config(http_server) if source == "token" else {
        "event_type_id": 123, "token_env": "CALCOM_TOKEN", "base_url": http_server.url()}
    p = provider(session, environ={"CALCOM_TOKEN": TOKEN}, server=http_server)
    # the fifth is refused by the rate-limit gate
    messages = error_messages(p, lambda: fetch_request(cfg), 5)
    assert len(http_server.requests) == 4
    assert all(r.headers["authorization"] == f"Bearer {TOKEN}" for r in http_server.requests)
    assert not [m for m in messages if TOKEN in m or "Bearer" in m]


# --- end to end through a run ---------------------------------------------------------------




def test_a_run_stores_calcoms_slots_in_utc(database_url, conn, http_server):
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).date().isoformat()
    far = (datetime.now(UTC) + timedelta(days=40)).date().isoformat()
    body = {"status": "success", "data": {
        tomorrow: [{"start": f"{tomorrow}T09:00:00.000Z"},
                   {"start": f"{tomorrow}T04:30:00.000-05:00"},
                   {"start": f"{tomorrow}T11:00:00.000+02:00"}],  # 09:00Z again
        far: [{"start": f"{far}T09:00:00.000Z"}],  # past the lookahead
    }}

    def answer(seen: Seen) -> Reply:
        if seen.headers.get("authorization") != f"Bearer {TOKEN}":
            return Reply(401, {"message": "unauthorized"})
        return Reply(200, body)

    http_server.route("/v2/slots", answer)
    add_workspace(conn, "ws-1", provider="calcom", config={
        "event_type_id": 123, "token_env": "CALCOM_TOKEN", "base_url": http_server.url()})
    summary = run(database_url, {"CALCOM_TOKEN": TOKEN}, server=http_server)
    assert summary.refreshed == 1 and summary.errors == 0
    row = cache_row(conn, "ws-1")
    assert row["last_error"] is None
    assert row["slots_utc"] == [f"{tomorrow}T09:00:00Z", f"{tomorrow}T09:30:00Z"]
    assert http_server.requests[0].query["start"] == (
        row["range_start"].astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))


def test_a_rate_limited_workspace_backs_off_until_the_reset_while_the_run_goes_on(
    database_url, conn, http_server
):
    reset = int(time.time()) + 900

    def answer(seen: Seen) -> Reply:
        if seen.headers["authorization"] == f"Bearer {TOKEN}":
            return Reply(429, {"message": f"too many requests for key {TOKEN}"}, headers={
                "X-RateLimit-Remaining-Default": "0", "X-RateLimit-Reset-Default": "900"})
        return Reply(200, {"status": "success", "data": {}})

    http_server.route("/v2/slots", answer)
    created = datetime.now(UTC) - timedelta(hours=1)
    for i, (workspace, variable) in enumerate([("a-limited", "LIMITED"), ("b-same-key", "LIMITED"),
                                               ("c-other-key", "OTHER")]):
        add_workspace(conn, workspace, provider="calcom", created_at=created + timedelta(minutes=i),
                      config={"event_type_id": 123, "token_env": variable,
                              "base_url": http_server.url()})
    summary = run(database_url, {"LIMITED": TOKEN, "OTHER": OTHER_TOKEN}, server=http_server)

    assert (summary.refreshed, summary.errors) == (1, 2)
    assert [r.headers["authorization"] for r in http_server.requests] == [
        f"Bearer {TOKEN}", f"Bearer {OTHER_TOKEN}"]
    reset_at = datetime.fromtimestamp(reset, UTC)
    for workspace in ("a-limited", "b-same-key"):
        row = cache_row(conn, workspace)
        assert row["stale_at"] >= reset_at
        assert row["last_error"].startswith("[retryable]") and TOKEN not in row["last_error"]
    assert cache_row(conn, "c-other-key")["slots_utc"] == []
