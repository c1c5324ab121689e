"""The ghl provider against a real loopback HTTP server, and end to end through a run."""

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
from availability_cron.providers.ghl import GhlProvider, rate_limit_wait
from availability_cron.providers.scopes import SecretScopes

START = datetime(2026, 12, 1, tzinfo=UTC)  # 1796083200000 ms
END = START + timedelta(days=30)  # 1798675200000 ms
#: The HTTP session's wall clock in these tests: an hour before the next UTC midnight.
NOW = START - timedelta(hours=1)
TOKEN = "pit-6a1f0c2e-93b4-4d57-8e21-0c9d7f3b5a18"
OTHER_TOKEN = "pit-00000000-other-0000-0000-000000000000"
CALENDAR = "ocQHyuzHvysMo5N5VsXc"
PATH = f"/calendars/{CALENDAR}/free-slots"

SLOTS_BODY = {
    "2026-12-01": {"slots": ["2026-12-01T09:00:00-05:00", "2026-12-01T09:30:00-05:00"]},
    "2026-12-02": {"slots": ["2026-12-02T10:00:00Z"]},
    "traceId": "0f3c5a1e-trace",
    "meta": ["not", "a", "date"],
}


@pytest.fixture
def session() -> Iterator[HttpSession]:
    s = HttpSession(wall_clock=NOW.timestamp)
    yield s
    s.close()


def provider(session: HttpSession, environ: dict[str, str] | None = None,
             server: LocalServer | None = None) -> GhlProvider:
    """The provider; with ``server``, the operator lets every workspace send the variables
    of ``environ`` to that loopback server (AVAILABILITY_CRON_SECRET_SCOPES)."""
    scopes = scopes_for(server.url(), *(environ or {})) if server else SecretScopes()
    return GhlProvider(ProviderContext(environ=environ or {}, http=session, secret_scopes=scopes))


def config(server: LocalServer, **extra: Any) -> dict[str, Any]:
    return {"calendar_id": CALENDAR, "token": TOKEN, "base_url": server.url(), **extra}


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


def test_free_slots_are_fetched_with_the_documented_request_and_converted_to_utc(
    http_server, session
):
    http_server.route(PATH, Reply(200, SLOTS_BODY))
    slots = fetch(session, config(http_server))
    # Only the date keys are read: traceId and other keys are ignored.
    assert [s.isoformat() for s in slots] == [
        "2026-12-01T14:00:00+00:00", "2026-12-01T14:30:00+00:00", "2026-12-02T10:00:00+00:00",
    ]
    [seen] = http_server.requests
    assert seen.path == PATH
    assert seen.query == {"startDate": "1796083200000", "endDate": "1798675200000",
                          "timezone": "UTC"}
    assert seen.headers["authorization"] == f"Bearer {TOKEN}"
    assert seen.headers["version"] == "2021-04-15"


def test_a_body_without_dates_is_no_free_slots(http_server, session):
    http_server.route(PATH, Reply(200, {"traceId": "0f3c5a1e-trace"}))
    assert fetch(session, config(http_server)) == []


@pytest.mark.parametrize(("span_days", "expected"), [
    (7, [("1796083200000", "1796688000000"), ("1796688000000", "1797292800000"),
         ("1797292800000", "1797897600000"), ("1797897600000", "1798502400000"),
         ("1798502400000", "1798675200000")]),
    (31, [("1796083200000", "1798675200000")]),
])
def test_the_window_is_split_into_spans_of_max_span_days_in_epoch_milliseconds(
    http_server, session, span_days, expected
):
    def one_slot_at_each_start(seen: Seen) -> Reply:
        start = datetime.fromtimestamp(int(seen.query["startDate"]) / 1000, UTC)
        return Reply(200, {start.date().isoformat(): {"slots": [start.isoformat()]}})

    http_server.route(PATH, one_slot_at_each_start)
    slots = fetch(session, config(http_server, max_span_days=span_days))
    assert [(r.query["startDate"], r.query["endDate"]) for r in http_server.requests] == expected
    assert slots == [datetime.fromtimestamp(int(s) / 1000, UTC) for s, _ in expected]


def test_every_part_of_a_split_window_must_succeed(http_server, session):
    answers = iter([Reply(200, SLOTS_BODY), Reply(404, {"statusCode": 404,
                                                        "message": "Calendar not found"})])
    http_server.route(PATH, lambda _seen: next(answers))
    with pytest.raises(PermanentProviderError, match="HTTP 404"):
        fetch(session, config(http_server, max_span_days=7))
    assert len(http_server.requests) == 2


