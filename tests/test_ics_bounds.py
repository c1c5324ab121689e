"""Memory bounds of the ics provider: feeds too large to parse, occurrences, the parse budget.

Peaks are tracemalloc's (Python allocations), with generous bounds; wall-clock and RSS
figures are benchmarks/bench_memory.py's.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from helpers import traced_peak
from httpserver import LocalServer, Reply

from availability_cron.providers import (
    FetchRequest,
    PermanentProviderError,
    ProviderContext,
    RetryableProviderError,
)
from availability_cron.providers import ics as ics_module
from availability_cron.providers._memory import PARSE_MEMORY_BYTES, MemoryBudget
from availability_cron.providers.ics import (
    MAX_FEED_BYTES,
    MAX_RULE_STEPS,
    RULE_STEP_BYTES,
    FeedCensus,
    IcsProvider,
)

START = datetime(2026, 10, 20, tzinfo=UTC)


def feed(events: list[list[str]]) -> str:
    lines = ["BEGIN:VCALENDAR", "VERSION:2.0", "PRODID:-//t//t//EN"]
    for body in events:
        lines += ["BEGIN:VEVENT", *body, "END:VEVENT"]
    return "\r\n".join([*lines, "END:VCALENDAR", ""])


def small_events(count: int) -> str:
    """``count`` five-minute events, ~110 bytes each: the issue's 4.5 MB of 40,000 events."""
    return feed([[f"UID:e{i}@t",
                  f"DTSTART:{START + timedelta(minutes=10 * (i % 4000)):%Y%m%dT%H%M%SZ}",
                  "DURATION:PT5M", "SUMMARY:xyzzy-busy"] for i in range(count)])


@pytest.fixture
def provider() -> Iterator[IcsProvider]:
    p = IcsProvider(ProviderContext(environ={}))
    yield p
    p.context.http.close()


def request(config: Mapping[str, Any], seconds: float = 10.0) -> FetchRequest:
    return FetchRequest("ws-1", config, START, START + timedelta(days=7),
                        deadline=time.monotonic() + seconds)


def serve(server: LocalServer, text: str, name: str = "basic") -> dict[str, Any]:
    path = f"/private-0123456789abcdef/{name}.ics"
    server.route(path, Reply(200, text, headers={"Content-Type": "text/calendar"}))
    return {"url": server.url(path), "timezone": "UTC"}


# --- feeds too large to parse ---------------------------------------------------------------


def test_a_feed_of_40000_events_is_refused_before_it_is_parsed(provider, http_server):
    text = small_events(40_000)
    assert 4_000_000 < len(text) < 5_000_000
    config = serve(http_server, text)

    with traced_peak() as traced:
        with pytest.raises(PermanentProviderError, match="too large to expand") as info:
            provider.fetch(request(config))
    peak = traced.bytes

    # The body, its text and the census; parsing it would take hundreds of MB.
    assert peak < 8 * len(text), f"peak {peak / 1e6:.0f} MB"
    message = str(info.value)
    assert "40000 events" in message and f"the limit is {MAX_FEED_BYTES / 1e6:.0f} MB" in message
    assert "xyzzy" not in message and "0123456789abcdef" not in message


def test_a_feed_under_the_cap_is_parsed_and_releases_its_reservation(provider, http_server):
    config = serve(http_server, small_events(500))

    slots = provider.fetch(request(config))

    assert slots  # the events leave gaps between them
    assert provider.context.memory.used == 0


def test_the_census_over_estimates_with_folded_lines_and_list_values():
    text = feed([["UID:a", "DTSTART:20261020T090000Z", "DURATION:PT1H",
                  "RRULE:FREQ=DAILY;COUNT=3", "EXDATE:20261021T090000Z,20261022T090000Z",
                  "DESCRIPTION:one long", " folded line"],
                 ["UID:b", "DTSTART:20261020T090000Z", "BEGIN:VALARM", "TRIGGER:-PT5M",
                  "END:VALARM"]])

    census = FeedCensus.of(text)

    assert (census.events, census.components, census.rules) == (2, 2, 1)  # + VCALENDAR
    assert census.values == 1 and census.lines == text.count("\n") + 1


def test_the_largest_feed_allowed_with_the_longest_expansion_fits_the_parse_budget():
    assert MAX_FEED_BYTES + RULE_STEP_BYTES * MAX_RULE_STEPS <= PARSE_MEMORY_BYTES


# --- occurrences ----------------------------------------------------------------------------


def test_occurrences_are_counted_while_expanding_not_after(provider, http_server, monkeypatch):
    monkeypatch.setattr(ics_module, "MAX_OCCURRENCES", 1_000)
    dates = ",".join(f"{START + timedelta(minutes=i):%Y%m%dT%H%M%SZ}" for i in range(3_000))
    text = feed([["UID:r", "DTSTART:20261020T000000Z", "DURATION:PT1M", f"RDATE:{dates}"]])
    config = serve(http_server, text)
    provider.fetch(request(serve(http_server, small_events(1), "warm")))  # imports, client

    with traced_peak() as traced:
        with pytest.raises(PermanentProviderError, match="more than 1000 event occurrences"):
            provider.fetch(request(config))
    peak = traced.bytes

    # Parsing 3,000 dates and the series: ~1-2 MB. A copy of every occurrence first
    # (~2 KB each) would be 6 MB more.
    assert peak < 4_000_000, f"peak {peak / 1e6:.1f} MB"


# --- the parse budget -----------------------------------------------------------------------


def test_a_feed_waits_for_the_parse_budget_and_gives_up_at_the_deadline(http_server):
    budget = MemoryBudget(capacity=1_000_000)
    provider = IcsProvider(ProviderContext(environ={}, memory=budget))
    config = serve(http_server, small_events(50))
    try:
        with budget.reserve(1_000_000, request({}), "test"):  # another worker's parse
            with pytest.raises(RetryableProviderError, match="waiting for memory"):
                provider.fetch(request(config, seconds=0.5))
            assert budget.used == 1_000_000
        assert provider.fetch(request(config))  # free again: parsed
        assert budget.used == 0
    finally:
        provider.context.http.close()


def test_a_reservation_is_released_when_the_feed_fails(provider, http_server):
    config = serve(http_server, feed([["UID:x", "DTSTART:garbage", "DURATION:PT1H"]]))

    with pytest.raises(PermanentProviderError):
        provider.fetch(request(config))

    assert provider.context.memory.used == 0


def test_reservations_are_served_in_turn_and_a_shrink_lets_the_next_one_in():
    budget = MemoryBudget(capacity=100)
    order: list[str] = []
    entered = {name: threading.Event() for name in ("big", "small")}

    def worker(name: str, weight: int) -> None:
        with budget.reserve(weight, request({}), name):
            order.append(name)
            entered[name].set()

    with budget.reserve(70, request({}), "first") as first:
        big = threading.Thread(target=worker, args=("big", 50))
        big.start()
        while not budget.waiting:  # big is waiting in line
            time.sleep(0.005)
        small = threading.Thread(target=worker, args=("small", 10))
        small.start()
        # small would fit (70 + 10), but big came first: neither may enter yet.
        assert not entered["small"].wait(0.2)
        first.shrink(40)  # 40 + 50 fits: big goes, then small
        big.join(5)
        small.join(5)

    assert order == ["big", "small"]
    assert budget.used == 0


def test_a_reservation_larger_than_the_budget_is_a_programming_error():
    with pytest.raises(ValueError), MemoryBudget(capacity=10).reserve(11, request({}), "t"):
        pass
