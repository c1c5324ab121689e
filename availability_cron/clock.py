"""Time as the tool prints it: one formatter, UTC with ``Z``.

Every timestamp in the JSON, the tables and the Prometheus text goes through
:func:`iso_utc`, whatever zone the value arrived in: a session whose TimeZone is not UTC
(initdb copies the OS zone; libpq takes PGTZ) hands back instants with its own offset, and
one document must never mix ``+01:00`` with ``Z``.
"""

from __future__ import annotations

from datetime import UTC, datetime


def iso_utc(value: datetime) -> str:
    """``value`` (timezone-aware) as ISO-8601 in UTC, ending in ``Z``."""
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def iso_utc_or_none(value: datetime | None) -> str | None:
    """:func:`iso_utc`, or None for no value (JSON null)."""
    return None if value is None else iso_utc(value)