def test_a_token_is_read_from_the_variable_named_by_token_env_and_the_version_is_configurable(
    http_server, session
):
    http_server.route(PATH, Reply(200, SLOTS_BODY))
    cfg = {"calendar_id": CALENDAR, "token_env": "GHL_TOKEN", "api_version": "2021-07-28",
           "base_url": http_server.url()}
    p = provider(session, environ={"GHL_TOKEN": TOKEN}, server=http_server)
    with refreshing("ws-1", p.context):
        assert len(p.fetch(fetch_request(cfg))) == 3
    assert http_server.requests[0].headers["authorization"] == f"Bearer {TOKEN}"
    assert http_server.requests[0].headers["version"] == "2021-07-28"


@pytest.mark.parametrize(("cfg", "message"), [
    ({"calendar_id": CALENDAR, "token": "t", "location_id": "x"},
     "unknown provider_config key 'location_id'"),
    ({"token": "t"}, "provider_config.calendar_id must be set"),
    ({"calendar_id": "../../users", "token": "t"},
     "provider_config.calendar_id must be an id of letters, digits"),
    ({"calendar_id": ["a"], "token": "t"}, "provider_config.calendar_id must be a string"),
    ({"calendar_id": CALENDAR}, "provider_config needs token or token_env"),
    ({"calendar_id": CALENDAR, "token": "t", "api_version": "v2"},
     "provider_config.api_version must be a date"),
    ({"calendar_id": CALENDAR, "token": "t", "max_span_days": 45},
     "provider_config.max_span_days must be an integer from 1 to 31"),
    ({"calendar_id": CALENDAR, "token": "t", "base_url": "services.leadconnectorhq.com"},
     "provider_config.base_url must be an absolute"),
])
def test_an_unusable_config_is_a_permanent_error_naming_the_key(session, cfg, message):
    with pytest.raises(PermanentProviderError, match=re.escape(message)):
        p = provider(session)
        with refreshing("ws-1", p.context):
            p.validate_config(cfg)


# --- rate limits ----------------------------------------------------------------------------


def limited(**headers: str) -> Reply:
    return Reply(429, {"statusCode": 429, "message": "Too many requests"}, headers={
        "X-RateLimit-Max": "100", "X-RateLimit-Remaining": "0",
        "X-RateLimit-Interval-Milliseconds": "10000",
        "X-RateLimit-Limit-Daily": "200000", "X-RateLimit-Daily-Remaining": "150000", **headers})


def test_a_429_waits_one_burst_interval_and_spares_that_token_for_the_run(http_server, session):
    http_server.route(PATH, lambda seen: (
        limited() if seen.headers["authorization"] == f"Bearer {TOKEN}"
        else Reply(200, SLOTS_BODY)))
    with pytest.raises(RetryableProviderError, match="HTTP 429") as first:
        fetch(session, config(http_server), workspace="ws-1")
    assert first.value.rate_limited and first.value.retry_after == 10
    with pytest.raises(RetryableProviderError, match="rate limited") as second:
        fetch(session, config(http_server), workspace="ws-2")
    assert second.value.retry_after == 10
    assert len(http_server.requests) == 1
    assert len(fetch(session, config(http_server, token=OTHER_TOKEN), workspace="ws-3")) == 3
    assert len(http_server.requests) == 2


def test_a_429_with_the_daily_limit_spent_waits_until_the_next_utc_midnight(
    http_server, session
):
    http_server.route(PATH, limited(**{"X-RateLimit-Daily-Remaining": "0"}))
    with pytest.raises(RetryableProviderError) as info:
        fetch(session, config(http_server))
    assert info.value.retry_after == 3600  # NOW is 23:00 UTC


def test_a_429_retry_after_header_is_honoured(http_server, session):
    http_server.route(PATH, Reply(429, {}, headers={"Retry-After": "120"}))
    with pytest.raises(RetryableProviderError) as info:
        fetch(session, config(http_server))
    assert info.value.retry_after == 120 and info.value.rate_limited


def test_rate_limit_wait_is_none_while_requests_remain():
    headers = {"X-RateLimit-Remaining": "1", "X-RateLimit-Interval-Milliseconds": "10000",
               "X-RateLimit-Daily-Remaining": "1"}
    assert rate_limit_wait(headers, 0) is None
    assert rate_limit_wait({}, 0) is None


def test_rate_limit_wait_of_a_spent_burst_is_one_interval():
    assert rate_limit_wait({"x-ratelimit-remaining": "0",
                            "x-ratelimit-interval-milliseconds": "2500"}, 0) == 2.5
    assert rate_limit_wait({"X-RateLimit-Remaining": "0"}, 0) == 10


