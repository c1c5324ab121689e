"""Pieces shared by the provider contract tests (tests/test_provider_*.py)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pytest
from helpers import make_runtime, make_settings

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
        with pytest.raises((PermanentProviderError, RetryableProviderError)) as info:
            provider.fetch(request())
        messages.append(str(info.value))
    return messages


def run(database_url: str, environ: Mapping[str, str] | None = None,
        **settings: Any) -> refresh.RunSummary:
    """One in-process run, one worker by default so request order is deterministic."""
    settings.setdefault("concurrency", 1)
    return refresh.run_refresh(make_settings(database_url, **settings),
                               make_runtime(database_url, environ=environ),
                               default_source=SOURCE)
