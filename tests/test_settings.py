"""Settings: precedence, validation messages, .env files, redaction and the lock key."""

from __future__ import annotations

import hashlib
import os

import pytest

from availability_cron import lock, settings
from availability_cron.errors import ConfigError
from availability_cron.settings import SPECS, load_settings, read_env_file, redact_url, scrub

CONCURRENCY = "AVAILABILITY_CRON_CONCURRENCY"
BUDGET = "AVAILABILITY_CRON_TIME_BUDGET_MS"
MARGIN = "AVAILABILITY_CRON_DEADLINE_MARGIN_MS"
TTL = "AVAILABILITY_CACHE_TTL_MS"
MAX_BACKOFF = "AVAILABILITY_CRON_MAX_BACKOFF_MS"
SOURCE = "AVAILABILITY_CRON_SOURCE_TABLE"


def load(flags=None, environ=None, dotenv=None) -> settings.Settings:
    return load_settings(flags or {}, environ or {}, dotenv or {})


# --- precedence -----------------------------------------------------------------------------


def test_defaults_apply_when_nothing_is_set():
    s = load()
    assert (s.time_budget_ms, s.deadline_margin_ms, s.concurrency) == (45000, 7500, 5)
    assert (s.cache_ttl_ms, s.limit, s.lookahead_days) == (60000, 500, 30)
    assert (s.missing_reserve, s.max_backoff_ms) == (0.2, 1_800_000)
    assert (s.lock_name, s.source_table, s.log_level) == (
        "refresh", "availability_workspaces", "INFO"
    )
    assert s.database_url is None
    assert set(s.sources.values()) == {"default"}
    assert set(s.sources) == {spec.field for spec in SPECS}


def test_a_flag_beats_the_environment_which_beats_dotenv_which_beats_the_default():
    s = load(
        flags={"concurrency": 9, "limit": None},
        environ={CONCURRENCY: "8", "AVAILABILITY_CRON_LIMIT": "40",
                 "AVAILABILITY_LOOKAHEAD_DAYS": "10"},
        dotenv={CONCURRENCY: "7", "AVAILABILITY_CRON_LIMIT": "30",
                "AVAILABILITY_LOOKAHEAD_DAYS": "20", "AVAILABILITY_CRON_LOG_LEVEL": "debug"},
    )
    assert (s.concurrency, s.sources["concurrency"]) == (9, "flag")
    assert (s.limit, s.sources["limit"]) == (40, "environment")
    assert (s.lookahead_days, s.sources["lookahead_days"]) == (10, "environment")
    assert (s.log_level, s.sources["log_level"]) == ("DEBUG", ".env")
    assert (s.time_budget_ms, s.sources["time_budget_ms"]) == (45000, "default")


def test_dotenv_applies_when_the_environment_does_not_set_a_value():
    s = load(dotenv={CONCURRENCY: "7"})
    assert (s.concurrency, s.sources["concurrency"]) == (7, ".env")


@pytest.mark.parametrize("blank", ["", "   "])
def test_an_empty_environment_value_counts_as_unset(blank):
    assert load(environ={CONCURRENCY: blank}, dotenv={CONCURRENCY: "7"}).concurrency == 7
    s = load(environ={CONCURRENCY: blank}, dotenv={CONCURRENCY: blank})
    assert (s.concurrency, s.sources["concurrency"]) == (5, "default")


def test_an_empty_flag_is_an_error_naming_the_flag():
    with pytest.raises(ConfigError, match="--concurrency"):
        load(flags={"concurrency": ""})


def test_the_database_url_password_is_a_secret():
    assert load(environ={"DATABASE_URL": "postgresql://app:s3cret@db/app"}).secrets() == [
        "s3cret"
    ]
    assert load(environ={"DATABASE_URL": "host=db password=s3cret user=app"}).secrets() == [
        "s3cret"
    ]
    assert load(environ={"DATABASE_URL": "postgresql://app@db/app"}).secrets() == []


def test_every_password_libpq_reads_is_a_secret_of_the_settings():
    # The secrets feed the log filter, every error message and the stored errors.
    s = load(environ={
        "DATABASE_URL": "postgresql://app@db/app?pass%77ord=enc-key-pw",
        "AVAILABILITY_CRON_LOCK_DATABASE_URL": "host=db sslpassword='ssl key pw' user=app",
    })
    assert s.secrets() == ["'ssl key pw'", "enc-key-pw", "ssl key pw"]


def test_a_missing_database_url_is_reported_only_when_required():
    s = load()
    with pytest.raises(ConfigError, match="DATABASE_URL is not set"):
        s.require_database_url()


# --- validation -----------------------------------------------------------------------------

