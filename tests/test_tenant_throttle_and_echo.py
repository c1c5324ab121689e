"""One tenant's throttle gates nobody else, and no echoed token is ever stored in part.

Against real loopback servers: the rate-limit gate keys on the whole credential (token,
configured headers, the URL's path and query), and every message quoting a provider's
answer quotes a value whole or not at all, so the job's scrubbing of whole secrets
always finds it.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from helpers import add_cache, add_workspace, cache_row, make_runtime, make_settings
from httpserver import Reply, Seen

from availability_cron import refresh
from availability_cron.providers import ProviderContext, ProviderRegistry, credential_key
from availability_cron.refresh import CallContext, Outcome, PlannedRefresh

NOW = datetime(2026, 12, 1, tzinfo=UTC)
TOKEN = "tok-Zq8vN3xKp2LmR7sTw4YbC9dFh6JgA1eU5iO0"  # 43 characters


def call(provider: str, cfg: dict[str, Any]) -> Outcome:
    registry = ProviderRegistry(ProviderContext(environ={}))
    ctx = CallContext(registry=registry, lookahead=timedelta(days=7),
                      deadline=time.monotonic() + 10, clock=lambda: NOW,
                      monotonic=time.monotonic, environ={})
    try:
        return refresh.call_provider(PlannedRefresh("ws-1", provider, cfg, "missing", NOW), ctx)
    finally:
        registry.close()


def assert_nothing_of(secret: str, text: str, piece: int = 8) -> None:
    for i in range(len(secret) - piece + 1):
        assert secret[i:i + piece] not in text, f"part of the token leaked: {text!r}"


# --- item 5: the rate-limit gate ----------------------------------------------------------------


@pytest.mark.parametrize("first, second", [
    pytest.param("/a?key=A", "/a?key=B", id="key-in-the-query"),
    pytest.param("/tenant-a/free", "/tenant-b/free", id="key-in-the-path"),
])
def test_urls_carrying_different_credentials_get_different_gate_keys(first, second):
    base = "https://cal.internal"
    assert credential_key("http", base + first, None) != credential_key("http", base + second,
                                                                         None)


def test_configured_headers_are_part_of_the_gate_key_and_identical_credentials_share_it():
    url = "https://cal.internal/{workspace_id}/free"
    a = credential_key("http", url, None, headers={"X-Api-Key": "A"})
    b = credential_key("http", url, None, headers={"X-Api-Key": "B"})
    same = credential_key("http", url, None, headers={"x-api-key": "A"})

    assert a != b
    assert a == same
    assert "A" not in a.split("|", 2)[2]  # the fingerprint, never the credential


def test_one_tenants_429_does_not_gate_other_tenants_on_the_same_host(
        database_url, conn, http_server):
    http_server.route("/hostile", Reply(429, {"message": "slow down"},
                                        headers={"Retry-After": "99999999"}))
    http_server.route("/query", Reply(200, ["2026-12-01T09:00:00Z"]))
    http_server.route("/header", Reply(200, ["2026-12-01T09:00:00Z"]))
    http_server.route("/none", Reply(200, ["2026-12-01T09:00:00Z"]))
    workspaces = {
        "hostile": {"url": http_server.url("/hostile?key=H")},
        "by-query": {"url": http_server.url("/query?key=Q")},
        "by-header": {"url": http_server.url("/header"), "headers": {"X-Api-Key": "K"}},
        "no-credential": {"url": http_server.url("/none")},
    }
    for i, (workspace, cfg) in enumerate(workspaces.items()):
        add_workspace(conn, workspace, provider="http", config=cfg)
        # The hostile one is the stalest, so it is called (and throttled) first.
        add_cache(conn, workspace, stale_at=datetime.now(UTC) - timedelta(hours=1, minutes=-i))

    summary = refresh.run_refresh(make_settings(database_url, concurrency=1),
                                  make_runtime(database_url),
                                  default_source="availability_workspaces")

    assert (summary.refreshed, summary.errors) == (3, 1)
    assert sorted(r.path for r in http_server.requests) == ["/header", "/hostile", "/none",
                                                            "/query"]
    for workspace in ("by-query", "by-header", "no-credential"):
        row = cache_row(conn, workspace)
        assert row is not None and row["last_error"] is None and row["consecutive_failures"] == 0
    hostile = cache_row(conn, "hostile")
    assert hostile is not None and hostile["last_error"].startswith("[retryable] ")
    # A hostile Retry-After is capped by AVAILABILITY_CRON_MAX_BACKOFF_MS (30 min).
    assert hostile["stale_at"] - hostile["fetched_at"] <= timedelta(minutes=30, seconds=1)


def test_workspaces_sharing_one_credential_share_its_throttle(http_server):
    http_server.route("/acme/free", Reply(429, {}, headers={"Retry-After": "120"}))
    http_server.route("/globex/free", Reply(200, []))
    cfg = {"url": http_server.url("/{workspace_id}/free"), "token": "shared-agency-token"}
    registry = ProviderRegistry(ProviderContext(environ={}))
    ctx = CallContext(registry=registry, lookahead=timedelta(days=7),
                      deadline=time.monotonic() + 10, clock=lambda: NOW,
                      monotonic=time.monotonic, environ={})
    try:
        first = refresh.call_provider(PlannedRefresh("acme", "http", cfg, "missing", NOW), ctx)
        second = refresh.call_provider(PlannedRefresh("globex", "http", cfg, "missing", NOW), ctx)
    finally:
        registry.close()

    assert first.error is not None and "429" in first.error
    assert second.error is not None and "rate limited by the provider earlier" in second.error
    assert [r.path for r in http_server.requests] == ["/acme/free"]


# --- item 6: echoed tokens ----------------------------------------------------------------------


def echo(header: str, shape: str):  # type: ignore[no-untyped-def]
    def answer(seen: Seen) -> Reply:
        value = seen.headers.get(header, "")
        if shape == "slot":
            return Reply(200, [value])
        if shape == "key":
            return Reply(200, {value: 1})
        if shape == "long-error":
            return Reply(400, {"message": "x" * 980 + " " + value})
        return Reply(400, {"error": {"message": "y" * 975 + " " + value}})
    return answer


@pytest.mark.parametrize("shape", ["slot", "key", "long-error"])
def test_an_http_server_echoing_the_token_never_gets_part_of_it_stored(http_server, shape):
    http_server.route("/slots", echo("authorization", shape))

    outcome = call("http", {"url": http_server.url("/slots"), "token": TOKEN})

    assert outcome.error is not None and outcome.error.startswith("[permanent] ")
    assert_nothing_of(TOKEN, outcome.error)


def test_a_calcom_error_echoing_the_token_in_a_long_message_never_gets_part_of_it_stored(
        http_server):
    http_server.route("/v2/slots", echo("authorization", "calcom-error"))

    outcome = call("calcom", {"event_type_id": 1, "base_url": http_server.url(),
                              "token": TOKEN})

    assert outcome.error is not None
    assert_nothing_of(TOKEN, outcome.error)


def test_a_secret_with_white_space_in_it_is_scrubbed_before_the_message_is_folded():
    secret = "tab\tseparated  secret"

    stored = refresh.short_error("permanent", Exception(f"bad key {secret}!"), [secret])

    assert stored == "[permanent] bad key ***!"


def test_tokenless_workspaces_never_share_a_gate_even_with_one_url_template(http_server):
    http_server.route("/hostile/free", Reply(429, {}, headers={"Retry-After": "99999999"}))
    http_server.route("/victim/free", Reply(200, []))
    cfg = {"url": http_server.url("/{workspace_id}/free")}
    registry = ProviderRegistry(ProviderContext(environ={}))
    ctx = CallContext(registry=registry, lookahead=timedelta(days=7),
                      deadline=time.monotonic() + 10, clock=lambda: NOW,
                      monotonic=time.monotonic, environ={})
    try:
        refresh.call_provider(PlannedRefresh("hostile", "http", cfg, "missing", NOW), ctx)
        victim = refresh.call_provider(PlannedRefresh("victim", "http", cfg, "missing", NOW), ctx)
    finally:
        registry.close()

    assert victim.error is None, victim.error
    assert [r.path for r in http_server.requests] == ["/hostile/free", "/victim/free"]


@pytest.mark.parametrize("own", [
    pytest.param({"X-Secret": "inh_"}, id="a-known-prefix-first"),
    pytest.param({"X-Api-Key": "live_8f2c"}, id="a-known-suffix-first"),
])
def test_secrets_of_the_config_cannot_be_ordered_to_defeat_the_scrub(own):
    secret = "inh_live_8f2c1d9e7a6b5c4d3e2f"
    secrets = [*own.values(), secret]

    stored = refresh.short_error("permanent", Exception(f"token {secret} refused"), secrets)

    assert_nothing_of(secret, stored, piece=6)


@pytest.mark.parametrize("echoed", ['ab"cd\\ef-secret-42', "abc\tdef-secret-42"])
def test_a_slot_value_echoing_a_secret_with_quotes_or_tabs_is_not_quoted(http_server, echoed):
    http_server.route("/slots", Reply(200, [echoed]))

    outcome = call("http", {"url": http_server.url("/slots"), "headers": {"X-Token": echoed}})

    assert outcome.error is not None
    assert "secret-42" not in outcome.error


def test_an_overlapping_longer_secret_cannot_shield_part_of_another_from_the_scrub():
    operator = "inh_live_8f2c1d9e"
    tenants_own = "8f2c1d9e-and-then-some-more-text"  # longer, so it was replaced first

    stored = refresh.short_error("permanent", Exception(f"token inh_live_{tenants_own}"),
                                 [operator, tenants_own])

    assert_nothing_of(operator, stored, piece=6)
