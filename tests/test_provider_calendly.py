"""The calendly provider against a real loopback HTTP server, and end to end through a run."""

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
from availability_cron.providers.calendly import CalendlyProvider, rate_limit_wait
from availability_cron.providers.scopes import SecretScopes

START = datetime(2026, 12, 1, tzinfo=UTC)
END = START + timedelta(days=30)
#: The HTTP session's wall clock in most of these tests: an hour before the window.
NOW = START - timedelta(hours=1)
TOKEN = "eyJraWQiOiIxY2UxZTEzNjE3ZGNmNzY2YjNjZWJjY2Y4ZGM1YmFmYThhNjVlNjg0MDIzZjdjMzJiZTgz"
OTHER_TOKEN = "eyJraWQiOiJvdGhlci10b2tlbi0wMDAwMDAwMDAwMDAwMDAw"
EVENT_TYPE = "https://api.calendly.com/event_types/AAAAAAAAAAAAAAAA"

TIMES_BODY = {"collection": [
    {"status": "available", "invitees_remaining": 1,
     "start_time": "2026-12-01T09:00:00.000000Z",
     "scheduling_url": "https://calendly.com/ada/intro/2026-12-01T09:00:00Z"},
    {"status": "available", "invitees_remaining": 2,
     "start_time": "2026-12-01T10:00:00.000000-05:00"},
    {"status": "unavailable", "invitees_remaining": 1, "start_time": "2026-12-01T11:00:00Z"},
    {"status": "available", "invitees_remaining": 0, "start_time": "2026-12-01T12:00:00Z"},
    {"status": "available", "start_time": "2026-12-02T09:00:00Z"},
]}


def session_at(moment: datetime) -> HttpSession:
    return HttpSession(wall_clock=moment.timestamp)


@pytest.fixture
def session() -> Iterator[HttpSession]:
    s = session_at(NOW)
    yield s
    s.close()


def provider(session: HttpSession, environ: dict[str, str] | None = None,
             server: LocalServer | None = None) -> CalendlyProvider:
    """The provider; with ``server``, the operator lets every workspace send the variables
    of ``environ`` to that loopback server (AVAILABILITY_CRON_SECRET_SCOPES)."""
    scopes = scopes_for(server.url(), *(environ or {})) if server else SecretScopes()
    return CalendlyProvider(ProviderContext(environ=environ or {}, http=session,
                                            secret_scopes=scopes))


def config(server: LocalServer, **extra: Any) -> dict[str, Any]:
    return {"event_type": EVENT_TYPE, "token": TOKEN, "max_span_days": 31,
            "base_url": server.url(), **extra}


def fetch_request(cfg: dict[str, Any], *, workspace: str = "ws-1",
                  seconds: float = 5.0) -> FetchRequest:
    return FetchRequest(workspace, cfg, START, END, deadline=time.monotonic() + seconds)


def fetch(session: HttpSession, cfg: dict[str, Any], **kwargs: Any) -> list[datetime]:
    p = provider(session)
    request = fetch_request(cfg, **kwargs)
    with refreshing(request.workspace_id, p.context):
        p.validate_config(cfg)
        return p.fetch(request)


def iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --- the documented request and answer ------------------------------------------------------


def test_available_times_are_fetched_with_the_documented_request_and_converted_to_utc(
    http_server, session
):
    http_server.route("/event_type_available_times", Reply(200, TIMES_BODY))
    slots = fetch(session, config(http_server))
    # Unavailable times and times with no invitee left are not free slots.
    assert [s.isoformat() for s in slots] == [
        "2026-12-01T09:00:00+00:00", "2026-12-01T15:00:00+00:00", "2026-12-02T09:00:00+00:00",
    ]
    [seen] = http_server.requests
    assert seen.path == "/event_type_available_times"
    assert seen.query == {"event_type": EVENT_TYPE, "start_time": "2026-12-01T00:00:00.000000Z",
                          "end_time": "2026-12-31T00:00:00.000000Z"}
    assert seen.headers["authorization"] == f"Bearer {TOKEN}"


