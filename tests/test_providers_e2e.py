"""One real `availability-cron refresh` over every built-in provider, against loopback servers.

The run is the installed command in a new process, as cron starts it; the providers'
APIs are a real HTTP server on 127.0.0.1 answering in each one's documented shape.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from helpers import add_workspace, cache_row, clean_env, run_cli
from httpserver import Reply, Seen

pytestmark = pytest.mark.e2e

CALCOM_TOKEN = "cal_live_e2e_7f3a9c1b2d4e6f8091a2b3c4"
CALENDLY_TOKEN = "eyJraWQiOiJlMmUtY2FsZW5kbHktdG9rZW4tMDAwMDAw"
GHL_TOKEN = "pit-e2e00000-1111-2222-3333-444455556666"
HTTP_TOKEN = "inhouse-e2e-secret-token-99"


def _tomorrow(hour: int) -> datetime:
    day = (datetime.now(UTC) + timedelta(days=1)).replace(hour=0, minute=0, second=0,
                                                           microsecond=0)
    return day + timedelta(hours=hour)


def _z(instant: datetime) -> str:
    return instant.strftime("%Y-%m-%dT%H:%M:%S.000Z")


ICS = """BEGIN:VCALENDAR
VERSION:2.0
PRODID:-//availability-cron tests//EN
BEGIN:VEVENT
UID:busy-1@test
DTSTAMP:20260101T000000Z
DTSTART:{start}
DTEND:{end}
SUMMARY:Busy
END:VEVENT
END:VCALENDAR
"""


def test_one_run_over_every_provider_stores_their_slots_and_records_their_errors(
    database_url, conn, http_server
):
    t9, t10 = _tomorrow(9), _tomorrow(10)
    day = t9.strftime("%Y-%m-%d")
    http_server.route("/v2/slots", Reply(200, {"status": "success", "data": {
        day: [{"start": _z(t9)}, {"start": _z(t10)}]}}))
    http_server.route("/event_type_available_times", lambda seen: Reply(200, {"collection": [
        {"status": "available", "invitees_remaining": 1, "start_time": _z(t9)}]}))
    http_server.route("/calendars/cal1/free-slots", Reply(200, {
        day: {"slots": [t10.strftime("%Y-%m-%dT%H:%M:%S+00:00")]}, "traceId": "x"}))
    http_server.route("/slots/ws-http", Reply(200, [_z(t9)]))
    http_server.route("/limited/v2/slots", Reply(429, {"message": "slow down"},
                                                 headers={"Retry-After": "600"}))
    busy = t9 + timedelta(hours=1)
    http_server.route("/feed.ics", Reply(200, ICS.format(
        start=busy.strftime("%Y%m%dT%H%M%SZ"),
        end=(busy + timedelta(hours=2)).strftime("%Y%m%dT%H%M%SZ"))))

    base = http_server.url()
    add_workspace(conn, "ws-calcom", provider="calcom",
                  config={"event_type_id": 7, "token_env": "CALCOM_TOKEN_WS_CALCOM",
                          "base_url": base})
    add_workspace(conn, "ws-calendly", provider="calendly",
                  config={"event_type": "https://api.calendly.com/event_types/E2E",
                          "token_env": "CALENDLY_TOKEN_WS_CALENDLY", "base_url": base})
    add_workspace(conn, "ws-ghl", provider="ghl",
                  config={"calendar_id": "cal1", "token": GHL_TOKEN, "base_url": base})
    add_workspace(conn, "ws-http", provider="http",
                  config={"url": base + "/slots/{workspace_id}", "token": HTTP_TOKEN})
    add_workspace(conn, "ws-ics", provider="ics",
                  config={"url": base + "/feed.ics", "timezone": "UTC",
                          "hours": {d: [["09:00", "17:00"]] for d in
                                    ("mon", "tue", "wed", "thu", "fri", "sat", "sun")},
                          "slot_minutes": 60})
    add_workspace(conn, "ws-sim", provider="simulated")
    add_workspace(conn, "ws-limited", provider="calcom",
                  config={"event_type_id": 8, "token": "cal_live_limited_000000000",
                          "base_url": base + "/limited"})
    add_workspace(conn, "ws-unknown", provider="outlook")

    # The built-in rules scope CALCOM_TOKEN_{workspace} and CALENDLY_TOKEN_{workspace};
    # the operator adds the loopback server as a host those tokens may be sent to.
    scopes = json.dumps({"CALCOM_TOKEN_{workspace}": {"hosts": [base]},
                         "CALENDLY_TOKEN_{workspace}": {"hosts": [base]}})
    env = clean_env(DATABASE_URL=database_url, CALCOM_TOKEN_WS_CALCOM=CALCOM_TOKEN,
                    CALENDLY_TOKEN_WS_CALENDLY=CALENDLY_TOKEN,
                    AVAILABILITY_CRON_SECRET_SCOPES=scopes,
                    AVAILABILITY_CRON_TIME_BUDGET_MS="15000",
                    AVAILABILITY_CRON_DEADLINE_MARGIN_MS="2000")
    result = run_cli("refresh", env=env)

    assert result.returncode == 0, result.stderr
    summary = result.json()
    assert summary["success"] is True
    assert summary["attempted"] == 8
    assert summary["refreshed"] == 6 and summary["errors"] == 2
    for token in (CALCOM_TOKEN, CALENDLY_TOKEN, GHL_TOKEN, HTTP_TOKEN):
        assert token not in result.stdout and token not in result.stderr

    def slots(workspace: str) -> list[str]:
        row = cache_row(conn, workspace)
        assert row is not None and row["last_error"] is None, row
        return list(row["slots_utc"])

    z9, z10 = _z(t9).replace(".000", ""), _z(t10).replace(".000", "")
    assert slots("ws-calcom") == [z9, z10]
    assert slots("ws-calendly") == [z9]
    assert slots("ws-ghl") == [z10]
    assert slots("ws-http") == [z9]
    ics = slots("ws-ics")
    assert z9 in ics and z10 not in ics  # 10:00-12:00 is busy in the feed
    assert len(slots("ws-sim")) > 0

    limited = cache_row(conn, "ws-limited")
    assert limited is not None and "HTTP 429" in limited["last_error"]
    # The provider's Retry-After (600 s) pushes the next attempt out, past the TTL.
    assert limited["stale_at"] - limited["fetched_at"] >= timedelta(seconds=600)
    unknown = cache_row(conn, "ws-unknown")
    assert unknown is not None
    assert unknown["last_error"].startswith("[permanent] unknown provider 'outlook'; installed:")
    for name in ("calcom", "calendly", "ghl", "http", "ics", "simulated"):
        assert name in unknown["last_error"]

    stored = json.dumps([cache_row(conn, w) for w in ("ws-limited", "ws-unknown")], default=str)
    assert "cal_live_limited_000000000" not in stored
    seen: list[Seen] = http_server.requests
    assert {s.headers.get("user-agent", "").split("/")[0] for s in seen} == {"availability-cron"}
