"""Redaction: which text of a connection string is its password, as libpq reads it, and how
that text is kept out of what the job prints, logs and stores."""

from __future__ import annotations

import pytest

from availability_cron.redact import redact_url, scrub, url_secrets

# --- the password is what libpq reads ----------------------------------------------------------


@pytest.mark.parametrize("key", ["pass%77ord", "%70assword", "p%61ssw%6Frd", "pass%77%6Frd"])
def test_a_password_under_a_percent_encoded_key_is_the_password(key):
    url = f"postgresql://app@db/app?sslmode=disable&{key}=s3cret-4f2a"

    assert "s3cret-4f2a" in url_secrets(url)
    assert redact_url(url) == f"postgresql://app@db/app?sslmode=disable&{key}=***"


def test_a_percent_encoded_password_is_secret_as_written_and_as_decoded():
    assert sorted(url_secrets("postgresql://app:pa%40ss-7e@db/app")) == ["pa%40ss-7e", "pa@ss-7e"]
    assert sorted(url_secrets("postgresql://db/app?password=%73ecret-9")) == [
        "%73ecret-9", "secret-9"]


def test_the_ssl_key_password_is_a_secret_too():
    url = "postgresql://app@db/app?sslpassword=key-pass-31"

    assert url_secrets(url) == ["key-pass-31"]
    assert redact_url(url) == "postgresql://app@db/app?sslpassword=***"
    assert redact_url("host=db sslpassword=key-pass-31") == "host=db sslpassword=***"


@pytest.mark.parametrize(("conninfo", "password"), [
    (r"host=db password=a\ b-c user=app", "a b-c"),
    (r"host=db password='it\'s here' user=app", "it's here"),
    ("host=db password= 'x y z' user=app", "x y z"),
])
def test_a_key_value_password_is_read_as_libpq_reads_it(conninfo, password):
    assert password in url_secrets(conninfo)
    assert password not in redact_url(conninfo)
    assert redact_url(conninfo).endswith(" user=app")


# --- the whole password, not its fragments -----------------------------------------------------


@pytest.mark.parametrize(("url", "expected"), [
    ("postgresql://app:Str0ng:7500@db/app", ["Str0ng:7500"]),
    ("postgresql://app:my%20source@db/app", ["my%20source", "my source"]),
    ("postgresql://app:null@db/app", ["null"]),
    ("host=db password='my source'", ["'my source'", "my source"]),
])
def test_the_secret_is_the_whole_password_in_the_forms_it_is_written(url, expected):
    assert url_secrets(url) == expected


def test_a_short_password_inside_a_longer_word_is_not_replaced():
    message = 'connection failed: FATAL:  password authentication failed for user "app"'

    assert scrub(message, url_secrets("postgresql://app:word@db/app")) == message
    assert scrub("login word failed", ["word"]) == "login *** failed"
    assert scrub('password "word" (word)', ["word"]) == 'password "***" (***)'


def test_a_long_secret_is_replaced_wherever_it_occurs():
    # Eight characters or more cannot sit in a longer word by chance: that is a leak.
    assert scrub("xtok-1234567890y", ["tok-1234567890"]) == "x***y"


def test_a_password_is_not_replaced_by_its_pieces():
    message = "AVAILABILITY_CRON_DEADLINE_MARGIN_MS 7500; source table x"

    assert scrub(message, url_secrets("postgresql://app:Str0ng:7500@db/app")) == message
    assert scrub(message, url_secrets("postgresql://app:my%20source@db/app")) == message


def test_an_at_sign_in_the_query_does_not_move_where_the_password_is():
    url = "postgresql://app:pw-1@db?user=me@corp&password=q-secret-2"

    assert redact_url(url) == "postgresql://app:***@db?user=me@corp&password=***"
    assert "q-secret-2" in url_secrets(url)


def test_an_unencoded_at_sign_in_the_password_hides_the_whole_password():
    assert redact_url("postgresql://app:p@ss-3@db/app") == "postgresql://app:***@db/app"
    assert "p@ss-3" in url_secrets("postgresql://app:p@ss-3@db/app")


# --- what cannot be parsed, or would be misread ------------------------------------------------


@pytest.mark.parametrize("url", [
    "postgresql://app:p/ss-4@db/app",  # libpq: host app, port p, database ss-4@db/app
    "postgresql://db?password=pw-5@host",  # libpq: user db?password=pw-5, host host
])
def test_a_url_libpq_would_misread_is_shown_without_anything_after_its_scheme(url):
    assert redact_url(url) == "postgresql://***"



def test_a_url_libpq_cannot_parse_is_shown_without_anything_after_its_scheme():
    assert redact_url("postgresql://app:pa%zzss@db/app") == "postgresql://***"
    assert redact_url("host=db password=my secret") == "***"