#: A value just outside the range of each numeric setting (mirrors the documented ranges).
OUT_OF_RANGE = {
    "AVAILABILITY_CRON_TIME_BUDGET_MS": ["999", "3600001"],
    "AVAILABILITY_CRON_DEADLINE_MARGIN_MS": ["3600001"],
    "AVAILABILITY_CRON_CONCURRENCY": ["0", "257"],
    "AVAILABILITY_CACHE_TTL_MS": ["999", "86400001"],
    "AVAILABILITY_CRON_LIMIT": ["1000001"],
    "AVAILABILITY_LOOKAHEAD_DAYS": ["0", "367"],
    "AVAILABILITY_CRON_MISSING_RESERVE": ["1.01", "nan", "inf"],
    "AVAILABILITY_CRON_MAX_BACKOFF_MS": ["999", str(7 * 86_400_000 + 1)],
    "AVAILABILITY_CRON_RUN_RETENTION_DAYS": ["0", "367"],
}
NUMERIC_SPECS = [s for s in SPECS if s.default is not None and s.default.replace(".", "").isdigit()]
BAD_NUMBERS = [
    pytest.param(spec.env, raw, id=f"{spec.env}={raw}")
    for spec in NUMERIC_SPECS
    for raw in ["abc", "-1", "1.5", *OUT_OF_RANGE.get(spec.env, [])]
]


def test_every_numeric_setting_has_out_of_range_cases():
    assert {spec.env for spec in NUMERIC_SPECS} == set(OUT_OF_RANGE)


@pytest.mark.parametrize(("env", "raw"), BAD_NUMBERS)
def test_a_bad_numeric_value_is_an_error_naming_the_variable(env, raw):
    with pytest.raises(ConfigError) as excinfo:
        load(environ={env: raw})
    assert env in excinfo.value.message
    assert repr(raw) in excinfo.value.message


@pytest.mark.parametrize("spec", NUMERIC_SPECS, ids=lambda s: s.env)
def test_a_bad_dotenv_value_is_an_error_naming_the_variable(spec):
    with pytest.raises(ConfigError, match=spec.env):
        load(dotenv={spec.env: "abc"})


def test_an_integer_setting_message_gives_the_range():
    with pytest.raises(ConfigError) as excinfo:
        load(environ={CONCURRENCY: "abc"})
    assert excinfo.value.message == (
        "AVAILABILITY_CRON_CONCURRENCY must be an integer from 1 to 256, got 'abc'"
    )


@pytest.mark.parametrize("spec", [s for s in SPECS if s.flag], ids=lambda s: s.field)
def test_a_bad_flag_value_names_both_the_flag_and_the_variable(spec):
    bad = "x" * 201 if spec.field == "lock_name" else "a.b.c;"
    with pytest.raises(ConfigError) as excinfo:
        load(flags={spec.field: bad})
    assert f"{spec.flag} ({spec.env})" in excinfo.value.message


@pytest.mark.parametrize("raw", ["５", "٣", "1__0", "_5", "5_", "1_0_", "0x10", "1e3"])
def test_an_integer_setting_takes_ascii_digits_and_single_underscores_between_them_only(raw):
    with pytest.raises(ConfigError) as excinfo:
        load(environ={CONCURRENCY: raw})
    assert excinfo.value.message == (
        f"AVAILABILITY_CRON_CONCURRENCY must be an integer from 1 to 256, got {raw!r}"
    )


@pytest.mark.parametrize(("raw", "expected"), [("1_0", 10), (" 12 ", 12), ("+7", 7)])
def test_an_integer_setting_accepts_digit_groups_a_sign_and_surrounding_space(raw, expected):
    assert load(environ={CONCURRENCY: raw}).concurrency == expected


@pytest.mark.parametrize("raw", ["٠.٥", "０.５", "0__.5", "0._5", "1_0e-1", "0x0"])
def test_a_fraction_setting_takes_ascii_digits_only(raw):
    with pytest.raises(ConfigError, match="AVAILABILITY_CRON_MISSING_RESERVE must be a number"):
        load(environ={"AVAILABILITY_CRON_MISSING_RESERVE": raw})


@pytest.mark.parametrize("raw", ["-0", "-0.0", "-0e3"])
def test_a_negative_zero_fraction_is_zero(raw):
    value = load(environ={"AVAILABILITY_CRON_MISSING_RESERVE": raw}).missing_reserve
    assert (value, str(value)) == (0.0, "0.0")


def test_a_bad_flag_value_wins_over_a_good_environment_value():
    with pytest.raises(ConfigError, match=r"--concurrency \(AVAILABILITY_CRON_CONCURRENCY\)"):
        load(flags={"concurrency": 0}, environ={CONCURRENCY: "5"})


@pytest.mark.parametrize(("budget", "margin"), [("5000", "5000"), ("5000", "6000")])
def test_a_margin_not_below_the_budget_is_rejected_naming_both(budget, margin):
    with pytest.raises(ConfigError) as excinfo:
        load(environ={BUDGET: budget, MARGIN: margin})
    assert BUDGET in excinfo.value.message and MARGIN in excinfo.value.message


