"""The source relation's rows, held to the data contract one row at a time.

The source (``availability_workspaces``, or an app's view) is not ours: a view may yield
NULL keys, and tenants write ``provider_config``. One bad row must stay that row's
problem, never fail the run for every tenant. Two kinds of bad row:

- **Invalid rows** break the contract on a key column. A NULL ``workspace_id``, or one
  longer than :data:`MAX_WORKSPACE_ID_BYTES`, cannot be cached (its write would fail the
  whole batch): the planning reads leave it out, so it takes no slot of the limit. A NULL
  ``created_at`` on a workspace without a cache row leaves the oldest-first order of
  missing caches nothing to go by: it is planned after every dated one (once it has a
  cache row, its created_at no longer matters). Several enabled rows with one
  ``workspace_id`` (a view's join gone wrong) are one workspace: every read uses one of
  them, the one created last (``queries.ONE_ROW_ORDER``), so it is called once per run,
  takes one slot of the limit and counts once in metrics; the rows beyond it are
  invalid. :func:`fetch_invalid_rows` counts them all for the summary and its one
  WARNING per run.
- **A provider_config over the caps** (:data:`MAX_CONFIG_BYTES`,
  :data:`MAX_CONFIG_DEPTH`) is decided in SQL (``queries.CONFIG_CHECK``): the reads send
  NULL and the reason instead, so such a config never reaches this process. The
  workspace is planned as usual and the reason becomes its ``[permanent]`` error.

A NULL ``provider`` is a row problem of the second kind: see :func:`row_error`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from psycopg.rows import class_row

from . import db, queries

log = logging.getLogger(__name__)

#: The most a provider_config may take, both stored (``pg_column_size``, checked first:
#: a large TOASTed value is then never even decompressed) and as JSON text (what would
#: be sent and parsed). Real configs are a few hundred bytes.
MAX_CONFIG_BYTES = 64 * 1024
#: The deepest nesting of objects and arrays a provider_config may have:
#: ``{"a": {"b": [1]}}`` is 3 levels. Python's recursive JSON handling fails near 1,000.
MAX_CONFIG_DEPTH = 32
#: The longest workspace_id a cache row can have: the cache's primary-key index takes
#: about 2,700 bytes at most, less after compression; ids are UUIDs and slugs.
MAX_WORKSPACE_ID_BYTES = 1024
#: How many workspace ids the WARNING about invalid rows names.
NAMED_IN_WARNING = 5


def caps() -> dict[str, object]:
    """The placeholders of the caps (``queries.CONFIG_CHECK``, the invalid-row rules): add
    them to the parameters of every read of the source that uses them."""
    return {
        "max_workspace_id_bytes": MAX_WORKSPACE_ID_BYTES,
        "max_config_bytes": MAX_CONFIG_BYTES,
        "max_config_depth": MAX_CONFIG_DEPTH,
        # Any object or array at level MAX_CONFIG_DEPTH (the root is level 0) is one
        # level too many. strict: lax mode would unwrap arrays and miscount the levels.
        "config_too_deep": (
            f"strict $.**{{{MAX_CONFIG_DEPTH}}}"
            ' ? (@.type() == "object" || @.type() == "array")'
        ),
    }


def row_error(provider: str | None, provider_config_error: str | None) -> str | None:
    """Why this source row cannot be refreshed (its permanent error), or None if it can."""
    if provider is None:
        return "provider is NULL in the source"
    return provider_config_error


@dataclass(frozen=True)
class InvalidRows:
    """Enabled source rows that break the contract on a key column (see the module
    docstring)."""

    null_workspace_id: int
    #: workspace_id longer than MAX_WORKSPACE_ID_BYTES (not named: it is too long).
    long_workspace_id: int
    #: Workspaces without a cache row whose created_at is NULL.
    null_created_at: int
    #: Up to NAMED_IN_WARNING of those, by id.
    null_created_at_ids: list[str]
    #: Rows of a duplicated workspace_id beyond the one used (ignored).
    duplicate_rows: int = 0
    #: How many workspace ids have more than one row...
    duplicated_ids: int = 0
    #: ...and up to NAMED_IN_WARNING of them, by id.
    duplicated_ids_named: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return (self.null_workspace_id + self.long_workspace_id + self.null_created_at
                + self.duplicate_rows)

    def describe(self, source: str) -> str:
        """One line naming the problems, for the run's WARNING."""
        parts = []
        skipped = []
        if self.null_workspace_id:
            skipped.append(f"{self.null_workspace_id} with a NULL workspace_id")
        if self.long_workspace_id:
            skipped.append(f"{self.long_workspace_id} with a workspace_id longer than "
                           f"{MAX_WORKSPACE_ID_BYTES} bytes")
        if skipped:
            parts.append("skipped " + " and ".join(skipped))
        if self.duplicate_rows:
            named = ", ".join(repr(i) for i in self.duplicated_ids_named)
            more = ", ..." if self.duplicated_ids > len(self.duplicated_ids_named) else ""
            ids = "id" if self.duplicated_ids == 1 else "ids"
            dup = "row" if self.duplicate_rows == 1 else "rows"
            parts.append(f"ignored {self.duplicate_rows} duplicate {dup} of "
                         f"{self.duplicated_ids} workspace {ids} ({named}{more}); each is "
                         "refreshed once, from its row created last")
        if self.null_created_at:
            named = ", ".join(repr(i) for i in self.null_created_at_ids)
            more = ", ..." if self.null_created_at > len(self.null_created_at_ids) else ""
            parts.append(f"planned after every dated workspace: {self.null_created_at} with a "
                         f"NULL created_at and no cache row yet ({named}{more})")
        rows = "row" if self.total == 1 else "rows"
        return (f"source relation {source}: {self.total} {rows} breaking the data contract: "
                f"{'; '.join(parts)}")


def fetch_invalid_rows(conn: db.Connection, source: str) -> InvalidRows:
    """Count the invalid rows of ``source`` (one statement; reads no provider_config)."""
    with conn.cursor(row_factory=class_row(InvalidRows)) as cur:
        cur.execute(queries.with_source(queries.INVALID_SOURCE_ROWS, source),
                    {"named": NAMED_IN_WARNING, **caps()})
        row = cur.fetchone()
    assert row is not None  # an aggregate always returns one row
    return row


def warn_invalid_rows(conn: db.Connection, source: str) -> int:
    """Count the invalid rows, log one WARNING naming them if there are any; return the count."""
    invalid = fetch_invalid_rows(conn, source)
    if invalid.total:
        log.warning("%s", invalid.describe(source))
    return invalid.total