def test_rate_limit_wait_of_a_spent_day_lasts_until_the_next_utc_midnight():
    at = datetime(2026, 12, 1, 18, 30, tzinfo=UTC).timestamp()
    assert rate_limit_wait({"X-RateLimit-Daily-Remaining": "0"}, at) == 5.5 * 3600
    # Both spent: the longer wait wins.
    assert rate_limit_wait({"X-RateLimit-Daily-Remaining": "0", "X-RateLimit-Remaining": "0",
                            "X-RateLimit-Interval-Milliseconds": "10000"}, at) == 5.5 * 3600


# --- failures -------------------------------------------------------------------------------


def test_a_5xx_is_retried_and_the_later_answer_is_used(http_server, session):
    answers = iter([Reply(502, {"statusCode": 502}), Reply(200, SLOTS_BODY)])
    http_server.route(PATH, lambda _seen: next(answers))
    assert len(fetch(session, config(http_server))) == 3
    assert len(http_server.requests) == 2


def test_a_server_slower_than_the_deadline_is_a_timeout_within_the_budget(http_server, session):
    http_server.route(PATH, Reply(200, SLOTS_BODY, delay=5))
    started = time.monotonic()
    with pytest.raises(RetryableProviderError, match="timed out"):
        fetch(session, config(http_server), seconds=1.0)
    assert time.monotonic() - started < 2.5


@pytest.mark.parametrize(("status", "message"), [(401, "authentication failed"),
                                                 (404, "not found")])
def test_auth_and_not_found_errors_are_permanent_and_not_retried(
    http_server, session, status, message
):
    http_server.route(PATH, Reply(status, {"statusCode": status, "message": "Invalid JWT"}))
    with pytest.raises(PermanentProviderError, match=f"HTTP {status}.*{message}"):
        fetch(session, config(http_server))
    assert len(http_server.requests) == 1


@pytest.mark.parametrize(("body", "message"), [
    ({"statusCode": 400, "message": "Calendar not found", "traceId": "t"}, "Calendar not found"),
    ({"statusCode": 422, "message": ["startDate must be a number", "endDate must be a number"]},
     "startDate must be a number; endDate must be a number"),
    ({"message": "The token does not have access to this location."},
     "The token does not have access to this location."),
    ({"error": "Bad Request", "2026-12-01": {"slots": []}}, "Bad Request"),
])
def test_a_200_carrying_an_error_is_permanent_with_ghls_message(
    http_server, session, body, message
):
    http_server.route(PATH, Reply(200, body))
    with pytest.raises(PermanentProviderError,
                       match=re.escape(f"answered with an error: {message}")):
        fetch(session, config(http_server))


@pytest.mark.parametrize(("body", "message"), [
    ([], "expected a JSON object, got a list"),
    ({"2026-12-01": ["2026-12-01T09:00:00Z"]},
     "'2026-12-01' must be an object with a slots list, got a list"),
    ({"2026-12-01": {"slots": "2026-12-01T09:00:00Z"}},
     "'2026-12-01'.slots must be a list of date-times, got a string"),
    ({"2026-12-01": {}}, "'2026-12-01'.slots must be a list of date-times, got null"),
    ({"2026-12-01": {"slots": [{"start": "2026-12-01T09:00:00Z"}]}},
     "'2026-12-01'.slots[0] must be an ISO-8601 date-time string, got an object"),
    ({"2026-12-01": {"slots": ["9am"]}},
     "'2026-12-01'.slots[0] is not an ISO-8601 date-time: '9am'"),
    ({"2026-12-01": {"slots": ["2026-12-01T09:00:00"]}},
     "'2026-12-01'.slots[0] has no UTC offset"),
    ("<html>maintenance</html>", "not valid JSON"),
])
def test_a_body_of_the_wrong_shape_is_a_permanent_error_saying_what_is_wrong(
    http_server, session, body, message
):
    http_server.route(PATH, Reply(200, body))
    with pytest.raises(PermanentProviderError, match=re.escape(message)):
        fetch(session, config(http_server))


def test_a_huge_body_is_refused(http_server, session):
    http_server.route(PATH, Reply(200, b'{"2026-12-01": {"slots": [' + b" " * MAX_BODY_BYTES))
    with pytest.raises(PermanentProviderError, match="exceeds"):
        fetch(session, config(http_server))


