"""Backoff, stale_at jitter, slot normalisation, secrets and provider calls: no database."""

from __future__ import annotations

import random
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

import pytest

from availability_cron.providers import (
    FetchRequest,
    PermanentProviderError,
    Provider,
    ProviderContext,
    ProviderRegistry,
    RetryableProviderError,
)
from availability_cron.providers.simulated import SimulatedProvider
from availability_cron.refresh import (
    BACKOFF_JITTER,
    MAX_ERROR_CHARS,
    MAX_SLOTS,
    TTL_JITTER,
    CallContext,
    Outcome,
    PlannedRefresh,
    backoff_delay,
    call_provider,
    config_secrets,
    normalize_slots,
    success_stale_at,
)

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
MINUTE = timedelta(minutes=1)


class FixedRandom(random.Random):
    """A Random whose random() always returns ``value`` (0 <= value < 1)."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


NO_JITTER = FixedRandom(0.0)
MOST_JITTER = FixedRandom(0.999_999_999)


# --- backoff_delay --------------------------------------------------------------------------


def test_first_failure_waits_about_the_base_delay():
    assert backoff_delay(1, base=MINUTE, cap=timedelta(hours=1), rng=NO_JITTER) == MINUTE
    for seed in range(50):
        delay = backoff_delay(1, base=MINUTE, cap=timedelta(hours=1), rng=random.Random(seed))
        assert MINUTE * (1 - BACKOFF_JITTER) <= delay <= MINUTE


def test_each_further_failure_doubles_the_delay():
    delays = [
        backoff_delay(n, base=MINUTE, cap=timedelta(days=1), rng=NO_JITTER) for n in range(1, 6)
    ]
    assert delays == [MINUTE * f for f in (1, 2, 4, 8, 16)]


def test_zero_failures_is_treated_as_the_first():
    assert backoff_delay(0, base=MINUTE, cap=timedelta(hours=1), rng=NO_JITTER) == MINUTE


def test_the_delay_is_capped():
    cap = timedelta(minutes=30)
    assert backoff_delay(6, base=MINUTE, cap=cap, rng=NO_JITTER) == cap  # 32 min uncapped
    assert backoff_delay(7, base=MINUTE, cap=cap, rng=MOST_JITTER) >= cap * (1 - BACKOFF_JITTER)


@pytest.mark.parametrize(
    ("base", "cap"),
    [
        (timedelta(minutes=1), timedelta(minutes=30)),  # the defaults
        (timedelta(minutes=5), timedelta(hours=1)),
        (timedelta(days=1), timedelta(days=7)),  # the largest TTL and backoff settings allow
    ],
    ids=["ttl-1min", "ttl-5min", "ttl-1day"],
)
@pytest.mark.parametrize("failures", [31, 41, 100, 10_000])
def test_the_delay_stays_capped_after_very_many_failures(base, cap, failures):
    delay = backoff_delay(failures, base=base, cap=cap, rng=NO_JITTER)
    assert delay == cap


def test_backoff_jitter_stays_within_its_band():
    base, cap = MINUTE, timedelta(hours=2)
    for failures in (1, 3, 5):
        full = base * 2 ** (failures - 1)
        assert backoff_delay(failures, base=base, cap=cap, rng=NO_JITTER) == full
        shortest = backoff_delay(failures, base=base, cap=cap, rng=MOST_JITTER)
        assert full * (1 - BACKOFF_JITTER) <= shortest < full
        for seed in range(30):
            delay = backoff_delay(failures, base=base, cap=cap, rng=random.Random(seed))
            assert full * (1 - BACKOFF_JITTER) <= delay <= full


def test_retry_after_raises_the_floor_of_the_delay():
    delay = backoff_delay(1, base=MINUTE, cap=timedelta(hours=1), rng=MOST_JITTER,
                          retry_after=600)
    assert delay == timedelta(minutes=10)


def test_a_retry_after_shorter_than_the_backoff_changes_nothing():
    delay = backoff_delay(3, base=MINUTE, cap=timedelta(hours=1), rng=NO_JITTER, retry_after=5)
    assert delay == 4 * MINUTE


@pytest.mark.parametrize("retry_after", [0, -30])
def test_a_non_positive_retry_after_is_ignored(retry_after):
    delay = backoff_delay(1, base=MINUTE, cap=timedelta(hours=1), rng=NO_JITTER,
                          retry_after=retry_after)
    assert delay == MINUTE


@pytest.mark.parametrize("retry_after", [7200, 1e9, 1e15, float("inf")])
def test_retry_after_is_itself_capped(retry_after):
    cap = timedelta(hours=1)
    delay = backoff_delay(1, base=MINUTE, cap=cap, rng=NO_JITTER, retry_after=retry_after)
    assert delay == cap


# --- success_stale_at -----------------------------------------------------------------------


def test_a_fresh_cache_goes_stale_at_ttl_minus_at_most_the_jitter():
    ttl = timedelta(minutes=10)
    assert success_stale_at(NOW, ttl, NO_JITTER) == NOW + ttl
    assert success_stale_at(NOW, ttl, MOST_JITTER) >= NOW + ttl * (1 - TTL_JITTER)
    for seed in range(200):
        stale_at = success_stale_at(NOW, ttl, random.Random(seed))
        assert NOW + ttl * (1 - TTL_JITTER) <= stale_at <= NOW + ttl


def test_caches_refreshed_together_go_stale_at_different_times():
    rng = random.Random(42)
    stale_ats = {success_stale_at(NOW, timedelta(minutes=10), rng) for _ in range(20)}
    assert len(stale_ats) > 1


# --- normalize_slots ------------------------------------------------------------------------

WINDOW = (NOW, NOW + timedelta(days=2))


def at(hours: float, tz: timezone = UTC) -> datetime:
    return (NOW + timedelta(hours=hours)).astimezone(tz)


def test_slots_are_sorted_deduplicated_and_written_as_utc_z_strings():
    paris = timezone(timedelta(hours=1))
    raw = [at(3), at(1, paris), at(2), at(1), at(3, timezone(timedelta(hours=-5)))]
    assert normalize_slots(raw, *WINDOW) == (
        "2026-11-28T13:00:00Z",
        "2026-11-28T14:00:00Z",
        "2026-11-28T15:00:00Z",
    )


def test_an_offset_slot_is_converted_to_the_same_instant_in_utc():
    tokyo = timezone(timedelta(hours=9))
    slot = datetime(2026, 11, 29, 0, 30, tzinfo=tokyo)  # 2026-11-28 15:30 UTC
    assert normalize_slots([slot], *WINDOW) == ("2026-11-28T15:30:00Z",)


def test_slots_outside_the_window_are_dropped_and_the_end_is_exclusive():
    start, end = WINDOW
    raw = [start - timedelta(seconds=1), start, end - timedelta(seconds=1), end,
           end + timedelta(days=1)]
    assert normalize_slots(raw, start, end) == (
        "2026-11-28T12:00:00Z",
        "2026-11-30T11:59:59Z",
    )


def test_any_iterable_of_datetimes_is_accepted():
    assert normalize_slots((at(h) for h in (2, 1)), *WINDOW) == (
        "2026-11-28T13:00:00Z",
        "2026-11-28T14:00:00Z",
    )
    assert normalize_slots([], *WINDOW) == ()


def test_a_naive_datetime_is_rejected():
    with pytest.raises(PermanentProviderError, match="naive"):
        normalize_slots([at(1), datetime(2026, 11, 28, 14, 0)], *WINDOW)


@pytest.mark.parametrize(
    "value", ["2026-11-28T13:00:00Z", 1764334800, None, date(2026, 11, 28)],
    ids=["str", "int", "None", "date"],
)
def test_a_value_that_is_not_a_datetime_is_rejected(value):
    with pytest.raises(PermanentProviderError, match="where a datetime was expected"):
        normalize_slots([at(1), value], *WINDOW)


@pytest.mark.parametrize(
    "raw",
    ["2026-11-28T13:00:00Z", b"2026-11-28", {"slots": []}, None, 42],
    ids=["str", "bytes", "dict", "None", "int"],
)
def test_something_other_than_a_list_is_rejected(raw):
    with pytest.raises(PermanentProviderError, match="expected a list of datetimes"):
        normalize_slots(raw, *WINDOW)


def test_up_to_max_slots_are_accepted():
    start = NOW
    end = start + timedelta(minutes=MAX_SLOTS)
    raw = [start + timedelta(minutes=i) for i in range(MAX_SLOTS)]
    assert len(normalize_slots(raw, start, end)) == MAX_SLOTS


def test_more_than_max_slots_is_rejected_even_if_outside_the_window():
    start = NOW
    raw = [start - timedelta(minutes=i + 1) for i in range(MAX_SLOTS + 1)]
    with pytest.raises(PermanentProviderError, match=f"more than {MAX_SLOTS}"):
        normalize_slots(raw, start, start + timedelta(days=1))


# --- config_secrets -------------------------------------------------------------------------


def test_values_under_secret_looking_keys_are_secrets():
    config = {
        "token": "tok-1",
        "api_key": "key-2",
        "password": "pw-3",
        "calendar_id": "primary",
        "timeout": 5,
        "nested": {"client_secret": "sec-4", "url": "https://example.test"},
    }
    assert sorted(config_secrets(config, environ={})) == ["key-2", "pw-3", "sec-4", "tok-1"]


def test_env_keys_are_resolved_from_the_environment():
    config = {"token_env": "CAL_TOKEN", "calendar_id": "primary"}
    assert config_secrets(config, environ={"CAL_TOKEN": "s3cret-from-env"}) == [
        "s3cret-from-env"
    ]


def test_the_variable_name_an_env_key_holds_is_not_a_secret_even_when_it_is_unset():
    # The name is what the operator needs to see ("token_env names CAL_TOKEN, which is not
    # set"); only the variable's value is a secret.
    assert config_secrets({"token_env": "CAL_TOKEN"}, environ={}) == []
    assert config_secrets({"nested": {"api_key_env": "KEY_1"}}, environ={"KEY_1": ""}) == []


def test_an_env_key_holding_something_that_is_no_variable_name_is_kept_secret():
    # Most likely a token pasted under the wrong key: it is refused, and never printed.
    assert config_secrets({"token_env": "tok-live.5f2c9a7e"}, environ={}) == [
        "tok-live.5f2c9a7e"]


def test_a_token_env_naming_an_unset_variable_is_an_error_that_names_it():
    outcome = call_provider(item("calcom", {"event_type_id": 1, "token_env": "CALCOM_TOKEN_WS_1"}),
                            context())
    assert outcome.error is not None and "***" not in outcome.error
    assert "provider_config.token_env names CALCOM_TOKEN_WS_1, which" in outcome.error


def test_a_config_without_secrets_has_none():
    assert config_secrets({"calendar_id": "primary", "slots_per_day": 8}, environ={}) == []
    assert config_secrets(["not", "an", "object"], environ={}) == []


# --- call_provider --------------------------------------------------------------------------


class EchoProvider(Provider):
    """Returns the slots listed in ``config['slots']`` (hours after window start)."""

    name = "echo"

    def fetch(self, request: FetchRequest) -> Iterable[datetime]:
        return [request.window_start + timedelta(hours=h) for h in request.config["slots"]]


class RateLimitedProvider(Provider):
    name = "rate-limited"

    def fetch(self, request: FetchRequest) -> Iterable[datetime]:
        raise RetryableProviderError("HTTP 429 Too Many Requests", retry_after=30)


class BuggyProvider(Provider):
    name = "buggy"

    def fetch(self, request: FetchRequest) -> Iterable[datetime]:
        return [1 / 0]


class LeakyProvider(Provider):
    """Puts every secret it can find into its exception message, as careless plugins do."""

    name = "leaky"
    error: type[Exception] = RuntimeError

    def fetch(self, request: FetchRequest) -> Iterable[datetime]:
        config = request.config
        token = config.get("token") or self.context.environ.get(config.get("token_env", ""))
        raise self.error(f"401 Unauthorized for Authorization: Bearer {token} {config.get('note')}")


class GarbageProvider(Provider):
    name = "garbage"

    def fetch(self, request: FetchRequest) -> Iterable[datetime]:
        return "2026-11-28T13:00:00Z"  # type: ignore[return-value]


class PickyProvider(Provider):
    name = "picky"

    def validate_config(self, config: Mapping[str, Any]) -> None:
        if "calendar_id" not in config:
            raise PermanentProviderError("picky: provider_config.calendar_id is required")

    def fetch(self, request: FetchRequest) -> Iterable[datetime]:
        return []


TEST_PROVIDERS: dict[str, type[Provider]] = {
    p.name: p
    for p in (EchoProvider, RateLimitedProvider, BuggyProvider, LeakyProvider, GarbageProvider,
              PickyProvider)
}


def context(
    environ: Mapping[str, str] | None = None, secrets: list[str] | None = None
) -> CallContext:
    env = dict(environ or {})
    return CallContext(
        registry=ProviderRegistry(ProviderContext(environ=env), extra=TEST_PROVIDERS),
        lookahead=timedelta(days=2),
        deadline=time.monotonic() + 30,
        clock=lambda: NOW + timedelta(seconds=42, microseconds=5),
        monotonic=time.monotonic,
        environ=env,
        secrets=list(secrets or []),
    )


def item(provider: str, config: Any = None) -> PlannedRefresh:
    return PlannedRefresh("ws-1", provider, {} if config is None else config, "stale", NOW)


def test_a_successful_call_returns_normalised_slots_in_a_minute_aligned_window():
    outcome = call_provider(item("echo", {"slots": [2, 1, 2, 100]}), context())
    assert outcome.ok and outcome.error is None
    assert outcome.window_start == NOW  # the clock's seconds are cut off
    assert outcome.window_end == NOW + timedelta(days=2)
    assert outcome.slots == ("2026-11-28T13:00:00Z", "2026-11-28T14:00:00Z")


def test_an_unknown_provider_is_a_permanent_error_listing_the_installed_ones():
    outcome = call_provider(item("x"), context())
    assert not outcome.ok and outcome.slots is None
    assert outcome.error is not None
    assert outcome.error.startswith("[permanent] unknown provider 'x'; installed: ")
    installed = outcome.error.split("installed: ", 1)[1].split(", ")
    assert {"simulated", "echo", "buggy"} <= set(installed)


@pytest.mark.parametrize(
    ("config", "type_name"), [(["a"], "list"), ("{}", "str"), (None, "NoneType"), (3, "int")]
)
def test_a_provider_config_that_is_not_an_object_is_a_permanent_error(config, type_name):
    planned = PlannedRefresh("ws-1", "echo", config, "stale", NOW)
    outcome = call_provider(planned, context())
    assert outcome.error == f"[permanent] provider_config must be a JSON object, got {type_name}"


def test_a_config_the_provider_rejects_is_a_permanent_error():
    outcome = call_provider(item("picky", {}), context())
    assert outcome.error == "[permanent] picky: provider_config.calendar_id is required"


def test_a_retryable_error_carries_the_providers_retry_after():
    outcome = call_provider(item("rate-limited"), context())
    assert outcome.error == "[retryable] HTTP 429 Too Many Requests"
    assert outcome.retry_after == 30
    assert outcome.slots is None


def test_an_unexpected_exception_becomes_an_error_outcome_and_never_propagates():
    outcome = call_provider(item("buggy"), context())
    assert isinstance(outcome, Outcome)
    assert outcome.error == "[unexpected ZeroDivisionError] division by zero"
    assert outcome.retry_after is None


def test_slots_that_are_not_a_list_are_a_permanent_error():
    outcome = call_provider(item("garbage"), context())
    assert outcome.error == "[permanent] provider returned str, expected a list of datetimes"


@pytest.mark.parametrize("error", [RuntimeError, RetryableProviderError, PermanentProviderError])
def test_a_token_from_the_config_never_reaches_the_stored_error(error, monkeypatch):
    monkeypatch.setattr(LeakyProvider, "error", error)
    token = "tok_live_5f2c9a7e"
    outcome = call_provider(item("leaky", {"token": token}), context())
    assert outcome.error is not None
    assert token not in outcome.error
    assert "Bearer ***" in outcome.error


def test_a_token_named_by_an_env_key_never_reaches_the_stored_error():
    token = "env-token-8b1d3f"
    outcome = call_provider(item("leaky", {"token_env": "CAL_TOKEN"}),
                            context(environ={"CAL_TOKEN": token}))
    assert outcome.error is not None
    assert token not in outcome.error
    assert "Bearer ***" in outcome.error


def test_run_wide_secrets_are_scrubbed_from_the_stored_error():
    outcome = call_provider(item("leaky", {"note": "login hunter2 failed"}),
                            context(secrets=["hunter2"]))
    assert outcome.error is not None
    assert "hunter2" not in outcome.error
    assert "login *** failed" in outcome.error


def test_a_long_error_is_cut():
    outcome = call_provider(item("leaky", {"note": "x" * 5000}), context())
    assert outcome.error is not None
    assert outcome.error.startswith("[unexpected RuntimeError] 401 Unauthorized")
    assert len(outcome.error) == MAX_ERROR_CHARS


# --- the simulated provider -----------------------------------------------------------------


def simulated_request(config: Mapping[str, Any], *, time_left: float = 30.0) -> FetchRequest:
    clock = time.monotonic
    return FetchRequest(
        workspace_id="ws-1",
        config=config,
        window_start=NOW,
        window_end=NOW + timedelta(days=2),
        deadline=clock() + time_left,
        monotonic=clock,
    )


def simulated() -> SimulatedProvider:
    return SimulatedProvider(ProviderContext())


def test_the_simulated_provider_returns_hourly_slots_from_nine_utc():
    slots = list(simulated().fetch(simulated_request({"slots_per_day": 3})))
    # Window 28th 12:00 to 30th 12:00: 09-11 on the 28th are before the window; the 29th
    # has all three; the 30th's 09-11 are inside.
    assert [s.isoformat() for s in slots] == [
        "2026-11-29T09:00:00+00:00",
        "2026-11-29T10:00:00+00:00",
        "2026-11-29T11:00:00+00:00",
        "2026-11-30T09:00:00+00:00",
        "2026-11-30T10:00:00+00:00",
        "2026-11-30T11:00:00+00:00",
    ]


def test_the_simulated_provider_is_deterministic():
    first = list(simulated().fetch(simulated_request({})))
    second = list(simulated().fetch(simulated_request({})))
    assert first == second
    assert len(first) == 5 + 8 + 3  # default 8 a day, 09:00-16:00, clipped to the window


@pytest.mark.parametrize(("per_day", "expected"), [(0, 0), (1, 2), (24, 48)])
def test_the_simulated_provider_honours_slots_per_day(per_day, expected):
    slots = list(simulated().fetch(simulated_request({"slots_per_day": per_day})))
    assert len(slots) == expected
    assert len(set(slots)) == expected
    assert all(NOW <= s < NOW + timedelta(days=2) for s in slots)


@pytest.mark.parametrize(("fail", "message"), [("HTTP 503", "simulated: HTTP 503"),
                                                (True, "simulated: failure")])
def test_the_simulated_provider_fails_on_request(fail, message):
    with pytest.raises(RetryableProviderError, match=message):
        simulated().fetch(simulated_request({"fail": fail}))


def test_the_simulated_provider_waits_its_latency():
    slots = list(simulated().fetch(simulated_request({"latency_ms": 5, "slots_per_day": 1})))
    assert len(slots) == 2


def test_a_latency_beyond_the_time_left_is_a_retryable_timeout():
    with pytest.raises(RetryableProviderError, match="timed out"):
        simulated().fetch(simulated_request({"latency_ms": 60_000}, time_left=0.05))


def test_the_simulated_provider_accepts_its_documented_config():
    simulated().validate_config(
        {"latency_ms": 0, "fail": False, "hang": False, "slots_per_day": 24}
    )
    simulated().validate_config({"fail": "message"})
    simulated().validate_config({})


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ({"latncy_ms": 5}, "latncy_ms"),
        ({"latency_ms": -1}, "latency_ms"),
        ({"latency_ms": "10"}, "latency_ms"),
        ({"latency_ms": True}, "latency_ms"),
        ({"latency_ms": 1.5}, "latency_ms"),
        ({"slots_per_day": 25}, "slots_per_day"),
        ({"slots_per_day": -1}, "slots_per_day"),
        ({"slots_per_day": "8"}, "slots_per_day"),
        ({"slots_per_day": False}, "slots_per_day"),
        ({"fail": 3}, "fail"),
        ({"fail": None}, "fail"),
        ({"hang": "yes"}, "hang"),
        ({"hang": 1}, "hang"),
    ],
)
def test_the_simulated_provider_rejects_bad_config_naming_the_key(config, key):
    with pytest.raises(PermanentProviderError, match=key) as excinfo:
        simulated().validate_config(config)
    assert excinfo.value.message.startswith("simulated: ")


def test_a_bad_simulated_config_becomes_a_permanent_error_outcome():
    outcome = call_provider(item("simulated", {"slots_per_day": 99}), context())
    assert outcome.error is not None
    assert outcome.error.startswith("[permanent] simulated: provider_config.slots_per_day")


def test_a_plugins_traceback_in_the_debug_log_has_the_token_scrubbed(caplog):
    token = "tok_live_5f2c9a7e"
    with caplog.at_level("DEBUG", logger="availability_cron.refresh"):
        call_provider(item("leaky", {"token": token}), context())

    assert "Traceback" in caplog.text
    assert token not in caplog.text
