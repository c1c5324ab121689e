"""The ics provider: iCalendar feeds from a real loopback server (or a file) to free slots."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    FakeClock,
    add_workspace,
    cache_row,
    clean_env,
    make_runtime,
    make_settings,
    refreshing,
    run_cli,
    scopes_for,
)
from httpserver import LocalServer, Reply

from availability_cron import refresh
from availability_cron.providers import (
    FetchRequest,
    PermanentProviderError,
    ProviderContext,
    RetryableProviderError,
)
from availability_cron.providers import ics as ics_module
from availability_cron.providers.ics import FILE_ROOT_ENV, IcsProvider, read_config

ALL_DAY = {day: [["00:00", "24:00"]] for day in ("mon", "tue", "wed", "thu", "fri", "sat", "sun")}


# --- feed texts -----------------------------------------------------------------------------


def vevent(uid: str, *lines: str) -> str:
    return "\r\n".join(["BEGIN:VEVENT", f"UID:{uid}", "DTSTAMP:20260901T000000Z", *lines,
                        "END:VEVENT"])


def vcalendar(*events: str, header: tuple[str, ...] = ()) -> str:
    return "\r\n".join(["BEGIN:VCALENDAR", "VERSION:2.0", "PRODID:-//availability-cron//tests//EN",
                        *header, *events, "END:VCALENDAR", ""])


# --- calling the provider -------------------------------------------------------------------


def utc(month: int, day: int, hour: int = 0, minute: int = 0, year: int = 2026) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


@pytest.fixture
def provider() -> Iterator[IcsProvider]:
    p = IcsProvider(ProviderContext(environ={}))
    yield p
    p.context.http.close()


def fetch(provider: IcsProvider, config: Mapping[str, Any], start: datetime,
          end: datetime) -> list[datetime]:
    with refreshing("ws-1", provider.context):
        provider.validate_config(config)
        request = FetchRequest("ws-1", config, start, end, deadline=time.monotonic() + 10)
        return sorted(provider.fetch(request))


def serve(server: LocalServer, text: str, path: str = "/feed.ics") -> str:
    server.route(path, Reply(200, text, headers={"Content-Type": "text/calendar"}))
    return server.url(path)


def grid(days: list[tuple[int, int]], hours: range, minute: int = 0) -> list[datetime]:
    """Every (month, day) at each of ``hours`` (UTC)."""
    return [utc(m, d, h, minute) for m, d in days for h in hours]


# --- recurrence -----------------------------------------------------------------------------


def test_weekly_event_blocks_each_week_except_its_exdate_and_follows_its_moved_instance(
    provider, http_server
):
    feed = vcalendar(
        vevent("standup", "DTSTART:20260901T100000Z", "DTEND:20260901T110000Z",
               "RRULE:FREQ=WEEKLY;BYDAY=TU", "EXDATE:20261013T100000Z"),
        # The 20 October instance moved to Wednesday 21 October, 09:00.
        vevent("standup", "RECURRENCE-ID:20261020T100000Z", "DTSTART:20261021T090000Z",
               "DTEND:20261021T100000Z"),
    )
    config = {"url": serve(http_server, feed), "timezone": "UTC", "slot_minutes": 60,
              "hours": {d: [["09:00", "12:00"]] for d in ("mon", "tue", "wed", "thu", "fri")}}

    slots = fetch(provider, config, utc(10, 12), utc(10, 31))

    weekdays = [(10, d) for d in (12, 13, 14, 15, 16, 19, 20, 21, 22, 23, 26, 27, 28, 29, 30)]
    busy = {utc(10, 21, 9), utc(10, 27, 10)}
    assert slots == [s for s in grid(weekdays, range(9, 12)) if s not in busy]
    assert utc(10, 13, 10) in slots  # the EXDATE leaves that Tuesday free
    assert utc(10, 20, 10) in slots  # the moved instance no longer blocks its old time


def test_a_cancelled_instance_of_a_series_does_not_block(provider, http_server):
    feed = vcalendar(
        vevent("daily", "DTSTART:20261019T090000Z", "DURATION:PT1H", "RRULE:FREQ=DAILY;COUNT=3"),
        vevent("daily", "RECURRENCE-ID:20261020T090000Z", "DTSTART:20261020T090000Z",
               "DURATION:PT1H", "STATUS:CANCELLED"),
    )
    config = {"url": serve(http_server, feed), "timezone": "UTC", "slot_minutes": 60,
              "hours": {"mon": [["09:00", "10:00"]], "tue": [["09:00", "10:00"]],
                        "wed": [["09:00", "10:00"]]}}

    assert fetch(provider, config, utc(10, 19), utc(10, 22)) == [utc(10, 20, 9)]


# --- what is busy ---------------------------------------------------------------------------


def test_all_day_events_block_whole_local_days_with_an_exclusive_dtend(provider, http_server):
    feed = vcalendar(
        vevent("trip", "DTSTART;VALUE=DATE:20261020", "DTEND;VALUE=DATE:20261022"),
        vevent("holiday", "DTSTART;VALUE=DATE:20261023"),  # no DTEND: one day
    )
    config = {"url": serve(http_server, feed), "timezone": "America/New_York",
              "slot_minutes": 60, "hours": ALL_DAY}

    slots = fetch(provider, config, utc(10, 19), utc(10, 25))

    # New York is UTC-4 in October: local days run from 04:00Z to 04:00Z.
    assert utc(10, 20, 3) in slots  # Monday 23:00 local is free
    assert not [s for s in slots if utc(10, 20, 4) <= s < utc(10, 22, 4)]  # Tue and Wed
    assert [s for s in slots if utc(10, 22, 4) <= s < utc(10, 23, 4)] == [
        utc(10, 22, 4) + timedelta(hours=h) for h in range(24)]  # Thursday is free
    assert not [s for s in slots if utc(10, 23, 4) <= s < utc(10, 24, 4)]  # Friday
    assert utc(10, 24, 4) in slots  # Saturday 00:00 local


def test_floating_tzid_utc_and_duration_times_are_each_placed_correctly(provider, http_server):
    feed = vcalendar(
        vevent("floating", "DTSTART:20261021T100000", "DTEND:20261021T110000"),
        vevent("berlin", "DTSTART;TZID=Europe/Berlin:20261022T170000", "DURATION:PT1H"),
        vevent("utc", "DTSTART:20261023T130000Z", "DTEND:20261023T140000Z"),
    )
    config = {"url": serve(http_server, feed), "timezone": "America/New_York",
              "slot_minutes": 60, "hours": {d: [["09:00", "12:00"]] for d in ("wed", "thu", "fri")}}

    slots = fetch(provider, config, utc(10, 21), utc(10, 24))

    # 09:00-12:00 New York is 13:00-16:00Z. The floating 10:00 is New York time (14:00Z);
    # 17:00 Berlin (CEST) is 15:00Z; 13:00Z is 09:00 New York.
    assert slots == [
        utc(10, 21, 13), utc(10, 21, 15),
        utc(10, 22, 13), utc(10, 22, 14),
        utc(10, 23, 14), utc(10, 23, 15),
    ]


def test_floating_times_follow_the_feeds_x_wr_timezone_when_it_names_a_known_zone(
    provider, http_server
):
    event = vevent("floating", "DTSTART:20261021T100000", "DTEND:20261021T110000")
    hours = {"wed": [["00:00", "24:00"]]}
    tokyo = {"url": serve(http_server, vcalendar(event, header=("X-WR-TIMEZONE:Asia/Tokyo",)),
                          "/tokyo.ics"), "timezone": "UTC", "slot_minutes": 60, "hours": hours}
    unknown = {**tokyo, "url": serve(http_server, vcalendar(
        event, header=("X-WR-TIMEZONE:Nowhere/Special",)), "/unknown.ics")}

    # 10:00 in Tokyo is 01:00Z; an unknown zone is ignored and the workspace's (UTC) used.
    assert utc(10, 21, 1) not in fetch(provider, tokyo, utc(10, 21), utc(10, 22))
    assert utc(10, 21, 10) in fetch(provider, tokyo, utc(10, 21), utc(10, 22))
    assert utc(10, 21, 1) in fetch(provider, unknown, utc(10, 21), utc(10, 22))
    assert utc(10, 21, 10) not in fetch(provider, unknown, utc(10, 21), utc(10, 22))


def test_an_event_with_a_start_time_and_no_end_or_duration_blocks_nothing(provider, http_server):
    feed = vcalendar(vevent("reminder", "DTSTART:20261020T090000Z"))
    config = {"url": serve(http_server, feed), "timezone": "UTC",
              "hours": {"tue": [["09:00", "10:00"]]}}

    assert fetch(provider, config, utc(10, 20), utc(10, 21)) == [utc(10, 20, 9),
                                                                 utc(10, 20, 9, 30)]


def test_transparent_and_cancelled_events_do_not_block(provider, http_server):
    feed = vcalendar(
        vevent("free", "DTSTART:20261020T090000Z", "DTEND:20261020T100000Z",
               "TRANSP:TRANSPARENT"),
        vevent("cancelled", "DTSTART:20261020T100000Z", "DTEND:20261020T110000Z",
               "STATUS:CANCELLED"),
        vevent("busy", "DTSTART:20261020T110000Z", "DTEND:20261020T120000Z",
               "TRANSP:OPAQUE", "STATUS:CONFIRMED"),
    )
    config = {"url": serve(http_server, feed), "timezone": "UTC", "slot_minutes": 60,
              "hours": {"tue": [["09:00", "12:00"]]}}

    assert fetch(provider, config, utc(10, 20), utc(10, 21)) == [utc(10, 20, 9), utc(10, 20, 10)]


def test_a_slot_touching_an_event_is_free_but_one_overlapping_it_by_a_minute_is_not(
    provider, http_server
):
    feed = vcalendar(
        vevent("a", "DTSTART:20261020T100000Z", "DTEND:20261020T103000Z"),
        vevent("b", "DTSTART:20261020T112900Z", "DTEND:20261020T113000Z"),
    )
    config = {"url": serve(http_server, feed), "timezone": "UTC",
              "hours": {"tue": [["09:30", "12:00"]]}}

    assert fetch(provider, config, utc(10, 20), utc(10, 21)) == [
        utc(10, 20, 9, 30), utc(10, 20, 10, 30), utc(10, 20, 11, 30)]


# --- daylight saving ------------------------------------------------------------------------


@pytest.mark.parametrize(("zone", "start", "end", "expected"), [
    # Berlin leaves summer time on Sunday 25 October 2026: 09:00 is 07:00Z, then 08:00Z.
    ("Europe/Berlin", utc(10, 23), utc(10, 28),
     [utc(10, 23, 7), utc(10, 24, 7), utc(10, 25, 8), utc(10, 26, 8), utc(10, 27, 8)]),
    # New York does on Sunday 1 November 2026: 09:00 is 13:00Z, then 14:00Z.
    ("America/New_York", utc(10, 30), utc(11, 4),
     [utc(10, 30, 13), utc(10, 31, 13), utc(11, 1, 14), utc(11, 2, 14), utc(11, 3, 14)]),
])
def test_nine_in_the_morning_maps_to_the_right_utc_instant_on_both_sides_of_a_dst_change(
    provider, http_server, zone, start, end, expected
):
    config = {"url": serve(http_server, vcalendar()), "timezone": zone,
              "hours": {day: [["09:00", "09:30"]] for day in ALL_DAY}}

    assert fetch(provider, config, start, end) == expected


def test_an_event_across_the_dst_change_blocks_its_true_utc_span(provider, http_server):
    # 08:00-10:00 Berlin on the Monday after the change is 07:00-09:00Z (CET, UTC+1).
    feed = vcalendar(vevent("m", "DTSTART;TZID=Europe/Berlin:20261019T080000",
                            "DTEND;TZID=Europe/Berlin:20261019T100000",
                            "RRULE:FREQ=WEEKLY"))
    config = {"url": serve(http_server, feed), "timezone": "UTC", "slot_minutes": 60,
              "hours": {"mon": [["05:00", "10:00"]]}}

    assert fetch(provider, config, utc(10, 19), utc(10, 27)) == [
        utc(10, 19, 5), utc(10, 19, 8), utc(10, 19, 9),  # CEST: busy 06:00-08:00Z
        utc(10, 26, 5), utc(10, 26, 6), utc(10, 26, 9),  # CET: busy 07:00-09:00Z
    ]


def test_spring_forward_gap_times_are_skipped_and_fall_back_repeats_are_offered_once(
    provider, http_server
):
    config = {"url": serve(http_server, vcalendar()), "timezone": "Europe/Berlin",
              "hours": {"sun": [["01:00", "04:00"]]}}

    # 29 March 2026: 02:00-03:00 does not exist; 01:30 CET plus 30 minutes is 03:00 CEST.
    assert fetch(provider, config, utc(3, 28), utc(3, 30)) == [
        utc(3, 29, 0), utc(3, 29, 0, 30), utc(3, 29, 1), utc(3, 29, 1, 30)]
    # 25 October 2026: 02:00-03:00 happens twice; only the first (CEST) is offered.
    assert fetch(provider, config, utc(10, 24), utc(10, 26)) == [
        utc(10, 24, 23), utc(10, 24, 23, 30), utc(10, 25, 0), utc(10, 25, 0, 30),
        utc(10, 25, 2), utc(10, 25, 2, 30)]


# --- slots configuration --------------------------------------------------------------------


def test_min_notice_drops_slots_starting_too_soon_after_the_window_start(provider, http_server):
    config: dict[str, Any] = {"url": serve(http_server, vcalendar()), "timezone": "UTC",
                              "hours": {"tue": [["09:00", "13:00"]]}}
    start = utc(10, 20, 10, 17)  # "now": the window starts at the job's clock reading

    assert fetch(provider, config, start, utc(10, 21))[0] == utc(10, 20, 10, 30)
    config["min_notice_minutes"] = 90
    assert fetch(provider, config, start, utc(10, 21)) == [
        utc(10, 20, 12), utc(10, 20, 12, 30)]


def test_slot_minutes_and_hours_shape_the_grid(provider, http_server):
    config = {"url": serve(http_server, vcalendar()), "timezone": "UTC", "slot_minutes": 45,
              "hours": {"sat": [["10:00", "11:30"]],
                        "mon": [["13:00", "14:00"], ["08:00", "09:00"]]}}

    assert fetch(provider, config, utc(10, 24), utc(10, 27)) == [
        utc(10, 24, 10), utc(10, 24, 10, 45), utc(10, 26, 8), utc(10, 26, 13)]


def test_default_hours_are_monday_to_friday_nine_to_five_in_half_hours(provider, http_server):
    config = {"url": serve(http_server, vcalendar()), "timezone": "UTC"}

    slots = fetch(provider, config, utc(10, 23), utc(10, 27))  # Friday to Monday

    weekdays = [(10, 23), (10, 26)]
    assert slots == sorted(grid(weekdays, range(9, 17), 0) + grid(weekdays, range(9, 17), 30))


def test_slots_outside_the_window_are_not_returned(provider, http_server):
    config = {"url": serve(http_server, vcalendar()), "timezone": "UTC",
              "hours": {"tue": [["09:00", "11:00"]]}}

    assert fetch(provider, config, utc(10, 20, 9, 30), utc(10, 20, 10, 30)) == [
        utc(10, 20, 9, 30), utc(10, 20, 10)]


# --- fetching -------------------------------------------------------------------------------


def test_the_token_is_sent_as_a_bearer_header_with_the_configured_headers(http_server):
    provider = IcsProvider(ProviderContext(
        environ={"ICS_TOKEN": "s3cret"},
        secret_scopes=scopes_for(http_server.url(), "ICS_TOKEN")))
    config = {"url": serve(http_server, vcalendar()), "timezone": "UTC",
              "token_env": "ICS_TOKEN", "headers": {"X-Team": "blue"}}
    try:
        fetch(provider, config, utc(10, 20), utc(10, 21))
    finally:
        provider.context.http.close()

    seen = http_server.requests[0].headers
    assert seen["authorization"] == "Bearer s3cret"
    assert seen["x-team"] == "blue"
    assert seen["accept"].startswith("text/calendar")


def test_a_redirected_feed_is_followed(provider, http_server):
    serve(http_server, vcalendar(), "/new.ics")
    http_server.route("/old.ics", Reply(301, "", headers={"Location": "/new.ics"}))
    config = {"url": http_server.url("/old.ics"), "timezone": "UTC",
              "hours": {"tue": [["09:00", "09:30"]]}}

    assert fetch(provider, config, utc(10, 20), utc(10, 21)) == [utc(10, 20, 9)]


def test_a_body_that_is_not_icalendar_is_a_permanent_error_that_does_not_echo_it(
    provider, http_server
):
    http_server.route("/feed.ics", Reply(200, "<html><body>login page xyzzy</body></html>"))
    config = {"url": http_server.url("/feed.ics"), "timezone": "UTC"}

    with pytest.raises(PermanentProviderError, match="not a valid iCalendar file") as info:
        fetch(provider, config, utc(10, 20), utc(10, 21))
    assert "xyzzy" not in str(info.value)


def test_a_broken_calendar_is_a_permanent_error_that_does_not_echo_it(provider, http_server):
    feed = vcalendar(vevent("x", "DTSTART:garbage-xyzzy", "DTEND:20261020T100000Z"))
    config = {"url": serve(http_server, feed), "timezone": "UTC"}

    with pytest.raises(PermanentProviderError, match="cannot be read or expanded") as info:
        fetch(provider, config, utc(10, 20), utc(10, 21))
    assert "xyzzy" not in str(info.value)


#: From a real Google birthday calendar: RDATE with a date and a "Z" is no valid value.
GOOGLE_BIRTHDAY = vevent("bday", "DTSTART;VALUE=DATE:20131210", "RRULE:FREQ=YEARLY",
                         "RDATE:20131210Z", "SUMMARY:xyzzy's birthday")


@pytest.mark.parametrize("bad", [
    GOOGLE_BIRTHDAY,
    vevent("x", "DTSTART:garbage-xyzzy", "DTEND:20261020T100000Z"),
    vevent("r", "DTSTART:20261020T090000Z", "DURATION:PT1H", "RRULE:FREQ=FORTNIGHTLY-xyzzy"),
], ids=["google-birthday-rdate", "broken-dtstart", "broken-rrule"])
def test_an_unreadable_event_is_skipped_with_a_warning_and_the_rest_of_the_feed_is_used(
    provider, http_server, caplog, bad
):
    feed = vcalendar(bad, vevent("ok", "DTSTART:20261020T090000Z", "DTEND:20261020T100000Z"))
    config = {"url": serve(http_server, feed), "timezone": "UTC", "slot_minutes": 60,
              "hours": {"tue": [["09:00", "11:00"]]}}

    with caplog.at_level("WARNING", logger="availability_cron.providers.ics"):
        assert fetch(provider, config, utc(10, 20), utc(10, 21)) == [utc(10, 20, 10)]
    [record] = [r for r in caplog.records if r.name == "availability_cron.providers.ics"]
    assert record.levelname == "WARNING"
    assert record.getMessage() == (
        "workspace ws-1: ics: skipped 1 of the feed's 2 events: it cannot be read or "
        "expanded; the others are used")
    assert "xyzzy" not in record.getMessage()


def test_a_missing_feed_is_a_permanent_error(provider, http_server):
    config = {"url": http_server.url("/gone.ics"), "timezone": "UTC"}

    with pytest.raises(PermanentProviderError, match="ics: GET 127.0.0.1:.*/gone.ics: HTTP 404"):
        fetch(provider, config, utc(10, 20), utc(10, 21))


def test_secret_looking_path_segments_are_hidden_in_messages(provider, http_server):
    config = {"url": http_server.url("/calendar/ical/private-0123456789abcdef/basic.ics"),
              "timezone": "UTC"}

    with pytest.raises(PermanentProviderError, match="HTTP 404") as info:
        fetch(provider, config, utc(10, 20), utc(10, 21))
    assert "0123456789abcdef" not in str(info.value)
    assert "/calendar/ical/…/basic.ics" in str(info.value)


# --- feeds as real calendar programs write them ----------------------------------------------


def test_a_feed_starting_with_a_utf8_bom_is_read(provider, http_server):
    # Windows/.NET exporters often put a byte order mark before BEGIN:VCALENDAR.
    feed = "\ufeff" + vcalendar(vevent("bom", "DTSTART:20261020T090000Z",
                                       "DTEND:20261020T100000Z"))
    http_server.route("/feed.ics", Reply(200, feed.encode("utf-8"),
                                         headers={"Content-Type": "text/calendar"}))
    config = {"url": http_server.url("/feed.ics"), "timezone": "UTC", "slot_minutes": 60,
              "hours": {"tue": [["09:00", "11:00"]]}}

    assert fetch(provider, config, utc(10, 20), utc(10, 21)) == [utc(10, 20, 10)]


def test_a_feed_file_starting_with_a_utf8_bom_is_read(tmp_path):
    (tmp_path / "cal.ics").write_bytes(b"\xef\xbb\xbf" + BUSY_TUESDAY_NINE.encode())
    config = {"path": "cal.ics", "timezone": "UTC", "slot_minutes": 60, "hours": FILE_HOURS}

    assert fetch(file_provider(tmp_path), config, utc(10, 20), utc(10, 21)) == [utc(10, 20, 10)]


def vfreebusy(*lines: str) -> str:
    return "\r\n".join(["BEGIN:VFREEBUSY", "UID:fb", "DTSTAMP:20260901T000000Z",
                        "DTSTART:20261019T000000Z", "DTEND:20261031T000000Z", *lines,
                        "END:VFREEBUSY"])


def test_a_free_busy_feed_blocks_its_busy_periods(provider, http_server):
    # What Fastmail, Nextcloud and Zimbra publish at their free/busy URLs: no VEVENTs,
    # only VFREEBUSY periods. Tuesday and Wednesday are busy from 09:00 to 17:00.
    feed = vcalendar(vfreebusy(
        "FREEBUSY;FBTYPE=BUSY:20261020T090000Z/20261020T170000Z,20261021T090000Z/PT8H"))
    config = {"url": serve(http_server, feed), "timezone": "UTC", "slot_minutes": 60}

    slots = fetch(provider, config, utc(10, 19), utc(10, 23))

    assert slots == grid([(10, 19), (10, 22)], range(9, 17))


def test_free_busy_periods_of_every_busy_type_block_and_free_ones_do_not(provider, http_server):
    feed = vcalendar(
        vfreebusy("FREEBUSY:20261020T090000Z/PT1H",  # no FBTYPE: BUSY
                  "FREEBUSY;FBTYPE=BUSY-TENTATIVE:20261020T100000Z/PT1H",
                  "FREEBUSY;FBTYPE=BUSY-UNAVAILABLE:20261020T110000Z/20261020T120000Z",
                  "FREEBUSY;FBTYPE=FREE:20261020T120000Z/PT1H",
                  "FREEBUSY;FBTYPE=X-OUT-OF-OFFICE:20261020T130000Z/PT1H"),  # unknown: BUSY
        vevent("meeting", "DTSTART:20261020T140000Z", "DTEND:20261020T150000Z"),
    )
    config = {"url": serve(http_server, feed), "timezone": "UTC", "slot_minutes": 60,
              "hours": {"tue": [["09:00", "16:00"]]}}

    assert fetch(provider, config, utc(10, 20), utc(10, 21)) == [utc(10, 20, 12),
                                                                 utc(10, 20, 15)]


# --- expansion limits -----------------------------------------------------------------------


def test_a_rule_with_too_many_occurrences_in_the_window_is_refused_before_expanding(
    provider, http_server
):
    feed = vcalendar(vevent("tick", "DTSTART:20261020T000000Z", "DURATION:PT1S",
                            "RRULE:FREQ=SECONDLY"))
    config = {"url": serve(http_server, feed), "timezone": "UTC"}

    started = time.monotonic()
    with pytest.raises(PermanentProviderError, match="more than 50000 event occurrences"):
        fetch(provider, config, utc(10, 20), utc(10, 31))
    assert time.monotonic() - started < 2


def test_a_rule_too_costly_to_expand_up_to_the_window_is_refused(provider, http_server):
    feed = vcalendar(vevent("old", "DTSTART:19000101T000000Z", "DURATION:PT1M",
                            "RRULE:FREQ=HOURLY"))
    config = {"url": serve(http_server, feed), "timezone": "UTC"}

    with pytest.raises(PermanentProviderError, match="too costly to expand"):
        fetch(provider, config, utc(10, 20), utc(10, 31))


def test_a_secondly_rule_its_by_parts_narrow_to_once_an_hour_is_expanded(provider, http_server):
    # ~800 occurrences over the padded 30-day window: cheap, whatever its FREQ says.
    feed = vcalendar(vevent("hourly", "DTSTART:20261020T000000Z", "DURATION:PT30M",
                            "RRULE:FREQ=SECONDLY;BYSECOND=0;BYMINUTE=0"))
    config = {"url": serve(http_server, feed), "timezone": "UTC", "slot_minutes": 30,
              "hours": {"mon": [["09:00", "11:00"]]}}

    slots = fetch(provider, config, utc(10, 20), utc(11, 19))

    mondays = [(10, 26), (11, 2), (11, 9), (11, 16)]
    assert slots == grid(mondays, range(9, 11), minute=30)


def test_a_narrowed_secondly_rule_started_long_before_the_window_is_still_refused(
    provider, http_server
):
    # dateutil walks every second from DTSTART to filter them (3 s for a year): the walk
    # is charged even though few occurrences are kept.
    feed = vcalendar(vevent("hourly", "DTSTART:20251020T000000Z", "DURATION:PT30M",
                            "RRULE:FREQ=SECONDLY;BYSECOND=0;BYMINUTE=0"))
    config = {"url": serve(http_server, feed), "timezone": "UTC"}

    with pytest.raises(PermanentProviderError, match="too costly to expand"):
        fetch(provider, config, utc(10, 20), utc(11, 19))


def test_more_occurrences_than_the_limit_after_expansion_is_a_permanent_error(
    provider, http_server, monkeypatch
):
    monkeypatch.setattr(ics_module, "MAX_OCCURRENCES", 3)
    feed = vcalendar(*(vevent(f"e{i}", f"DTSTART:2026102{i}T090000Z", "DURATION:PT1H")
                       for i in range(4)))
    config = {"url": serve(http_server, feed), "timezone": "UTC"}

    with pytest.raises(PermanentProviderError, match="more than 3 event occurrences in the window"):
        fetch(provider, config, utc(10, 20), utc(10, 31))


# --- local files ----------------------------------------------------------------------------

BUSY_TUESDAY_NINE = vcalendar(vevent("f", "DTSTART:20261020T090000Z", "DTEND:20261020T100000Z"))
FILE_HOURS = {"tue": [["09:00", "11:00"]]}


def file_provider(root: Path) -> IcsProvider:
    return IcsProvider(ProviderContext(environ={FILE_ROOT_ENV: str(root)}))


def test_a_feed_file_inside_the_root_is_read(tmp_path):
    root = tmp_path / "feeds"
    (root / "team").mkdir(parents=True)
    (root / "team" / "cal.ics").write_text(BUSY_TUESDAY_NINE)
    config = {"path": "team/cal.ics", "timezone": "UTC", "slot_minutes": 60, "hours": FILE_HOURS}

    assert fetch(file_provider(root), config, utc(10, 20), utc(10, 21)) == [utc(10, 20, 10)]


@pytest.mark.parametrize("escape", ["../outside.ics", "link.ics", "ABSOLUTE"])
def test_a_path_resolving_outside_the_root_is_refused_without_reading_it(tmp_path, escape):
    root = tmp_path / "feeds"
    root.mkdir()
    outside = tmp_path / "outside.ics"
    outside.write_text(vcalendar(vevent("secret-xyzzy", "DTSTART:20261020T090000Z")))
    (root / "link.ics").symlink_to(outside)
    path = str(outside) if escape == "ABSOLUTE" else escape
    config = {"path": path, "timezone": "UTC"}

    with pytest.raises(PermanentProviderError, match=f"inside {FILE_ROOT_ENV}") as info:
        fetch(file_provider(root), config, utc(10, 20), utc(10, 21))
    assert "xyzzy" not in str(info.value)


def test_a_path_is_refused_when_no_file_root_is_configured(tmp_path):
    (tmp_path / "cal.ics").write_text(BUSY_TUESDAY_NINE)
    provider = IcsProvider(ProviderContext(environ={}))

    with pytest.raises(PermanentProviderError, match=f"needs {FILE_ROOT_ENV}"):
        provider.validate_config({"path": str(tmp_path / "cal.ics"), "timezone": "UTC"})


def test_a_missing_file_and_a_directory_are_permanent_errors(tmp_path):
    (tmp_path / "dir.ics").mkdir()
    provider = file_provider(tmp_path)

    with pytest.raises(PermanentProviderError, match="names no file"):
        fetch(provider, {"path": "nope.ics", "timezone": "UTC"}, utc(10, 20), utc(10, 21))
    with pytest.raises(PermanentProviderError, match="not a regular file"):
        fetch(provider, {"path": "dir.ics", "timezone": "UTC"}, utc(10, 20), utc(10, 21))


def test_a_missing_file_root_is_a_retryable_error_naming_the_variable(tmp_path):
    # An unmounted volume: the directory is back once it is mounted again.
    provider = file_provider(tmp_path / "unmounted")

    with pytest.raises(RetryableProviderError, match=f"{FILE_ROOT_ENV} names no directory"):
        fetch(provider, {"path": "cal.ics", "timezone": "UTC"}, utc(10, 20), utc(10, 21))


def test_a_file_root_that_is_a_file_is_a_permanent_error(tmp_path):
    (tmp_path / "root").write_text("not a directory")

    with pytest.raises(PermanentProviderError, match=f"{FILE_ROOT_ENV} is not a directory"):
        fetch(file_provider(tmp_path / "root"), {"path": "cal.ics", "timezone": "UTC"},
              utc(10, 20), utc(10, 21))


def test_a_missing_file_root_fails_only_the_workspaces_with_feed_files(database_url, conn,
                                                                      tmp_path):
    add_workspace(conn, "sim", provider="simulated")
    add_workspace(conn, "file-feed", provider="ics", config={"path": "cal.ics", "timezone": "UTC"})
    env = clean_env(DATABASE_URL=database_url,
                    AVAILABILITY_CRON_ICS_FILE_ROOT=str(tmp_path / "unmounted"))

    result = run_cli("refresh", env=env)

    assert result.returncode == 0, (result.stdout, result.stderr)
    assert result.json()["refreshed"] == 1 and result.json()["errors"] == 1
    assert cache_row(conn, "sim")["refreshed_at"] is not None
    error = cache_row(conn, "file-feed")["last_error"]
    assert error.startswith("[retryable] ") and FILE_ROOT_ENV in error


# --- configuration --------------------------------------------------------------------------


@pytest.mark.parametrize(("change", "message"), [
    ({"timezone": "Mars/Olympus_Mons"}, "provider_config.timezone must be an IANA"),
    ({"timezone": None}, "provider_config.timezone must be set"),
    ({"hours": {"mon": [["9:00", "17:00"]]}}, r"provider_config.hours.mon\[0\] must be"),
    ({"hours": {"mon": [["17:00", "09:00"]]}}, r"provider_config.hours.mon\[0\] must be"),
    ({"hours": {"tue": [["09:00", "12:00"], ["11:00", "13:00"]]}},
     "provider_config.hours.tue must be intervals that do not overlap"),
    ({"hours": {"monday": [["09:00", "17:00"]]}}, "hours has an unknown day 'monday'"),
    ({"hours": [["09:00", "17:00"]]}, "provider_config.hours must be an object"),
    ({"slot_minutes": 3}, "provider_config.slot_minutes must be an integer from 5 to 480"),
    ({"min_notice_minutes": -1}, "provider_config.min_notice_minutes must be an integer"),
    ({"colour": "blue"}, "unknown provider_config key 'colour'"),
    ({"url": "ftp://example.com/a.ics"}, "provider_config.url must be an absolute http"),
    ({"url": "https://me:pw@example.com/a.ics"}, "provider_config.url must be a URL without"),
    ({"url": None}, "needs exactly one of url and path"),
    ({"path": "a.ics"}, "needs exactly one of url and path"),
    ({"headers": {"Authorization": "x"}, "token": "t"}, "not both"),
])
def test_bad_config_is_a_permanent_error_naming_the_key(provider, change, message):
    config = {"url": "https://example.com/a.ics", "timezone": "Europe/Berlin", **change}
    config = {k: v for k, v in config.items() if v is not None}

    with pytest.raises(PermanentProviderError, match=message):
        provider.validate_config(config)


def test_token_and_headers_are_refused_for_path_feeds(tmp_path):
    with pytest.raises(PermanentProviderError, match="token applies to url feeds only"):
        file_provider(tmp_path).validate_config(
            {"path": "a.ics", "timezone": "UTC", "token": "t"})


def test_webcal_urls_are_fetched_over_https():
    config = read_config({"url": "webcal://calendar.example.com/team.ics", "timezone": "UTC"}, {})
    assert config.url == "https://calendar.example.com/team.ics"


# --- end to end -----------------------------------------------------------------------------


def test_a_refresh_run_stores_the_ics_slots_in_utc(database_url, conn, http_server):
    feed = vcalendar(vevent("e2e", "DTSTART:20261020T090000Z", "DTEND:20261020T100000Z"))
    add_workspace(conn, "ws-ics", provider="ics", config={
        "url": serve(http_server, feed), "timezone": "UTC", "slot_minutes": 60,
        "hours": {day: [["09:00", "12:00"]] for day in ALL_DAY},
    })

    summary = refresh.run_refresh(
        make_settings(database_url, lookahead_days=2),
        make_runtime(database_url, clock=FakeClock(utc(10, 20))),
        default_source="availability_workspaces",
    )

    row = cache_row(conn, "ws-ics")
    assert summary.refreshed == 1 and row is not None and row["last_error"] is None
    assert row["slots_utc"] == ["2026-10-20T10:00:00Z", "2026-10-20T11:00:00Z",
                                "2026-10-21T09:00:00Z", "2026-10-21T10:00:00Z",
                                "2026-10-21T11:00:00Z"]


@pytest.mark.e2e
def test_library_warnings_never_reach_stderr_as_raw_python_warnings(database_url, conn,
                                                                   http_server):
    # Evolution and Thunderbird write "globally unique" TZIDs; icalendar guesses the zone
    # and warns each time with Python's own two-line print on bare stderr.
    feed = vcalendar(vevent("tb", "DTSTART;TZID=/freeassociation.sourceforge.net/Europe/Berlin:"
                                  "20261020T090000", "DURATION:PT1H"))
    add_workspace(conn, "ws-tb", provider="ics", config={
        "url": serve(http_server, feed), "timezone": "Europe/Berlin"})

    result = run_cli("refresh", env=clean_env(DATABASE_URL=database_url))

    assert result.returncode == 0, result.stderr
    assert result.json()["refreshed"] == 1
    log_line = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z [A-Z]+ ")
    stray = [line for line in result.stderr.splitlines() if not log_line.match(line)]
    assert stray == [], result.stderr
    assert "GloballyUniqueTZIDGuessed" not in result.stderr
