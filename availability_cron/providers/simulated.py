"""The ``simulated`` provider: deterministic fake availability for tests, demo and benchmarks.

provider_config keys:
  latency_ms     (int, default 0)      how long the call takes
  fail           (false or a message)  fail with this message (a retryable error)
  hang           (bool, default false) never return (to exercise the time budget)
  slots_per_day  (int, default 8)      slots per day, on the hour from 09:00 UTC
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any

from .base import (
    FetchRequest,
    PermanentProviderError,
    Provider,
    RetryableProviderError,
)

_KEYS = {"latency_ms", "fail", "hang", "slots_per_day"}


class SimulatedProvider(Provider):
    """``slots_per_day`` hourly slots a day from 09:00 UTC, after ``latency_ms``."""

    name = "simulated"

    def validate_config(self, config: Mapping[str, Any]) -> None:
        unknown = sorted(set(config) - _KEYS)
        if unknown:
            raise PermanentProviderError(
                f"simulated: unknown provider_config key {unknown[0]!r}; "
                f"allowed: {', '.join(sorted(_KEYS))}"
            )
        latency = config.get("latency_ms", 0)
        if not isinstance(latency, int) or isinstance(latency, bool) or latency < 0:
            raise PermanentProviderError(
                "simulated: provider_config.latency_ms must be a non-negative integer"
            )
        per_day = config.get("slots_per_day", 8)
        if not isinstance(per_day, int) or isinstance(per_day, bool) or not 0 <= per_day <= 24:
            raise PermanentProviderError(
                "simulated: provider_config.slots_per_day must be an integer from 0 to 24"
            )
        fail = config.get("fail", False)
        if not isinstance(fail, bool | str):
            raise PermanentProviderError(
                "simulated: provider_config.fail must be false or an error message"
            )
        if not isinstance(config.get("hang", False), bool):
            raise PermanentProviderError("simulated: provider_config.hang must be a boolean")

    def fetch(self, request: FetchRequest) -> Iterable[datetime]:
        config = request.config
        if config.get("hang"):
            threading.Event().wait()  # never set: a provider that never answers
        latency = config.get("latency_ms", 0) / 1000.0
        if latency:
            timeout = request.time_left()
            if latency > timeout:
                threading.Event().wait(timeout)
                raise RetryableProviderError(f"simulated: timed out after {timeout:.1f}s")
            threading.Event().wait(latency)
        fail = config.get("fail", False)
        if fail:
            raise RetryableProviderError(
                f"simulated: {fail if isinstance(fail, str) else 'failure'}"
            )
        per_day = config.get("slots_per_day", 8)
        return _slots(request.window_start, request.window_end, per_day)


@functools.lru_cache(maxsize=64)
def _slots(start: datetime, end: datetime, per_day: int) -> tuple[datetime, ...]:
    # Cached so an "instant" simulated provider costs next to nothing: benchmarks then
    # measure the job, not the fake. A window starts on the minute, so hits are the norm.
    return tuple(_generate(start, end, per_day))


def _generate(start: datetime, end: datetime, per_day: int) -> Iterable[datetime]:
    day = start.replace(hour=0, minute=0, second=0, microsecond=0)
    while day < end:
        for i in range(per_day):
            instant = day + timedelta(hours=(9 + i) % 24)
            if start <= instant < end:
                yield instant
        day += timedelta(days=1)