def one_slot_an_hour_into_each_request(seen: Seen) -> Reply:
    start = datetime.fromisoformat(seen.query["start_time"]) + timedelta(hours=1)
    return Reply(200, {"collection": [{"status": "available", "invitees_remaining": 1,
                                       "start_time": iso(start)}]})


@pytest.mark.parametrize(("span_days", "expected"), [
    (7, [("2026-12-01T00:01:31", "2026-12-08T00:01:31"),
         ("2026-12-08T00:01:31", "2026-12-15T00:01:31"),
         ("2026-12-15T00:01:31", "2026-12-22T00:01:31"),
         ("2026-12-22T00:01:31", "2026-12-29T00:01:31"),
         ("2026-12-29T00:01:31", "2026-12-31T00:00:00")]),
    (31, [("2026-12-01T00:01:31", "2026-12-31T00:00:00")]),
])
def test_the_window_is_split_into_spans_of_max_span_days_starting_a_minute_from_now(
    http_server, span_days, expected
):
    http_server.route("/event_type_available_times", one_slot_an_hour_into_each_request)
    session = session_at(START + timedelta(seconds=30.4))  # the window began 30 s ago
    try:
        slots = fetch(session, config(http_server, max_span_days=span_days))
    finally:
        session.close()
    sent = [(r.query["start_time"], r.query["end_time"]) for r in http_server.requests]
    assert sent == [(f"{s}.000000Z", f"{e}.000000Z") for s, e in expected]
    assert all(r.query["event_type"] == EVENT_TYPE for r in http_server.requests)
    assert slots == [datetime.fromisoformat(s + "Z") + timedelta(hours=1) for s, _ in expected]


def test_the_default_span_is_seven_days(http_server, session):
    http_server.route("/event_type_available_times", Reply(200, {"collection": []}))
    cfg = config(http_server)
    del cfg["max_span_days"]
    assert fetch(session, cfg) == []
    assert len(http_server.requests) == 5


def test_a_window_that_is_already_over_asks_nothing(http_server):
    session = session_at(END)
    try:
        assert fetch(session, config(http_server)) == []
    finally:
        session.close()
    assert http_server.requests == []


def test_every_part_of_a_split_window_must_succeed(http_server, session):
    answers = iter([Reply(200, TIMES_BODY), Reply(404, {"title": "Resource Not Found"})])
    http_server.route("/event_type_available_times", lambda _seen: next(answers))
    with pytest.raises(PermanentProviderError, match="HTTP 404"):
        fetch(session, config(http_server, max_span_days=7))
    assert len(http_server.requests) == 2


def test_a_token_is_read_from_the_variable_named_by_token_env(http_server, session):
    http_server.route("/event_type_available_times", Reply(200, TIMES_BODY))
    cfg = {"event_type": EVENT_TYPE, "token_env": "CALENDLY_TOKEN", "max_span_days": 31,
           "base_url": http_server.url()}
    p = provider(session, environ={"CALENDLY_TOKEN": TOKEN}, server=http_server)
    with refreshing("ws-1", p.context):
        assert len(p.fetch(fetch_request(cfg))) == 3
    assert http_server.requests[0].headers["authorization"] == f"Bearer {TOKEN}"


@pytest.mark.parametrize(("cfg", "message"), [
    ({"event_type": EVENT_TYPE, "token": "t", "scope": "me"},
     "unknown provider_config key 'scope'"),
    ({"token": "t"}, "provider_config.event_type must be set"),
    ({"event_type": "AAAAAAAAAAAAAAAA", "token": "t"},
     "provider_config.event_type must be an absolute https URL"),
    ({"event_type": "http://api.calendly.com/event_types/A", "token": "t"},
     "provider_config.event_type must be an absolute https URL"),
    ({"event_type": EVENT_TYPE}, "provider_config needs token or token_env"),
    ({"event_type": EVENT_TYPE, "token": "t", "token_env": "T"}, "not both"),
    ({"event_type": EVENT_TYPE, "token": "t", "max_span_days": 0},
     "provider_config.max_span_days must be an integer from 1 to 31"),
    ({"event_type": EVENT_TYPE, "token": "t", "max_span_days": 32},
     "provider_config.max_span_days must be an integer from 1 to 31"),
    ({"event_type": EVENT_TYPE, "token": "t", "max_span_days": "7"},
     "provider_config.max_span_days must be an integer from 1 to 31"),
])
def test_an_unusable_config_is_a_permanent_error_naming_the_key(session, cfg, message):
    with pytest.raises(PermanentProviderError, match=re.escape(message)):
        p = provider(session)
        with refreshing("ws-1", p.context):
            p.validate_config(cfg)


