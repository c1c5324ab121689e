"""`availability-cron show WORKSPACE` and `availability-cron config`: what an operator sees.

Both must be useful without ever printing a secret: a token in provider_config, the value
of the variable a token_env names, a database password, the ping URL.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from helpers import add_cache, add_workspace, clean_env, run_cli

from availability_cron import lock
from availability_cron.refresh import redact_config
from availability_cron.settings import SPECS

CONFIG_TOKEN = "tok-in-config-5f1e2d"
ENV_TOKEN = "tok-from-env-9a8b7c"
DB_PASSWORD = "db-pass-3c4d5e"
LOCK_DB_PASSWORD = "lock-pass-6f7a8b"
PING_SECRET = "0f6a1c2e-ping-check-uuid"
PING_URL = f"https://hc-ping.example/{PING_SECRET}"
SECRETS = [CONFIG_TOKEN, ENV_TOKEN, DB_PASSWORD, LOCK_DB_PASSWORD, PING_SECRET]

SLOTS = [f"2026-12-0{day}T09:00:00Z" for day in range(1, 8)]

#: Nothing listens here: a command that tries to connect fails with exit 1.
CLOSED_PORT_URL = f"postgresql://user:{DB_PASSWORD}@127.0.0.1:1/db"


def assert_no_secret(result) -> None:
    for secret in SECRETS:
        assert secret not in result.stdout, f"{secret!r} printed on stdout"
        assert secret not in result.stderr, f"{secret!r} printed on stderr"


def secret_env(database_url: str, **extra: str) -> dict[str, str]:
    """DATABASE_URL with a password (the test server does not ask for it), a lock URL with
    another, a ping URL, and the variable a workspace's token_env names."""
    return clean_env(
        DATABASE_URL=psycopg.conninfo.make_conninfo(database_url, password=DB_PASSWORD),
        AVAILABILITY_CRON_LOCK_DATABASE_URL=psycopg.conninfo.make_conninfo(
            database_url, password=LOCK_DB_PASSWORD),
        AVAILABILITY_CRON_PING_URL=PING_URL,
        ACME_TOKEN=ENV_TOKEN,
        **extra,
    )


@pytest.fixture
def acme(conn):
    """A workspace whose config holds a token, names a token variable and a time zone, with a
    cache of 7 slots whose last refresh failed twice after a success 5 minutes ago."""
    add_workspace(conn, "acme", provider="calcom", config={
        "event_type_id": 1234567,
        "token": CONFIG_TOKEN,
        "token_env": "ACME_TOKEN",
        "timezone": "Europe/Berlin",
        "base_url": f"https://cal.example/api?key={CONFIG_TOKEN}",
    })
    now = datetime.now(UTC)
    add_cache(conn, "acme", refreshed_at=now - timedelta(minutes=5), slots=SLOTS,
              stale_at=now - timedelta(seconds=30), fetched_at=now - timedelta(minutes=1),
              consecutive_failures=2, last_error="[retryable] calcom: HTTP 503")
    return "acme"


# --- show -----------------------------------------------------------------------------------


@pytest.mark.e2e
def test_show_prints_the_source_and_cache_rows_without_any_secret(database_url, acme):
    result = run_cli("show", acme, env=secret_env(database_url))

    assert result.returncode == 0, result.stderr
    assert_no_secret(result)
    report = result.json()
    assert report["workspaceId"] == "acme"
    source = report["source"]
    assert source["provider"] == "calcom"
    assert source["enabled"] is True
    config = source["providerConfig"]
    assert config["token"] == "***"
    assert config["token_env"] == "ACME_TOKEN"  # the variable's name, not its value
    assert config["event_type_id"] == 1234567
    # A URL shows only where it points: paths and queries may hold credentials.
    assert config["base_url"] == "https://cal.example/***"


@pytest.mark.e2e
def test_show_prints_the_name_a_token_env_holds_when_that_variable_is_unset(database_url, conn):
    add_workspace(conn, "unset", provider="calcom",
                  config={"event_type_id": 1, "token_env": "UNSET_CALCOM_TOKEN"})

    result = run_cli("show", "unset", env=secret_env(database_url))

    assert result.returncode == 0, result.stderr
    assert result.json()["source"]["providerConfig"]["token_env"] == "UNSET_CALCOM_TOKEN"


