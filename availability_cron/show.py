"""`availability-cron show WORKSPACE`: one workspace as an operator needs to see it.

Its source row (provider_config with secrets redacted by the rules of
:func:`refresh.config_secrets`), its cache row without the slot payload (the count and
the first 5 slots, also in the workspace's own ``timezone`` when it names one), how old
the last success is, when it is due next, and its failure streak. Read-only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from psycopg.rows import class_row

from . import db, queries
from .clock import iso_utc_or_none
from .errors import ConfigError
from .refresh import config_secrets, redact_config
from .settings import scrub
from .source import caps


@dataclass(frozen=True)
class WorkspaceDetails:
    """A source row joined with its cache row (cache columns NULL when there is none)."""

    workspace_id: str
    provider: str | None
    #: None, with provider_config_error saying why, when over the caps of source.py.
    provider_config: Any
    enabled: bool | None
    created_at: datetime | None
    has_cache: bool
    slot_count: int | None
    first_slots: list[str] | None
    range_start: datetime | None
    range_end: datetime | None
    fetched_at: datetime | None
    refreshed_at: datetime | None
    stale_at: datetime | None
    last_error: str | None
    last_error_at: datetime | None
    consecutive_failures: int
    provider_config_error: str | None = None


def fetch_details(conn: db.Connection, source: str, workspace_id: str) -> WorkspaceDetails | None:
    # Binary results: timestamps read whatever the DateStyle (see db.py).
    with conn.cursor(row_factory=class_row(WorkspaceDetails), binary=True) as cur:
        cur.execute(queries.with_source(queries.WORKSPACE_DETAILS, source),
                    {"workspace_id": workspace_id, **caps()})
        return cur.fetchone()


@dataclass(frozen=True)
class WorkspaceView:
    """What `show` prints; every string in :meth:`as_json` is scrubbed of ``secrets``."""

    details: WorkspaceDetails
    at: datetime
    secrets: list[str]

    @property
    def due_now(self) -> bool:
        """A cron run would pick it now: enabled, and no cache yet or its stale_at passed."""
        d = self.details
        return bool(d.enabled) and (d.stale_at is None or d.stale_at <= self.at)

    def as_json(self) -> dict[str, object]:
        d = self.details
        cache: dict[str, object] | None = None
        if d.has_cache:
            age = (self.at - d.refreshed_at).total_seconds() if d.refreshed_at else None
            cache = {
                "slotCount": d.slot_count,
                "firstSlots": d.first_slots,
                **local_slots(d.provider_config, d.first_slots or []),
                "rangeStart": _iso(d.range_start),
                "rangeEnd": _iso(d.range_end),
                "fetchedAt": _iso(d.fetched_at),
                "refreshedAt": _iso(d.refreshed_at),
                "successAgeSeconds": None if age is None else round(age, 1),
                "staleAt": _iso(d.stale_at),
                "lastError": d.last_error,
                "lastErrorAt": _iso(d.last_error_at),
                "consecutiveFailures": d.consecutive_failures,
            }
        shown_source: dict[str, object] = {
            "provider": d.provider,
            "providerConfig": redact_config(d.provider_config),
            "enabled": d.enabled,
            "createdAt": _iso(d.created_at),
        }
        if d.provider_config_error is not None:  # why providerConfig is not shown
            shown_source["providerConfigError"] = d.provider_config_error
        out: dict[str, object] = {
            "at": _iso(self.at),
            "workspaceId": d.workspace_id,
            "source": shown_source,
            "cache": cache,
            "nextDueAt": _iso(d.stale_at) if d.has_cache else None,
            "dueNow": self.due_now,
        }
        scrubbed: dict[str, object] = _scrubbed(out, self.secrets)
        return scrubbed


def describe(
    conn: db.Connection,
    source: str,
    workspace_id: str,
    *,
    now: datetime,
    environ: Mapping[str, str],
    secrets: list[str],
) -> WorkspaceView:
    """The view of ``workspace_id``; ConfigError (exit 2) when the source has no such row.

    ``environ`` is what providers see: the values of the variables named by ``*_env``
    keys are scrubbed from the output along with ``secrets``, should they appear
    anywhere (a URL, an error message).
    """
    details = fetch_details(conn, source, workspace_id)
    if details is None:
        raise ConfigError(f"show: no workspace {workspace_id!r} in {source}")
    return WorkspaceView(details, now, secrets + config_secrets(details.provider_config, environ))


def local_slots(config: Any, slots: list[str]) -> dict[str, object]:
    """``slots`` in the workspace's own IANA ``timezone`` (provider_config), if it names one."""
    name = config.get("timezone") if isinstance(config, Mapping) else None
    if not isinstance(name, str) or not name:
        return {}
    try:
        zone = ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return {"timezone": name, "timezoneError": f"not an IANA time zone: {name!r}"}
    return {
        "timezone": name,
        "firstSlotsLocal": [
            datetime.fromisoformat(s.replace("Z", "+00:00")).astimezone(zone).isoformat()
            for s in slots
        ],
    }


def _iso(value: datetime | None) -> str | None:
    return iso_utc_or_none(value)


def _scrubbed(value: Any, secrets: list[str]) -> Any:
    if isinstance(value, str):
        return scrub(value, secrets)
    if isinstance(value, Mapping):
        return {k: _scrubbed(v, secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrubbed(v, secrets) for v in value]
    return value