@pytest.mark.parametrize("source", ["token", "token_env"])
def test_the_token_never_appears_in_an_error_message(http_server, session, source):
    replies = iter([Reply(401, {"statusCode": 401, "message": "Invalid JWT"}),
                    Reply(200, {"2026-12-01": {"slots": [17]}}),
                    Reply(200, {"statusCode": 400, "message": "bad calendar"}),
                    limited()])
    http_server.route(PATH, lambda _seen: next(replies))
    cfg = config(http_server) if source == "token" else {
        "calendar_id": CALENDAR, "token_env": "GHL_TOKEN", "base_url": http_server.url()}
    p = provider(session, environ={"GHL_TOKEN": TOKEN}, server=http_server)
    # the fifth is refused by the rate-limit gate
    messages = error_messages(p, lambda: fetch_request(cfg), 5)
    assert len(http_server.requests) == 4
    assert all(r.headers["authorization"] == f"Bearer {TOKEN}" for r in http_server.requests)
    assert not [m for m in messages if TOKEN in m or "Bearer" in m]


# --- end to end through a run ---------------------------------------------------------------


def test_a_run_stores_ghls_slots_in_utc_from_consecutive_requests(
    database_url, conn, http_server
):
    day = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    offered = {
        (day + timedelta(days=1)).date().isoformat(): [
            (day + timedelta(days=1, hours=9)).strftime("%Y-%m-%dT%H:%M:%S-05:00")],
        (day + timedelta(days=15)).date().isoformat(): [
            (day + timedelta(days=15, hours=9)).strftime("%Y-%m-%dT%H:%M:%SZ")],
    }

    def answer(seen: Seen) -> Reply:
        if seen.headers.get("authorization") != f"Bearer {TOKEN}":
            return Reply(401, {"statusCode": 401, "message": "Invalid JWT"})
        start, end = int(seen.query["startDate"]), int(seen.query["endDate"])
        body: dict[str, Any] = {"traceId": "0f3c5a1e-trace"}
        for date, slots in offered.items():
            inside = [s for s in slots
                      if start <= datetime.fromisoformat(s).timestamp() * 1000 < end]
            if inside:
                body[date] = {"slots": inside}
        return Reply(200, body)

    http_server.route(PATH, answer)
    add_workspace(conn, "ws-1", provider="ghl", config={
        "calendar_id": CALENDAR, "token_env": "GHL_TOKEN", "max_span_days": 10,
        "base_url": http_server.url()})
    summary = run(database_url, {"GHL_TOKEN": TOKEN}, server=http_server)

    assert summary.refreshed == 1 and summary.errors == 0
    row = cache_row(conn, "ws-1")
    assert row["last_error"] is None
    assert row["slots_utc"] == [
        (day + timedelta(days=1, hours=14)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        (day + timedelta(days=15, hours=9)).strftime("%Y-%m-%dT%H:%M:%SZ"),
    ]
    parts = [(int(r.query["startDate"]), int(r.query["endDate"])) for r in http_server.requests]
    assert len(parts) == 3  # 30 days in spans of 10
    assert parts[0][0] == int(row["range_start"].timestamp() * 1000)
    assert parts[-1][1] == int(row["range_end"].timestamp() * 1000)


def test_a_workspace_over_the_daily_limit_backs_off_until_utc_midnight_while_the_run_goes_on(
    database_url, conn, http_server
):
    def answer(seen: Seen) -> Reply:
        if seen.headers["authorization"] == f"Bearer {TOKEN}":
            return limited(**{"X-RateLimit-Daily-Remaining": "0"})
        return Reply(200, {"traceId": "t"})

    http_server.route(PATH, answer)
    created = datetime.now(UTC) - timedelta(hours=1)
    workspaces = [("a-limited", "LIMITED"), ("b-same-token", "LIMITED"),
                  ("c-other-token", "OTHER")]
    for i, (workspace, variable) in enumerate(workspaces):
        add_workspace(conn, workspace, provider="ghl", created_at=created + timedelta(minutes=i),
                      config={"calendar_id": CALENDAR, "token_env": variable,
                              "base_url": http_server.url()})
    midnight = (datetime.now(UTC) + timedelta(days=1)).replace(
        hour=0, minute=0, second=0, microsecond=0)
    # Up to a day of backoff must be allowed for the wait to show in full.
    summary = run(database_url, {"LIMITED": TOKEN, "OTHER": OTHER_TOKEN}, server=http_server,
                  max_backoff_ms=2 * 86_400_000)

    assert (summary.refreshed, summary.errors) == (1, 2)
    assert [r.headers["authorization"] for r in http_server.requests] == [
        f"Bearer {TOKEN}", f"Bearer {OTHER_TOKEN}"]
    for workspace in ("a-limited", "b-same-token"):
        row = cache_row(conn, workspace)
        assert row["stale_at"] >= midnight
        assert row["last_error"].startswith("[retryable]")
    assert cache_row(conn, "c-other-token")["slots_utc"] == []