@pytest.mark.e2e
def test_show_prints_the_slot_count_the_first_5_slots_and_them_in_the_workspaces_zone(
    database_url, acme
):
    report = run_cli("show", acme, env=secret_env(database_url)).json()

    cache = report["cache"]
    assert cache["slotCount"] == 7
    assert cache["firstSlots"] == SLOTS[:5]
    assert cache["timezone"] == "Europe/Berlin"
    assert cache["firstSlotsLocal"][0] == "2026-12-01T10:00:00+01:00"
    assert len(cache["firstSlotsLocal"]) == 5
    assert "slots_utc" not in cache and "slotsUtc" not in cache


@pytest.mark.e2e
def test_show_prints_the_success_age_when_it_is_due_and_the_failure_streak(database_url, acme):
    report = run_cli("show", acme, env=secret_env(database_url)).json()

    cache = report["cache"]
    assert 290 <= cache["successAgeSeconds"] <= 360
    assert cache["consecutiveFailures"] == 2
    assert cache["lastError"] == "[retryable] calcom: HTTP 503"
    assert report["nextDueAt"] == cache["staleAt"]
    assert report["dueNow"] is True


@pytest.mark.e2e
def test_show_of_a_workspace_not_due_yet_says_so(database_url, conn):
    add_workspace(conn, "fresh")
    add_cache(conn, "fresh", refreshed_at=datetime.now(UTC), slots=[],
              stale_at=datetime.now(UTC) + timedelta(minutes=1))

    report = run_cli("show", "fresh", env=clean_env(DATABASE_URL=database_url)).json()

    assert report["dueNow"] is False
    assert report["cache"]["slotCount"] == 0
    assert report["cache"]["firstSlots"] == []
    assert "timezone" not in report["cache"]


@pytest.mark.e2e
def test_show_of_a_workspace_without_a_cache_says_it_is_due(database_url, conn):
    add_workspace(conn, "new")

    report = run_cli("show", "new", env=clean_env(DATABASE_URL=database_url)).json()

    assert report["cache"] is None
    assert report["nextDueAt"] is None
    assert report["dueNow"] is True


@pytest.mark.e2e
def test_show_of_a_disabled_workspace_is_never_due(database_url, conn):
    add_workspace(conn, "off", enabled=False)

    report = run_cli("show", "off", env=clean_env(DATABASE_URL=database_url)).json()

    assert report["source"]["enabled"] is False
    assert report["dueNow"] is False


@pytest.mark.e2e
def test_show_as_a_table_prints_no_secret_either(database_url, acme):
    result = run_cli("show", acme, "--format", "table",
                     env=secret_env(database_url, COLUMNS="200"))

    assert result.returncode == 0, result.stderr
    assert_no_secret(result)
    assert "source.providerConfig.token_env" in result.stdout
    assert "ACME_TOKEN" in result.stdout


@pytest.mark.e2e
def test_show_of_an_unknown_workspace_exits_2_naming_it(database_url):
    result = run_cli("show", "nope", env=clean_env(DATABASE_URL=database_url))

    assert result.returncode == 2
    assert result.stdout == ""
    assert "no workspace 'nope'" in result.stderr


def test_redacted_config_hides_values_under_secret_looking_keys_at_any_depth():
    config = {"api_key": 123, "auth": {"user": "bob"}, "headers": [{"Authorization": "B x"}],
              "nested": {"password": "p", "url": "https://x"}, "secret": None,
              "token_env": "ACME_TOKEN", "calendar_id": "c1"}

    assert redact_config(config) == {
        "api_key": "***", "auth": "***", "headers": [{"Authorization": "***"}],
        "nested": {"password": "***", "url": "https://x"}, "secret": None,
        "token_env": "ACME_TOKEN", "calendar_id": "c1",
    }


# --- config ---------------------------------------------------------------------------------