def test_a_margin_just_below_the_budget_is_accepted():
    s = load(environ={BUDGET: "5000", MARGIN: "4999"})
    assert (s.time_budget_ms, s.deadline_margin_ms) == (5000, 4999)


def test_a_max_backoff_below_the_ttl_is_rejected_naming_both():
    with pytest.raises(ConfigError) as excinfo:
        load(environ={TTL: "120000", MAX_BACKOFF: "60000"})
    assert TTL in excinfo.value.message and MAX_BACKOFF in excinfo.value.message
    assert load(environ={TTL: "120000", MAX_BACKOFF: "120000"}).max_backoff_ms == 120000


@pytest.mark.parametrize("name", ["a.b.c", "x;drop", "", "bad name", "1table", "app.", ".t"])
def test_a_bad_source_table_flag_is_rejected(name):
    with pytest.raises(ConfigError, match=r"--source-table \(AVAILABILITY_CRON_SOURCE_TABLE\)"):
        load(flags={"source_table": name})


@pytest.mark.parametrize("name", ["a.b.c", "x;drop", 'x"; DROP TABLE t; --'])
def test_a_bad_source_table_variable_is_rejected(name):
    with pytest.raises(ConfigError, match=SOURCE):
        load(environ={SOURCE: name})


@pytest.mark.parametrize("name", ["availability_workspaces", "app.availability_workspaces",
                                  "_v$2"])
def test_a_plain_or_schema_qualified_source_table_is_accepted(name):
    assert load(environ={SOURCE: name}).source_table == name


@pytest.mark.parametrize(
    "url",
    [
        "mysql://app:pw-9f8e7d@db:3306/app",
        "http://app:pw-9f8e7d@db/app",
        "app:pw-9f8e7d@db:5432/app",  # the scheme forgotten
    ],
)
def test_a_garbage_database_url_is_rejected_without_echoing_its_password(url):
    with pytest.raises(ConfigError) as excinfo:
        load(environ={"DATABASE_URL": url})
    assert "DATABASE_URL" in excinfo.value.message
    assert "pw-9f8e7d" not in excinfo.value.message


@pytest.mark.parametrize("url", ["postgresql://app@db/app", "postgres://db/app",
                                 "host=db dbname=app"])
def test_postgresql_urls_and_key_value_strings_are_accepted(url):
    assert load(environ={"DATABASE_URL": url}).database_url == url


@pytest.mark.parametrize(("raw", "expected"), [("debug", "DEBUG"), (" Warning ", "WARNING")])
def test_the_log_level_is_case_insensitive(raw, expected):
    assert load(environ={"AVAILABILITY_CRON_LOG_LEVEL": raw}).log_level == expected


def test_an_unknown_log_level_is_rejected():
    with pytest.raises(ConfigError, match="AVAILABILITY_CRON_LOG_LEVEL"):
        load(environ={"AVAILABILITY_CRON_LOG_LEVEL": "verbose"})


def test_a_lock_name_over_200_characters_is_rejected():
    with pytest.raises(ConfigError, match="AVAILABILITY_CRON_LOCK_NAME"):
        load(environ={"AVAILABILITY_CRON_LOCK_NAME": "x" * 201})


# --- .env files -----------------------------------------------------------------------------


def test_an_env_file_that_does_not_exist_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="--env-file"):
        read_env_file(tmp_path / "nope.env", cwd=tmp_path)


def test_an_env_file_that_is_a_directory_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="--env-file"):
        read_env_file(tmp_path, cwd=tmp_path)


def test_without_env_file_a_missing_dot_env_is_fine(tmp_path):
    assert read_env_file(None, cwd=tmp_path) == {}


def test_the_dot_env_in_the_working_directory_is_read_without_touching_the_environment(tmp_path):
    (tmp_path / ".env").write_text(
        "AVAILABILITY_CRON_CONCURRENCY=7\n"
        "AVAILABILITY_CRON_LIMIT=\n"
        "# a comment\n"
        "AVC_TEST_ONLY_IN_FILE='quoted value'\n"
    )
    values = read_env_file(None, cwd=tmp_path)
    assert values == {
        "AVAILABILITY_CRON_CONCURRENCY": "7",
        "AVAILABILITY_CRON_LIMIT": "",
        "AVC_TEST_ONLY_IN_FILE": "quoted value",
    }
    assert "AVC_TEST_ONLY_IN_FILE" not in os.environ
    s = load(dotenv=values)
    assert (s.concurrency, s.sources["concurrency"]) == (7, ".env")
    assert (s.limit, s.sources["limit"]) == (500, "default")  # the blank line falls through


