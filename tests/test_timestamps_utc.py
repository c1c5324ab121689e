"""Every timestamp the tool prints is UTC with ``Z``, whatever the session's TimeZone.

initdb copies the OS zone into the server's TimeZone, and libpq takes PGTZ: a session in
Europe/Berlin hands back instants with +01:00. The installed command, as cron runs it,
against a real run holding the lock.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import test_lock
from helpers import add_cache, add_run, add_workspace, clean_env, run_cli
from test_operate_lock import REFRESH_KEY, holding_env, wait_for_holder

#: The installed command in the background, killed at teardown (test_lock's fixture).
spawn = test_lock.spawn

ISO = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}")


def timestamps(value: Any) -> list[str]:
    """Every string in a JSON document that reads as an ISO-8601 date-time."""
    if isinstance(value, dict):
        return [t for v in value.values() for t in timestamps(v)]
    if isinstance(value, list):
        return [t for v in value for t in timestamps(v)]
    return [value] if isinstance(value, str) and ISO.match(value) else []


@pytest.mark.e2e
def test_every_timestamp_printed_is_utc_with_z_in_a_berlin_session(database_url, conn, spawn):
    now = datetime.now(UTC)
    add_workspace(conn, "ws-fresh")
    add_cache(conn, "ws-fresh", refreshed_at=now - timedelta(minutes=2),
              stale_at=now - timedelta(minutes=1), slots=[])
    add_run(conn, started_at=now - timedelta(minutes=3), refreshed=1)
    add_workspace(conn, "ws-slow", config={"latency_ms": 6000})
    proc = spawn("refresh", env=holding_env(database_url))
    wait_for_holder(conn, REFRESH_KEY, proc)
    berlin = clean_env(DATABASE_URL=database_url, PGTZ="Europe/Berlin")

    printed: dict[str, Any] = {}
    for args in (("refresh",), ("refresh", "--dry-run"), ("lock", "status"), ("metrics",),
                 ("show", "ws-fresh")):
        result = run_cli(*args, "--format", "json", env=berlin)
        assert result.returncode == 0, (args, result.stderr)
        printed[" ".join(args)] = result.json()

    found = {name: timestamps(doc) for name, doc in printed.items()}
    assert all(found.values()), found  # every command printed some
    not_utc = {name: [t for t in ts if not t.endswith("Z")] for name, ts in found.items()}
    assert not any(not_utc.values()), not_utc
