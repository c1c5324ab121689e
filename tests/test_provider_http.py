"""The generic ``http`` provider against a real loopback server (no mocks of httpx).

Most tests call the provider as the refresh job does, through ``call_provider`` and the
entry-point registry, so what they check is what would be stored: the normalised slots,
or the ``[permanent] ...``/``[retryable] ...`` error. Two tests run a whole refresh
against a real PostgreSQL.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from helpers import (
    add_cache,
    add_workspace,
    cache_row,
    make_runtime,
    make_settings,
    refreshing,
    scopes_for,
)
from httpserver import LocalServer, Reply, Seen

from availability_cron import refresh
from availability_cron.providers import (
    FetchRequest,
    PermanentProviderError,
    ProviderContext,
    ProviderRegistry,
)
from availability_cron.providers._http import ATTEMPTS, MAX_BODY_BYTES, HttpSession
from availability_cron.providers.http_json import HttpJsonProvider
from availability_cron.providers.scopes import SecretScopes
from availability_cron.refresh import MAX_SLOTS, CallContext, Outcome, PlannedRefresh

#: The window every call_provider test asks for: [NOW, NOW + 30 days).
NOW = datetime(2026, 12, 1, tzinfo=UTC)
WINDOW_END = NOW + timedelta(days=30)
TOKEN = "tok-s3cret-4f9a"
SLOT_A = "2026-12-01T09:00:00Z"
SLOT_B = "2026-12-02T09:00:00Z"


def config(server: LocalServer, path: str = "/slots", **extra: Any) -> dict[str, Any]:
    return {"url": server.url(path), **extra}


def call(
    item_config: Any,
    *,
    workspace_id: str = "ws-1",
    environ: dict[str, str] | None = None,
    seconds: float = 10.0,
    server: LocalServer | None = None,
) -> Outcome:
    """One refresh of one workspace, exactly as the sweep makes it (never raises).

    With ``server``, the operator lets every workspace send the variables of ``environ``
    to that loopback server (AVAILABILITY_CRON_SECRET_SCOPES)."""
    env = dict(environ or {})
    scopes = scopes_for(server.url(), *env) if server else SecretScopes()
    registry = ProviderRegistry(ProviderContext(environ=env, secret_scopes=scopes))
    ctx = CallContext(
        registry=registry,
        lookahead=WINDOW_END - NOW,
        deadline=time.monotonic() + seconds,
        clock=lambda: NOW,
        monotonic=time.monotonic,
        environ=env,
    )
    try:
        return refresh.call_provider(PlannedRefresh(workspace_id, "http", item_config, "missing",
                                                    NOW), ctx)
    finally:
        registry.close()


@pytest.fixture
def provider(http_server: LocalServer) -> Iterator[HttpJsonProvider]:
    """The provider on its own, for messages before the job's central scrubbing; the
    operator lets it send CAL_TOKEN to the loopback server."""
    session = HttpSession()
    yield HttpJsonProvider(ProviderContext(
        environ={"CAL_TOKEN": TOKEN}, http=session,
        secret_scopes=scopes_for(http_server.url(), "CAL_TOKEN")))
    session.close()


def fetch(provider: HttpJsonProvider, cfg: dict[str, Any]) -> list[datetime]:
    with refreshing("ws-1", provider.context):
        provider.validate_config(cfg)
        return list(provider.fetch(FetchRequest("ws-1", cfg, NOW, WINDOW_END,
                                                deadline=time.monotonic() + 10)))


# --- accepted answers -------------------------------------------------------------------------


@pytest.mark.parametrize("body", [
    pytest.param(["2026-12-02T10:00:00+01:00", SLOT_A], id="list-of-instants"),
    pytest.param([{"start": "2026-12-02T10:00:00+01:00", "end": "x"}, {"start": SLOT_A}],
                 id="list-of-objects"),
    pytest.param({"slots": ["2026-12-02T10:00:00+01:00", SLOT_A]},
                 id="object-with-list-of-instants"),
    pytest.param({"slots": [{"start": "2026-12-02T10:00:00+01:00"}, {"start": SLOT_A}],
                  "timezone": "Europe/Berlin"}, id="object-with-list-of-objects"),
])
def test_each_documented_answer_shape_becomes_sorted_utc_slots(http_server, body):
    http_server.route("/slots", Reply(200, body))

    outcome = call(config(http_server))

    assert outcome.error is None
    assert outcome.slots == (SLOT_A, SLOT_B)


def test_the_provider_returns_aware_datetimes_with_the_offsets_applied(http_server, provider):
    http_server.route("/slots", Reply(200, ["2026-12-01T10:30:00+01:30", "2026-12-01T04:00-05:00"]))

    slots = fetch(provider, config(http_server))

    assert slots == [datetime(2026, 12, 1, 9, 0, tzinfo=UTC), datetime(2026, 12, 1, 9, 0,
                                                                          tzinfo=UTC)]
    assert all(s.tzinfo is not None for s in slots)


def test_an_empty_list_means_no_free_slots_and_is_a_success(http_server):
    http_server.route("/slots", Reply(200, {"slots": []}))

    outcome = call(config(http_server))

    assert outcome.error is None
    assert outcome.slots == ()


def test_instants_outside_the_window_are_dropped_and_duplicates_merged(http_server):
    http_server.route("/slots", Reply(200, [
        SLOT_B,
        "2026-11-30T23:59:00Z",        # before the window
        SLOT_A,
        "2026-12-01T10:00:00+01:00",   # SLOT_A again, in another offset
        SLOT_B,
        WINDOW_END.isoformat(),         # the end is exclusive
        "2027-06-01T09:00:00Z",        # far after
    ]))

    outcome = call(config(http_server))

    assert outcome.error is None
    assert outcome.slots == (SLOT_A, SLOT_B)


# --- the request ------------------------------------------------------------------------------


def test_the_window_is_sent_as_utc_iso_instants_in_start_and_end(http_server):
    http_server.route("/slots", Reply(200, []))

    call(config(http_server))

    [seen] = http_server.requests
    assert seen.query == {"start": "2026-12-01T00:00:00Z", "end": "2026-12-31T00:00:00Z"}


def test_custom_window_names_and_constant_params_are_sent_exactly(http_server):
    http_server.route("/slots", Reply(200, []))

    outcome = call(config(http_server, "/slots?v=2", start_param="from", end_param="to",
                          params={"calendar": "main", "limit": 100}))

    assert outcome.error is None
    [seen] = http_server.requests
    assert seen.query == {"v": "2", "calendar": "main", "limit": "100",
                          "from": "2026-12-01T00:00:00Z", "to": "2026-12-31T00:00:00Z"}


def test_the_workspace_id_is_substituted_url_quoted_into_the_path(http_server):
    http_server.route("/cal/team%20a%2Fb%3Fc%26d/free", Reply(200, [SLOT_A]))

    outcome = call(config(http_server, "/cal/{workspace_id}/free"), workspace_id="team a/b?c&d")

    assert outcome.error is None, outcome.error
    assert outcome.slots == (SLOT_A,)
    [seen] = http_server.requests
    assert seen.path == "/cal/team%20a%2Fb%3Fc%26d/free"
    assert set(seen.query) == {"start", "end"}


def test_a_token_is_sent_as_a_bearer_authorization_with_the_extra_headers(http_server):
    http_server.route("/slots", Reply(200, []))

    call(config(http_server, token=TOKEN, headers={"X-Team": "blue"}))

    [seen] = http_server.requests
    assert seen.headers["authorization"] == f"Bearer {TOKEN}"
    assert seen.headers["x-team"] == "blue"


def test_a_token_from_token_env_is_sent_raw_in_the_header_named_by_token_header(http_server):
    http_server.route("/slots", Reply(200, []))

    outcome = call(config(http_server, token_env="CAL_TOKEN", token_header="X-Api-Key"),
                   environ={"CAL_TOKEN": TOKEN}, server=http_server)

    assert outcome.error is None
    [seen] = http_server.requests
    assert seen.headers["x-api-key"] == TOKEN
    assert "authorization" not in seen.headers


def test_no_authorization_is_sent_without_a_token(http_server):
    http_server.route("/slots", Reply(200, []))

    call(config(http_server))

    [seen] = http_server.requests
    assert "authorization" not in seen.headers


# --- HTTP failures ----------------------------------------------------------------------------


def test_a_429_is_retryable_with_the_retry_after_and_is_not_retried_in_the_run(http_server):
    http_server.route("/slots", Reply(429, {"message": "slow down"},
                                      headers={"Retry-After": "120"}))

    outcome = call(config(http_server, token=TOKEN))

    assert outcome.error is not None and outcome.error.startswith("[retryable] http: GET /slots")
    assert "429" in outcome.error
    assert outcome.retry_after == 120
    assert len(http_server.requests) == 1


def test_a_500_is_retried_and_a_later_answer_is_used(http_server):
    answers = iter([Reply(500), Reply(503, {"message": "busy"}), Reply(200, [SLOT_A])])
    http_server.route("/slots", lambda _seen: next(answers))

    outcome = call(config(http_server))

    assert outcome.error is None
    assert outcome.slots == (SLOT_A,)
    assert len(http_server.requests) == 3


def test_a_500_that_persists_is_a_retryable_error_after_the_last_attempt(http_server):
    http_server.route("/slots", Reply(500, {"message": "database down"}))

    outcome = call(config(http_server))

    assert outcome.error == "[retryable] http: GET /slots: HTTP 500: database down"
    assert outcome.slots is None
    assert len(http_server.requests) == ATTEMPTS


def test_a_401_is_permanent_and_not_retried(http_server):
    http_server.route("/slots", Reply(401, {"message": "bad credentials"}))

    outcome = call(config(http_server, token=TOKEN))

    assert outcome.error is not None and outcome.error.startswith("[permanent] http: GET /slots")
    assert "authentication failed" in outcome.error
    assert len(http_server.requests) == 1


# --- malformed and hostile answers --------------------------------------------------------------

GOOD = [SLOT_A, SLOT_B, SLOT_A]

MALFORMED = [
    pytest.param(b"<html>maintenance</html>", "not valid JSON", id="html"),
    pytest.param(b'"2026-12-01T09:00:00Z"', "the response is a string", id="json-string"),
    pytest.param(b"42", "the response is a number", id="json-number"),
    pytest.param(b"null", "the response is null", id="json-null"),
    pytest.param({"data": GOOD}, 'object without "slots"', id="object-without-slots"),
    pytest.param({"slots": SLOT_A}, '"slots" is a string, expected a list', id="slots-string"),
    pytest.param({"slots": {"start": SLOT_A}}, '"slots" is an object', id="slots-object"),
    pytest.param([*GOOD, 1764579600], "slots[3] is a number", id="epoch-number"),
    pytest.param([*GOOD, None], "slots[3] is null", id="null-slot"),
    pytest.param([*GOOD, True], "slots[3] is a boolean", id="boolean-slot"),
    pytest.param([*GOOD, [SLOT_A]], "slots[3] is a list", id="nested-list"),
    pytest.param([*GOOD, "2026-12-01T09:00:00"],
                 "slots[3] is not an ISO-8601 instant with an offset", id="naive-instant"),
    pytest.param([*GOOD, "2026-12-01"],
                 "slots[3] is not an ISO-8601 instant with an offset", id="date-only"),
    pytest.param([*GOOD, "tomorrow at 9"],
                 "slots[3] is not an ISO-8601 instant with an offset", id="unparsable"),
    pytest.param([*GOOD, "2026-12-01T09:00:00+24:00"],
                 "slots[3] is not an ISO-8601 instant with an offset", id="offset-of-a-day"),
    pytest.param([*GOOD, "0001-01-01T00:00:00+05:00"], "slots[3] is out of range",
                 id="before-year-one-in-utc"),
    pytest.param([{"start": SLOT_A}, {"end": SLOT_B}], 'slots[1] is an object without "start"',
                 id="object-without-start"),
    pytest.param([{"start": 1764579600}], "slots[0].start is a number", id="start-number"),
    pytest.param({"slots": [{"start": {"start": SLOT_A}}]}, "slots[0].start is an object",
                 id="start-nested-object"),
    pytest.param([{"start": "2026-12-01T09:00"}],
                 "slots[0].start is not an ISO-8601 instant with an offset", id="start-naive"),
    # Deeper than Python's recursion limit (20,000 brackets: a 100,000-deep body is now
    # refused by the JSON size estimate first, "too large to parse").
    pytest.param(b"[" * 20_000 + b"]" * 20_000, "not valid JSON", id="deeply-nested"),
]


@pytest.mark.parametrize(("body", "message"), MALFORMED)
def test_a_malformed_answer_is_a_permanent_error_saying_what_was_wrong(http_server, body, message):
    http_server.route("/slots", Reply(200, body))

    outcome = call(config(http_server))

    assert outcome.slots is None
    assert outcome.error is not None
    assert outcome.error.startswith("[permanent] http: "), outcome.error
    assert message in outcome.error, outcome.error


def test_a_huge_string_where_an_instant_belongs_is_reported_briefly(http_server):
    http_server.route("/slots", Reply(200, [SLOT_A, "9" * 1_000_000]))

    outcome = call(config(http_server))

    assert outcome.error is not None
    assert outcome.error.startswith("[permanent] http: slots[1] is not an ISO-8601 instant")
    assert len(outcome.error) < 200


def test_a_body_over_the_size_cap_is_a_permanent_error(http_server):
    huge = b"[" + b'"2026-12-01T09:00:00Z",' * (MAX_BODY_BYTES // 23 + 1) + b'"x"]'
    http_server.route("/slots", Reply(200, huge))

    outcome = call(config(http_server))

    assert outcome.slots is None
    assert outcome.error is not None and outcome.error.startswith("[permanent] http: GET /slots")
    assert f"exceeds {MAX_BODY_BYTES}" in outcome.error


def test_more_slots_than_the_job_accepts_is_a_permanent_error(http_server):
    http_server.route("/slots", Reply(200, [SLOT_A] * (MAX_SLOTS + 1)))

    outcome = call(config(http_server))

    assert outcome.slots is None
    assert outcome.error == f"[permanent] provider returned more than {MAX_SLOTS} slots"


# --- the token stays secret ---------------------------------------------------------------------


def test_a_token_echoed_in_an_error_body_is_not_in_the_providers_message(http_server, provider):
    http_server.route("/slots", Reply(401, {"message": f"token {TOKEN} was revoked"}))

    with pytest.raises(PermanentProviderError) as info:
        fetch(provider, config(http_server, token_env="CAL_TOKEN"))

    assert "was revoked" in str(info.value)
    assert TOKEN not in str(info.value)


def test_a_token_echoed_as_a_slot_is_not_in_the_providers_message(http_server, provider):
    http_server.route("/slots", Reply(200, [f"Bearer {TOKEN}"]))

    with pytest.raises(PermanentProviderError, match=r"slots\[0\] is not an ISO-8601") as info:
        fetch(provider, config(http_server, token=TOKEN))

    assert TOKEN not in str(info.value)


def test_a_token_with_a_newline_is_refused_without_showing_it(provider, http_server):
    bad = HttpJsonProvider(ProviderContext(environ={"CAL_TOKEN": TOKEN + "\n"},
                                           http=provider.context.http,
                                           secret_scopes=provider.context.secret_scopes))

    with pytest.raises(PermanentProviderError, match="not allowed in an HTTP header") as info, \
            refreshing("ws-1", bad.context):
        bad.validate_config(config(http_server, token_env="CAL_TOKEN"))

    assert TOKEN not in str(info.value)
    assert http_server.requests == []


# --- configuration ------------------------------------------------------------------------------

BAD_CONFIGS = [
    pytest.param({}, "provider_config.url must be set", id="no-url"),
    pytest.param({"url": "ftp://cal.example/x"}, "provider_config.url must be an absolute",
                 id="ftp"),
    pytest.param({"url": "/relative/{workspace_id}"}, "provider_config.url must be an absolute",
                 id="relative"),
    pytest.param({"url": "https://user:pw@cal.example/x"}, "provider_config.url must be a URL "
                 "without credentials", id="credentials-in-url"),
    pytest.param({"url": "https://cal.example/{workspace}/x"}, "found {workspace}",
                 id="unknown-placeholder"),
    pytest.param({"url": "https://cal.example:port/x"}, "url must be a URL with a valid port",
                 id="bad-port"),
    pytest.param({"url": "https://cal.example/x", "tokn": "t"},
                 "unknown provider_config key 'tokn'", id="typo-key"),
    pytest.param({"url": "https://cal.example/x", "headers": {"X-Team": 1}},
                 "provider_config.headers must be", id="header-number"),
    pytest.param({"url": "https://cal.example/x", "headers": {"X-Team": "a\r\nX-Evil: 1"}},
                 "provider_config.headers must be", id="header-newline"),
    pytest.param({"url": "https://cal.example/x", "headers": {"Bad Name": "x"}},
                 "provider_config.headers must be valid header names", id="header-name"),
    pytest.param({"url": "https://cal.example/x", "token": "t1", "token_env": "CAL_TOKEN"},
                 "set provider_config.token or .token_env, not both", id="token-and-env"),
    pytest.param({"url": "https://cal.example/x", "token_env": "NOT_SET"},
                 "provider_config.token_env names NOT_SET, which the operator has not scoped",
                 id="env-not-scoped"),
    pytest.param({"url": "https://cal.example/x", "token_header": "X-Key"},
                 "provider_config.token_header is set but neither", id="token-header-alone"),
    pytest.param({"url": "https://cal.example/x", "token": "t1", "token_header": "X Key"},
                 "provider_config.token_header must be", id="token-header-name"),
    pytest.param({"url": "https://cal.example/x", "token": "t1",
                  "headers": {"authorization": "Basic x"}},
                 "provider_config.headers sets Authorization", id="token-and-auth-header"),
    pytest.param({"url": "https://cal.example/x", "start_param": "at", "end_param": "at"},
                 "provider_config.end_param must be different", id="same-window-params"),
    pytest.param({"url": "https://cal.example/x", "params": {"start": "x"}},
                 "provider_config.params sets 'start'", id="params-overrides-window"),
    pytest.param({"url": "https://cal.example/x?end=never"},
                 "provider_config.url sets 'end'", id="url-query-overrides-window"),
    pytest.param({"url": "https://cal.example/x", "params": {"ids": [1, 2]}},
                 "provider_config.params must be", id="params-list"),
    pytest.param({"url": "https://cal.example/x", "params": ["a"]},
                 "provider_config.params must be", id="params-not-object"),
]


@pytest.mark.parametrize(("cfg", "message"), BAD_CONFIGS)
def test_an_unusable_config_is_a_permanent_error_naming_the_key(provider, cfg, message):
    with pytest.raises(PermanentProviderError) as info, refreshing("ws-1", provider.context):
        provider.validate_config(cfg)

    assert str(info.value).startswith("http: "), str(info.value)
    assert message in str(info.value), str(info.value)


def test_a_bad_config_calls_nothing(http_server):
    http_server.route("/slots", Reply(200, [SLOT_A]))

    outcome = call(config(http_server, tokn=TOKEN))

    assert outcome.error is not None and "unknown provider_config key 'tokn'" in outcome.error
    assert http_server.requests == []


# --- whole runs against PostgreSQL --------------------------------------------------------------


def run(database_url: str, environ: dict[str, str] | None = None,
        server: LocalServer | None = None) -> refresh.RunSummary:
    scopes = scopes_for(server.url(), *(environ or {})) if server else None
    return refresh.run_refresh(make_settings(database_url),
                               make_runtime(database_url, environ=environ,
                                            secret_scopes=scopes),
                               default_source="availability_workspaces")


def test_a_garbage_answer_leaves_the_previous_good_cache_intact(
    database_url: str, conn: psycopg.Connection[Any], http_server: LocalServer
) -> None:
    now = datetime.now(UTC)
    old_slots = [SLOT_A, SLOT_B]
    add_workspace(conn, "ws-1", provider="http", config=config(http_server))
    add_cache(conn, "ws-1", stale_at=now - timedelta(minutes=1),
              refreshed_at=now - timedelta(minutes=2), slots=old_slots)
    before = cache_row(conn, "ws-1")
    http_server.route("/slots", Reply(200, {"slots": [SLOT_A, {"start": "soon"}]}))

    summary = run(database_url)

    assert (summary.attempted, summary.refreshed, summary.errors) == (1, 0, 1)
    assert len(http_server.requests) == 1
    after = cache_row(conn, "ws-1")
    assert before is not None and after is not None
    for column in ("slots_utc", "slot_count", "range_start", "range_end", "refreshed_at"):
        assert after[column] == before[column], column
    assert after["last_error"] == (
        '[permanent] http: slots[1].start is not an ISO-8601 instant with an offset: "soon"'
    )
    assert after["consecutive_failures"] == 1
    assert after["stale_at"] > now


def test_a_token_echoed_by_a_failing_server_is_not_stored_in_last_error(
    database_url: str, conn: psycopg.Connection[Any], http_server: LocalServer
) -> None:
    add_workspace(conn, "ws-env", provider="http",
                  config=config(http_server, "/env", token_env="CAL_TOKEN"))
    add_workspace(conn, "ws-direct", provider="http",
                  config=config(http_server, "/direct", token="direct-" + TOKEN,
                                token_header="X-Api-Key"))

    def echo_credential(seen: Seen) -> Reply:
        credential = seen.headers.get("authorization") or seen.headers["x-api-key"]
        return Reply(401, {"message": f"credential {credential} was revoked"})

    http_server.route("/env", echo_credential)
    http_server.route("/direct", echo_credential)

    summary = run(database_url, environ={"CAL_TOKEN": TOKEN}, server=http_server)

    assert summary.errors == 2
    assert len(http_server.requests) == 2
    for workspace_id in ("ws-env", "ws-direct"):
        row = cache_row(conn, workspace_id)
        assert row is not None
        assert row["last_error"].startswith("[permanent] http: GET /"), row["last_error"]
        assert "was revoked" in row["last_error"]
        assert TOKEN not in row["last_error"]