def config_entries(result) -> dict[str, dict[str, object]]:
    return {entry["name"]: entry for entry in result.json()["settings"]}


@pytest.mark.e2e
def test_config_lists_every_setting_with_its_value_and_source(tmp_path):
    (tmp_path / ".env").write_text("AVAILABILITY_LOOKAHEAD_DAYS=10\n")
    env = clean_env(DATABASE_URL=CLOSED_PORT_URL, AVAILABILITY_CRON_LIMIT="50")

    result = run_cli("config", "--concurrency", "7", env=env, cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    entries = config_entries(result)
    assert list(entries) == [spec.env for spec in SPECS]
    assert entries["AVAILABILITY_CRON_CONCURRENCY"] == {
        "name": "AVAILABILITY_CRON_CONCURRENCY", "flag": "--concurrency", "value": 7,
        "source": "flag"}
    assert entries["AVAILABILITY_CRON_LIMIT"]["value"] == 50
    assert entries["AVAILABILITY_CRON_LIMIT"]["source"] == "environment"
    assert entries["AVAILABILITY_LOOKAHEAD_DAYS"]["value"] == 10
    assert entries["AVAILABILITY_LOOKAHEAD_DAYS"]["source"] == ".env"
    assert entries["AVAILABILITY_CRON_TIME_BUDGET_MS"]["value"] == 45000
    assert entries["AVAILABILITY_CRON_TIME_BUDGET_MS"]["source"] == "default"
    assert entries["AVAILABILITY_CRON_PING_URL"]["value"] is None
    assert result.json()["envFile"] == str(tmp_path / ".env")


@pytest.mark.e2e
def test_config_shows_the_lock_name_and_its_derived_64_bit_key():
    result = run_cli("config", "--lock-name", "nightly", env=clean_env())

    assert result.returncode == 0, result.stderr
    assert result.json()["lock"]["name"] == "nightly"
    assert result.json()["lock"]["key"] == lock.lock_key("nightly")


@pytest.mark.e2e
@pytest.mark.parametrize("output", ["json", "table"])
def test_config_never_prints_a_password_or_the_ping_url(output):
    env = clean_env(
        DATABASE_URL=CLOSED_PORT_URL,
        AVAILABILITY_CRON_LOCK_DATABASE_URL=(
            f"host=127.0.0.1 port=1 user=locker password={LOCK_DB_PASSWORD} dbname=db"),
        AVAILABILITY_CRON_PING_URL=PING_URL, ACME_TOKEN=ENV_TOKEN, COLUMNS="200",
    )

    result = run_cli("config", "--format", output, env=env)

    assert result.returncode == 0, result.stderr
    assert_no_secret(result)
    assert "hc-ping.example" in result.stdout
    assert "127.0.0.1:1" in result.stdout


@pytest.mark.e2e
def test_config_redacts_the_urls_but_keeps_where_they_point():
    env = clean_env(DATABASE_URL=CLOSED_PORT_URL, AVAILABILITY_CRON_PING_URL=PING_URL)

    result = run_cli("config", env=env)

    entries = config_entries(result)
    assert entries["DATABASE_URL"]["value"] == "postgresql://user:***@127.0.0.1:1/db"
    assert entries["AVAILABILITY_CRON_PING_URL"]["value"] == "https://hc-ping.example/***"
    assert result.json()["lock"]["databaseUrl"] == "postgresql://user:***@127.0.0.1:1/db"
    assert result.json()["lock"]["databaseUrlFrom"] == "DATABASE_URL"


@pytest.mark.e2e
@pytest.mark.parametrize("output", ["json", "table"])
def test_config_hides_a_password_under_a_percent_encoded_key(output):
    # libpq reads pass%77ord as password.
    url = f"postgresql://user@127.0.0.1:1/db?pass%77ord={DB_PASSWORD}"

    result = run_cli("config", "--format", output, env=clean_env(DATABASE_URL=url,
                                                                  COLUMNS="200"))

    assert result.returncode == 0, result.stderr
    assert_no_secret(result)
    assert "postgresql://user@127.0.0.1:1/db?pass%77ord=***" in result.stdout


#: Passwords that once corrupted `config`: each is a word of its output, or text in it.
AWKWARD_PASSWORDS = {
    "null": "postgresql://user:null@127.0.0.1:1/db",
    "Str0ng:7500": "postgresql://user:Str0ng:7500@127.0.0.1:1/db",
    "my source": "postgresql://user:my%20source@127.0.0.1:1/db",
}


@pytest.mark.e2e
@pytest.mark.parametrize("password", list(AWKWARD_PASSWORDS))
def test_config_json_stays_intact_whatever_the_password(password, tmp_path):
    result = run_cli("config", "--format", "json", cwd=tmp_path,
                     env=clean_env(DATABASE_URL=AWKWARD_PASSWORDS[password]))

    assert result.returncode == 0, result.stderr
    report = result.json()  # valid JSON, and only one line of it
    assert report["envFile"] is None
    entries = config_entries(result)
    assert entries["DATABASE_URL"]["value"] == "postgresql://user:***@127.0.0.1:1/db"
    assert entries["AVAILABILITY_CRON_DEADLINE_MARGIN_MS"]["value"] == 7500
    assert all(set(entry) == {"name", "flag", "value", "source"} for entry in entries.values())
    assert report["lock"]["databaseUrl"] == "postgresql://user:***@127.0.0.1:1/db"


@pytest.mark.e2e
@pytest.mark.parametrize("password", list(AWKWARD_PASSWORDS))
def test_config_table_is_printed_whatever_the_password(password, tmp_path):
    result = run_cli("config", "--format", "table", cwd=tmp_path,
                     env=clean_env(DATABASE_URL=AWKWARD_PASSWORDS[password], COLUMNS="200"))

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "postgresql://user:***@127.0.0.1:1/db" in result.stdout
    assert "AVAILABILITY_CRON_DEADLINE_MARGIN_MS │ 7500" in result.stdout
    assert "env file: -" in result.stdout


@pytest.mark.e2e
def test_config_with_a_bad_setting_exits_2_naming_it():
    result = run_cli("config", env=clean_env(AVAILABILITY_CRON_CONCURRENCY="lots"))

    assert result.returncode == 2
    assert result.stdout == ""
    assert "AVAILABILITY_CRON_CONCURRENCY" in result.stderr


@pytest.mark.e2e
@pytest.mark.parametrize(("command", "codes"), [
    ("show", "Exit codes: 0 shown; 1 real failure"),
    ("config", "Exit codes: 0 shown; 2 a setting is invalid"),
])
def test_help_of_show_and_config_documents_their_exit_codes(command, codes):
    result = run_cli(command, "--help", env=clean_env(COLUMNS="100"))

    assert result.returncode == 0, result.stderr
    assert codes in " ".join(result.stdout.split())


@pytest.mark.e2e
def test_show_never_prints_a_private_feed_path_or_a_key_in_a_query(database_url, conn):
    private = "private-4f9a8c2e0b1d4e6f8a7c9b3d2e1f0a5b"
    add_workspace(conn, "gcal", provider="ics", config={
        "url": f"https://calendar.google.com/calendar/ical/alice%40example.com/{private}/basic.ics",
        "timezone": "UTC"})
    add_workspace(conn, "inhouse", provider="http", config={
        "url": "https://cal.internal/slots?api_key=sk_live_abcdef123456",
        "access_key": "AKIAEXAMPLEKEY"})

    gcal = run_cli("show", "gcal", env=clean_env(DATABASE_URL=database_url))
    inhouse = run_cli("show", "inhouse", env=clean_env(DATABASE_URL=database_url))

    assert gcal.returncode == 0 and inhouse.returncode == 0
    assert private not in gcal.stdout + gcal.stderr
    assert gcal.json()["source"]["providerConfig"]["url"] == "https://calendar.google.com/***"
    for secret in ("sk_live_abcdef123456", "AKIAEXAMPLEKEY"):
        assert secret not in inhouse.stdout + inhouse.stderr

