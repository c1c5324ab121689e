"""An example availability-cron provider plugin: free blocks from a JSON endpoint.

The calendar answers ``GET <url>?from=<ISO UTC>&until=<ISO UTC>`` with free *blocks*::

    {"free": [{"from": "2026-12-01T09:00:00Z", "minutes": 90}, ...]}

and each block is cut into slots of ``slot_minutes`` (default 30) that fit in it whole:
the block above gives 09:00, 09:30 and 10:00.

provider_config keys:
  url           (required) the endpoint, http or https
  token         (string) sent as ``Authorization: Bearer <token>``
  token_env     (string) the environment variable holding the token (instead of token)
  slot_minutes  (int, 5 to 1440, default 30) the length of one bookable slot
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from availability_cron.providers import (
    ConfigReader,
    FetchRequest,
    PermanentProviderError,
    Provider,
    credential_key,
    path_of,
)

__all__ = ["ExampleProvider"]

KEYS = {"url", "token", "token_env", "slot_minutes"}
#: A free block longer than this is not availability, it is a bug on the other side.
MAX_BLOCK_MINUTES = 7 * 24 * 60


@dataclass(frozen=True)
class Config:
    url: str
    token: str | None
    slot: timedelta


class ExampleProvider(Provider):
    """Slots cut from the free blocks of ``GET <url>``."""

    name = "example"

    def validate_config(self, config: Mapping[str, Any]) -> None:
        self._config(config)

    def fetch(self, request: FetchRequest) -> Iterable[datetime]:
        config = self._config(request.config)
        headers = {"Authorization": f"Bearer {config.token}"} if config.token else {}
        # The shared client: pooled connections, a timeout bounded by the run's deadline,
        # a body size cap, retries for 5xx, and 429 -> RetryableProviderError(retry_after).
        body = self.context.http.get(
            request,
            config.url,
            what=f"example: GET {path_of(config.url)}",
            params={"from": _iso(request.window_start), "until": _iso(request.window_end)},
            headers=headers,
            gate_key=credential_key("example", config.url, config.token),
        )
        # Check the shape before returning: a bad answer fails here, with a message that
        # names the bad item. The slots themselves are generated lazily, so the job's cap
        # on slots per workspace also bounds the work a hostile answer can cause.
        return _slots(_blocks(body, config.slot), config.slot)

    def _config(self, config: Mapping[str, Any]) -> Config:
        reader = ConfigReader("example", config, self.context.environ)
        reader.only(KEYS)
        minutes = reader.integer("slot_minutes", default=30, lo=5, hi=24 * 60)
        return Config(reader.url("url"), reader.secret(required=False),
                      timedelta(minutes=minutes))


def _iso(instant: datetime) -> str:
    return instant.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _blocks(body: Any, slot: timedelta) -> list[tuple[datetime, datetime]]:
    """The first and last slot start of each free block; PermanentProviderError for a bad shape."""
    free = body.get("free") if isinstance(body, dict) else None
    if not isinstance(free, list):
        raise PermanentProviderError('example: expected {"free": [...]} in the response')
    blocks = []
    for index, block in enumerate(free):
        where = f"example: free[{index}]"
        if not isinstance(block, dict):
            raise PermanentProviderError(f"{where} is not an object")
        start, minutes = block.get("from"), block.get("minutes")
        try:
            parsed = datetime.fromisoformat(start) if isinstance(start, str) else None
        except ValueError:
            parsed = None
        if parsed is None or parsed.tzinfo is None:
            raise PermanentProviderError(f"{where}.from is not an ISO-8601 instant with an offset")
        if (isinstance(minutes, bool) or not isinstance(minutes, int)
                or not 0 <= minutes <= MAX_BLOCK_MINUTES):
            raise PermanentProviderError(
                f"{where}.minutes is not an integer from 0 to {MAX_BLOCK_MINUTES}"
            )
        try:
            first = parsed.astimezone(UTC)
            blocks.append((first, first + timedelta(minutes=minutes) - slot))
        except OverflowError:  # year 1 or 9999: datetime cannot represent the block
            raise PermanentProviderError(f"{where}.from is out of range") from None
    return blocks


def _slots(blocks: list[tuple[datetime, datetime]], slot: timedelta) -> Iterator[datetime]:
    for first, last in blocks:
        at = first
        while at <= last:
            yield at
            at += slot
