"""The providers' errors: retryable or permanent, one home for both.

Kept apart from :mod:`.base` so that the HTTP layer, the answer readers and the secret
scopes, which :mod:`.base` builds on, can raise them without importing it (no cycle).
Import them from :mod:`availability_cron.providers`.
"""

from __future__ import annotations

from ..errors import AvailabilityCronError


class ProviderError(AvailabilityCronError):
    """The calendar provider call failed."""


class RetryableProviderError(ProviderError):
    """The provider failed in a way that may succeed later (rate limit, 5xx, timeout)."""

    def __init__(
        self,
        message: str | None = None,
        *,
        retry_after: float | None = None,
        rate_limited: bool = False,
    ) -> None:
        super().__init__(message)
        #: Seconds the provider asked us to wait before the next attempt, if it said.
        self.retry_after = retry_after
        #: The provider refused for rate limiting: do not retry within this run.
        self.rate_limited = rate_limited


class PermanentProviderError(ProviderError):
    """The provider failed in a way that will not fix itself (config, auth, not found)."""
