"""Shared fixtures: a real PostgreSQL, a fresh database per test, small row factories.

The server is the one named by AVAILABILITY_CRON_TEST_DATABASE_URL when set (any
database on it; tests create their own), else an embedded one started once for the
session from the `pgserver` package. The schema is migrated once into a template
database; each test gets ``CREATE DATABASE ... TEMPLATE`` of it (a few ms).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from availability_cron import db

TEST_URL_ENV = "AVAILABILITY_CRON_TEST_DATABASE_URL"


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    """URL of a database on the test server (used as the admin connection)."""
    url = os.environ.get(TEST_URL_ENV)
    if url:
        yield url
        return
    from availability_cron.demo import embedded_postgres

    with embedded_postgres() as embedded:
        yield embedded


def _url_for(server: str, dbname: str) -> str:
    return psycopg.conninfo.make_conninfo(server, dbname=dbname)


def _create_database(server: str, name: str, template: str | None = None) -> None:
    with psycopg.connect(server, autocommit=True) as admin:
        if template:
            admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(template)))
        else:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def _drop_database(server: str, name: str) -> None:
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(name)))


@pytest.fixture(scope="session")
def template_name(server_url: str) -> Iterator[str]:
    name = f"avc_tpl_{uuid.uuid4().hex[:10]}"
    _create_database(server_url, name)
    with psycopg.connect(_url_for(server_url, name), autocommit=True) as conn:
        db.migrate(conn)
    yield name
    _drop_database(server_url, name)


@pytest.fixture
def database_url(server_url: str, template_name: str) -> Iterator[str]:
    """A fresh, migrated database for this test only."""
    name = f"avc_t_{uuid.uuid4().hex[:12]}"
    _create_database(server_url, name, template=template_name)
    yield _url_for(server_url, name)
    _drop_database(server_url, name)


@pytest.fixture
def empty_database_url(server_url: str) -> Iterator[str]:
    """A fresh database with no schema at all."""
    name = f"avc_e_{uuid.uuid4().hex[:12]}"
    _create_database(server_url, name)
    yield _url_for(server_url, name)
    _drop_database(server_url, name)


@pytest.fixture
def conn(database_url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(database_url, autocommit=True) as connection:
        yield connection


_DB_FIXTURES = {"server_url", "template_name", "database_url", "empty_database_url", "conn"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses a database fixture `db`, so CI can re-run just those."""
    for item in items:
        if _DB_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.db)


from httpserver import http_server  # noqa: E402, F401  (the loopback HTTP server fixture)