# --- rate limits ----------------------------------------------------------------------------


def limited(reset: str = "45") -> Reply:
    return Reply(429, {"title": "Too Many Requests", "message": "Rate limit exceeded"},
                 headers={"X-RateLimit-Limit": "500", "X-RateLimit-Remaining": "0",
                          "X-RateLimit-Reset": reset})


def test_a_429_waits_the_seconds_in_calendlys_reset_header_and_spares_that_token_for_the_run(
    http_server, session
):
    http_server.route("/event_type_available_times", lambda seen: (
        limited() if seen.headers["authorization"] == f"Bearer {TOKEN}"
        else Reply(200, TIMES_BODY)))
    with pytest.raises(RetryableProviderError, match="HTTP 429") as first:
        fetch(session, config(http_server), workspace="ws-1")
    assert first.value.rate_limited and first.value.retry_after == 45
    with pytest.raises(RetryableProviderError, match="rate limited") as second:
        fetch(session, config(http_server), workspace="ws-2")
    assert second.value.retry_after == 45
    assert len(http_server.requests) == 1
    assert len(fetch(session, config(http_server, token=OTHER_TOKEN), workspace="ws-3")) == 3
    assert len(http_server.requests) == 2


def test_a_429_retry_after_header_is_honoured(http_server, session):
    http_server.route("/event_type_available_times",
                      Reply(429, {}, headers={"Retry-After": "120"}))
    with pytest.raises(RetryableProviderError) as info:
        fetch(session, config(http_server))
    assert info.value.retry_after == 120 and info.value.rate_limited