def test_an_explicit_env_file_is_read_instead_of_the_dot_env(tmp_path):
    (tmp_path / ".env").write_text("AVAILABILITY_CRON_CONCURRENCY=7\n")
    other = tmp_path / "prod.env"
    other.write_text("AVAILABILITY_CRON_CONCURRENCY=11\n")
    assert read_env_file(other, cwd=tmp_path) == {"AVAILABILITY_CRON_CONCURRENCY": "11"}


def test_an_env_file_is_read_literally_without_variable_expansion(tmp_path, monkeypatch):
    # systemd's EnvironmentFile= (the README's setup) reads the same file without expanding
    # ${...}: a password with a $ must reach libpq as written, whichever way the job starts.
    monkeypatch.setenv("HOME", "/root")
    (tmp_path / ".env").write_text(
        "DATABASE_URL=postgresql://u:s3cr${et}word@db/app\n"
        "AVAILABILITY_CRON_LOCK_NAME=Pa${HOME}ss\n"
        "AVC_TEST_DOUBLE_QUOTED=\"a${HOME}b\"\n"
    )
    assert read_env_file(None, cwd=tmp_path) == {
        "DATABASE_URL": "postgresql://u:s3cr${et}word@db/app",
        "AVAILABILITY_CRON_LOCK_NAME": "Pa${HOME}ss",
        "AVC_TEST_DOUBLE_QUOTED": "a${HOME}b",
    }


def test_an_unparseable_env_file_line_is_a_config_error_naming_the_line_not_its_value(tmp_path):
    env_file = tmp_path / "prod.env"
    env_file.write_text(
        "AVAILABILITY_CRON_CONCURRENCY=7\n"
        "\n"
        "DATABASE_URL='postgresql://u:hunter2secret@db/app\n"  # the closing quote is missing
    )
    with pytest.raises(ConfigError) as excinfo:
        read_env_file(env_file, cwd=tmp_path)
    assert excinfo.value.message == (
        f"env file {str(env_file)!r} line 3 cannot be parsed (value not shown: it may hold a "
        "secret): write NAME=value, quoting a value with ' or \""
    )
    assert "hunter2" not in excinfo.value.message


# --- redaction ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://app:s3cret@db.example:5432/app",
         "postgresql://app:***@db.example:5432/app"),
        ("postgresql://app:p@ss@db/app", "postgresql://app:***@db/app"),
        ("postgresql://app@db/app", "postgresql://app@db/app"),
        ("postgresql://db/app?user=app&password=s3cret&sslmode=require",
         "postgresql://db/app?user=app&password=***&sslmode=require"),
        ("postgresql://app:s3cret@db/app?password=s3cret",
         "postgresql://app:***@db/app?password=***"),
        ("host=db user=app password=s3cret dbname=app",
         "host=db user=app password=*** dbname=app"),
        ("host=db password = s3cret", "host=db password = ***"),
        ("password='s3 cret' host=db", "password=*** host=db"),
        ("host=db dbname=app", "host=db dbname=app"),
    ],
)
def test_redact_url_hides_the_password(url, expected):
    assert redact_url(url) == expected


def test_scrub_replaces_every_occurrence_of_every_secret():
    assert scrub("a s3cret b s3cret c tok123", ["s3cret", "tok123", ""]) == "a *** b *** c ***"


def test_scrub_leaves_text_without_secrets_alone():
    assert scrub("nothing to hide", ["s3cret"]) == "nothing to hide"


# --- the lock key ---------------------------------------------------------------------------


def key_from_the_documented_formula(name: str) -> int:
    digest = hashlib.sha256(b"availability-cron:" + name.encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def test_the_default_lock_key_is_the_key_of_refresh():
    assert lock.lock_key("refresh") == lock.DEFAULT_LOCK_KEY
    assert load().lock_key == lock.DEFAULT_LOCK_KEY


def test_the_lock_key_follows_the_documented_formula():
    for name in ["refresh", "refresh-eu", "x", "é"]:
        assert lock.lock_key(name) == key_from_the_documented_formula(name)


def test_the_lock_key_is_stable_across_versions():
    # Computed once from the formula above; it must never change, or an old and a new
    # version of the job could run at the same time.
    assert key_from_the_documented_formula("refresh") == -436128588708006550
    assert lock.lock_key("refresh") == -436128588708006550


def test_the_lock_key_is_a_signed_64_bit_integer():
    for name in ["refresh", "a", "b", "availability", "z" * 200]:
        key = lock.lock_key(name)
        assert isinstance(key, int)
        assert -(2**63) <= key < 2**63


def test_different_lock_names_give_different_keys():
    keys = {lock.lock_key(name) for name in ["refresh", "refresh-eu", "Refresh", "refresh "]}
    assert len(keys) == 4
    assert load(environ={"AVAILABILITY_CRON_LOCK_NAME": "eu"}).lock_key != lock.DEFAULT_LOCK_KEY
