"""Reading provider answers: the small checks every JSON provider needs, in one place.

Messages name where a bad value sits (``data['2026-12-01'][0].start``) and what it
is, but quote only short values whole: a cut-off excerpt could carry part of a
secret that the job's scrubbing, which matches whole values, would miss.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from .errors import PermanentProviderError

_PLAIN = re.compile(r"[ !#-\[\]-~]*")  # printable ASCII but the quote and the backslash


def kind(value: Any) -> str:
    """A JSON value's type, as a message says it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def shown(value: Any, quote: Callable[[str], str] = repr) -> str:
    """A value for a message: short strings quoted whole (by ``quote``), anything else
    described. Never a cut-off excerpt: it could hold part of an echoed secret."""
    # Only plain printable ASCII is quoted: quoting escapes a quote, a backslash or a tab,
    # and an escaped secret no longer matches the scrubbing of whole secrets.
    if isinstance(value, str) and len(value) <= 40 and _PLAIN.fullmatch(value):
        return quote(value)
    if isinstance(value, str):
        return f"a string of {len(value)} characters"
    return kind(value)


def excerpt(text: str, limit: int = 1000) -> str:
    """``text`` on one line, at most ``limit`` characters, cut only between words.

    A token is a run of non-space characters, so it is kept whole or left out, never cut:
    the job's scrubbing, which replaces whole secrets, then always finds it. Use this for
    every message that quotes a provider's own words.
    """
    folded = " ".join(text.split())
    if len(folded) <= limit:
        return folded
    cut = folded[:max(0, limit - 1)]
    if folded[len(cut)] != " ":  # the cut fell inside a word: drop the word
        cut = cut.rpartition(" ")[0]
    return cut.rstrip() + "…"


def instant(value: Any, where: str, what: str) -> datetime:
    """An ISO-8601 date-time string with an offset, as a UTC datetime; else a permanent error."""
    if not isinstance(value, str):
        raise PermanentProviderError(
            f"{what}: {where} must be an ISO-8601 date-time string, got {kind(value)}"
        )
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise PermanentProviderError(
            f"{what}: {where} is not an ISO-8601 date-time: {shown(value)}"
        ) from None
    if parsed.utcoffset() is None:
        raise PermanentProviderError(f"{what}: {where} has no UTC offset: {shown(value)}")
    try:
        return parsed.astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:00+05:00 is before year 1 in UTC
        raise PermanentProviderError(f"{what}: {where} is out of range: {shown(value)}") from None


def number(value: str | None) -> float | None:
    """A header value as a finite number, or None."""
    try:
        result = float(value) if value is not None else math.nan
    except ValueError:
        return None
    return result if math.isfinite(result) else None


def split_window(
    start: datetime, end: datetime, span: timedelta
) -> Iterator[tuple[datetime, datetime]]:
    """Consecutive ``[start, end)`` parts of at most ``span``; none if ``start >= end``."""
    while start < end:
        part_end = min(start + span, end)
        yield start, part_end
        start = part_end
