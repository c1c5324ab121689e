"""The provider interface: what every calendar provider, built-in or plugin, implements.

A provider is a class registered under the entry-point group
``availability_cron.providers``. The refresh job instantiates each provider it needs
once per run with a :class:`ProviderContext`, calls :meth:`Provider.validate_config`
and then :meth:`Provider.fetch` for each workspace, from worker threads (so ``fetch``
must be thread-safe). ``fetch`` returns the free slot *start instants* inside the
request window, as timezone-aware datetimes; the refresh job sorts, de-duplicates,
converts to UTC and checks them before anything is written.

Errors: raise :class:`RetryableProviderError` for what may work next time (HTTP 429
and 5xx, timeouts, connection errors; give ``retry_after`` seconds when the
provider says how long to wait) and :class:`PermanentProviderError` for what will
not (bad config, 401/403/404, an error inside a 200). Any other exception is
recorded as a per-workspace error too; it never stops the run. Messages are stored
in ``last_error``: never put a token or a full URL with credentials in them.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar

from ._http import HttpSession
from ._memory import MemoryBudget
from .errors import PermanentProviderError, ProviderError, RetryableProviderError
from .scopes import Destinations, SecretScopes

__all__ = ["FetchRequest", "PermanentProviderError", "Provider", "ProviderContext",
           "ProviderError", "RetryableProviderError"]


def _new_http_session() -> HttpSession:
    from .. import __version__

    return HttpSession(user_agent=f"availability-cron/{__version__} (calendar availability cache)")


@dataclass(frozen=True)
class ProviderContext:
    """What a provider may use besides the request: shared for the whole run."""

    #: Environment for secrets named in provider_config (e.g. ``token_env``).
    environ: Mapping[str, str] = field(default_factory=dict)
    #: Monotonic clock, injectable for tests.
    monotonic: Callable[[], float] = time.monotonic
    #: The run's shared HTTP client and rate-limit gate (httpx loads on first use).
    http: HttpSession = field(default_factory=lambda: _new_http_session())
    #: The operator's rules for which workspace may name which variable, and where its
    #: value may be sent (the built-in rules when not given; see ``scopes``).
    secret_scopes: SecretScopes = field(default_factory=SecretScopes)
    #: The run's budget for expensive parses (an iCalendar feed): one for all workers.
    memory: MemoryBudget = field(default_factory=MemoryBudget)
    #: ``secret_scopes`` bound to ``environ``: computed once, here.
    destinations: Destinations = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "destinations", self.secret_scopes.bind(self.environ))
        self.http.protect(self.destinations)


@dataclass(frozen=True)
class FetchRequest:
    """One workspace's refresh: who, with which config, for which window, by when."""

    workspace_id: str
    config: Mapping[str, Any]
    window_start: datetime
    window_end: datetime
    #: time.monotonic() value by which the call must have returned.
    deadline: float
    monotonic: Callable[[], float] = time.monotonic

    def time_left(self) -> float:
        """Seconds until the deadline (never negative); use it as the call's timeout."""
        return max(0.0, self.deadline - self.monotonic())


class Provider(abc.ABC):
    """Base class of calendar providers."""

    #: The name workspaces use in ``availability_workspaces.provider``.
    name: ClassVar[str]

    def __init__(self, context: ProviderContext) -> None:
        self.context = context

    def validate_config(self, config: Mapping[str, Any]) -> None:  # noqa: B027
        """Raise PermanentProviderError naming the key if ``config`` is unusable."""

    @abc.abstractmethod
    def fetch(self, request: FetchRequest) -> Iterable[datetime]:
        """Return the free slot start instants (timezone-aware) inside the window."""

    def close(self) -> None:  # noqa: B027
        """Release what the provider holds for the run (called once at the end)."""
