"""Pieces shared by the provider contract tests (tests/test_provider_*.py)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pytest
from helpers import make_runtime, make_settings, refreshing, scopes_for
from httpserver import LocalServer

from availability_cron import refresh
from availability_cron.providers import (
    FetchRequest,
    PermanentProviderError,
    Provider,
    RetryableProviderError,
)

SOURCE = "availability_workspaces"


def error_messages(
    provider: Provider, request: Callable[[], FetchRequest], times: int
) -> list[str]:
    """Call ``provider`` ``times`` times, each expected to fail; return the messages."""
    messages = []
    for _ in range(times):
        req = request()
        with pytest.raises((PermanentProviderError, RetryableProviderError)) as info, \
                refreshing(req.workspace_id, provider.context):
            provider.fetch(req)
        messages.append(str(info.value))
    return messages


def run(database_url: str, environ: Mapping[str, str] | None = None, *,
        server: LocalServer | None = None, **settings: Any) -> refresh.RunSummary:
    """One in-process run, one worker by default so request order is deterministic.

    With ``server``, the operator lets every workspace send the variables of ``environ``
    to that loopback server (AVAILABILITY_CRON_SECRET_SCOPES)."""
    settings.setdefault("concurrency", 1)
    scopes = scopes_for(server.url(), *(environ or {})) if server else None
    return refresh.run_refresh(make_settings(database_url, **settings),
                               make_runtime(database_url, environ=environ,
                                            secret_scopes=scopes),
                               default_source=SOURCE)