def test_a_part_that_exhausts_the_limit_stops_the_rest_of_the_window(http_server, session):
    http_server.route("/event_type_available_times", Reply(200, TIMES_BODY, headers={
        "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "20"}))
    with pytest.raises(RetryableProviderError, match="rate limited") as info:
        fetch(session, config(http_server, max_span_days=7))
    assert info.value.retry_after == 20
    assert len(http_server.requests) == 1


def test_rate_limit_wait_is_none_while_requests_remain():
    assert rate_limit_wait({"X-RateLimit-Remaining": "1", "X-RateLimit-Reset": "42"}, 0) is None
    assert rate_limit_wait({}, 0) is None


def test_rate_limit_wait_reads_the_reset_as_seconds_from_now():
    headers = {"x-ratelimit-remaining": "0", "x-ratelimit-reset": "42"}
    assert rate_limit_wait(headers, 1_800_000_000.0) == 42
    assert rate_limit_wait({"X-RateLimit-Remaining": "0"}, 0) == 60
    assert rate_limit_wait({"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "-5"}, 0) == 0


# --- failures -------------------------------------------------------------------------------


def test_a_5xx_is_retried_and_the_later_answer_is_used(http_server, session):
    answers = iter([Reply(500, {"title": "Internal Server Error"}), Reply(200, TIMES_BODY)])
    http_server.route("/event_type_available_times", lambda _seen: next(answers))
    assert len(fetch(session, config(http_server))) == 3
    assert len(http_server.requests) == 2


def test_a_server_slower_than_the_deadline_is_a_timeout_within_the_budget(http_server, session):
    http_server.route("/event_type_available_times", Reply(200, TIMES_BODY, delay=5))
    started = time.monotonic()
    with pytest.raises(RetryableProviderError, match="timed out"):
        fetch(session, config(http_server), seconds=1.0)
    assert time.monotonic() - started < 2.5


@pytest.mark.parametrize(("status", "message"), [(401, "authentication failed"),
                                                 (404, "not found")])
def test_auth_and_not_found_errors_are_permanent_and_not_retried(
    http_server, session, status, message
):
    http_server.route("/event_type_available_times", Reply(status, {
        "title": "Unauthenticated", "message": "The access token is invalid"}))
    with pytest.raises(PermanentProviderError, match=f"HTTP {status}.*{message}"):
        fetch(session, config(http_server))
    assert len(http_server.requests) == 1


def test_a_200_carrying_an_error_is_permanent_with_calendlys_message(http_server, session):
    http_server.route("/event_type_available_times", Reply(200, {
        "title": "Invalid Argument", "message": "The supplied parameters are invalid."}))
    with pytest.raises(PermanentProviderError, match=re.escape(
            "answered with an error: Invalid Argument: The supplied parameters are invalid.")):
        fetch(session, config(http_server))


def entry(**fields: Any) -> dict[str, Any]:
    return {"collection": [{"status": "available", "invitees_remaining": 1,
                            "start_time": "2026-12-01T09:00:00Z", **fields}]}


@pytest.mark.parametrize(("body", "message"), [
    ([], "expected a JSON object, got a list"),
    ({}, "the response has no collection"),
    ({"collection": {"start_time": "2026-12-01T09:00:00Z"}},
     "collection must be a list of available times, got an object"),
    ({"collection": ["2026-12-01T09:00:00Z"]}, "collection[0] must be an object, got a string"),
    (entry(status=None), "collection[0].status must be a string, got null"),
    (entry(invitees_remaining="1"), "collection[0].invitees_remaining must be an integer"),
    (entry(start_time=None), "collection[0].start_time must be an ISO-8601 date-time string"),
    (entry(start_time=["2026-12-01T09:00:00Z"]),
     "collection[0].start_time must be an ISO-8601 date-time string, got a list"),
    (entry(start_time="next tuesday"),
     "collection[0].start_time is not an ISO-8601 date-time: 'next tuesday'"),
    (entry(start_time="2026-12-01T09:00:00"), "collection[0].start_time has no UTC offset"),
    ("<html>maintenance</html>", "not valid JSON"),
])
def test_a_body_of_the_wrong_shape_is_a_permanent_error_saying_what_is_wrong(
    http_server, session, body, message
):
    http_server.route("/event_type_available_times", Reply(200, body))
    with pytest.raises(PermanentProviderError, match=re.escape(message)):
        fetch(session, config(http_server))


def test_a_huge_body_is_refused(http_server, session):
    http_server.route("/event_type_available_times",
                      Reply(200, b'{"collection": [' + b" " * MAX_BODY_BYTES))
    with pytest.raises(PermanentProviderError, match="exceeds"):
        fetch(session, config(http_server))


@pytest.mark.parametrize("source", ["token", "token_env"])
def test_the_token_never_appears_in_an_error_message(http_server, session, source):
    replies = iter([Reply(401, {"title": "Unauthenticated", "message": "invalid token"}),
                    Reply(200, entry(start_time=17)),
                    Reply(200, {"title": "Invalid Argument", "message": "bad event_type"}),
                    limited()])
    http_server.route("/event_type_available_times", lambda _seen: next(replies))
    cfg = config(http_server) if source == "token" else {
        "event_type": EVENT_TYPE, "token_env": "CALENDLY_TOKEN", "max_span_days": 31,
        "base_url": http_server.url()}
    p = provider(session, environ={"CALENDLY_TOKEN": TOKEN}, server=http_server)
    # the fifth is refused by the rate-limit gate
    messages = error_messages(p, lambda: fetch_request(cfg), 5)
    assert len(http_server.requests) == 4
    assert all(r.headers["authorization"] == f"Bearer {TOKEN}" for r in http_server.requests)
    assert not [m for m in messages if TOKEN in m or "Bearer" in m]


# --- end to end through a run ---------------------------------------------------------------




def test_a_run_stores_calendlys_times_in_utc_from_consecutive_requests(
    database_url, conn, http_server
):
    day = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    offered = [
        ("available", (day + timedelta(days=1, hours=9)).strftime("%Y-%m-%dT%H:%M:%SZ")),
        ("available", (day + timedelta(days=10, hours=14)).strftime("%Y-%m-%dT%H:%M:%S-05:00")),
        ("unavailable", (day + timedelta(days=20, hours=9)).strftime("%Y-%m-%dT%H:%M:%SZ")),
    ]

    def answer(seen: Seen) -> Reply:
        if seen.headers.get("authorization") != f"Bearer {TOKEN}":
            return Reply(401, {"title": "Unauthenticated"})
        start = datetime.fromisoformat(seen.query["start_time"])
        end = datetime.fromisoformat(seen.query["end_time"])
        return Reply(200, {"collection": [
            {"status": status, "invitees_remaining": 1, "start_time": at}
            for status, at in offered if start <= datetime.fromisoformat(at) < end]})

    http_server.route("/event_type_available_times", answer)
    add_workspace(conn, "ws-1", provider="calendly", config={
        "event_type": EVENT_TYPE, "token_env": "CALENDLY_TOKEN", "base_url": http_server.url()})
    summary = run(database_url, {"CALENDLY_TOKEN": TOKEN}, server=http_server)

    assert summary.refreshed == 1 and summary.errors == 0
    row = cache_row(conn, "ws-1")
    assert row["last_error"] is None
    assert row["slots_utc"] == [
        (day + timedelta(days=1, hours=9)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        (day + timedelta(days=10, hours=19)).strftime("%Y-%m-%dT%H:%M:%SZ"),
    ]
    parts = [(datetime.fromisoformat(r.query["start_time"]),
              datetime.fromisoformat(r.query["end_time"])) for r in http_server.requests]
    assert len(parts) == 5  # 30 days in spans of 7
    assert parts[0][0] >= row["range_start"] + timedelta(minutes=1)
    assert parts[-1][1] == row["range_end"]
    assert all(a[1] == b[0] for a, b in zip(parts, parts[1:], strict=False))


def test_a_rate_limited_workspace_backs_off_until_the_reset_while_the_run_goes_on(
    database_url, conn, http_server
):
    def answer(seen: Seen) -> Reply:
        if seen.headers["authorization"] == f"Bearer {TOKEN}":
            return Reply(429, {"title": "Too Many Requests", "message": f"slow down {TOKEN}"},
                         headers={"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "900"})
        return Reply(200, {"collection": []})

    http_server.route("/event_type_available_times", answer)
    created = datetime.now(UTC) - timedelta(hours=1)
    workspaces = [("a-limited", "LIMITED"), ("b-same-token", "LIMITED"),
                  ("c-other-token", "OTHER")]
    for i, (workspace, variable) in enumerate(workspaces):
        add_workspace(conn, workspace, provider="calendly",
                      created_at=created + timedelta(minutes=i),
                      config={"event_type": EVENT_TYPE, "token_env": variable,
                              "max_span_days": 31, "base_url": http_server.url()})
    before = datetime.now(UTC)
    summary = run(database_url, {"LIMITED": TOKEN, "OTHER": OTHER_TOKEN}, server=http_server)

    assert (summary.refreshed, summary.errors) == (1, 2)
    assert [r.headers["authorization"] for r in http_server.requests] == [
        f"Bearer {TOKEN}", f"Bearer {OTHER_TOKEN}"]
    limited_row = cache_row(conn, "a-limited")
    assert limited_row["stale_at"] - limited_row["fetched_at"] >= timedelta(seconds=900)
    assert cache_row(conn, "b-same-token")["stale_at"] >= before + timedelta(seconds=900)
    for workspace in ("a-limited", "b-same-token"):
        error = cache_row(conn, workspace)["last_error"]
        assert error.startswith("[retryable]") and TOKEN not in error
    assert cache_row(conn, "c-other-token")["slots_utc"] == []
