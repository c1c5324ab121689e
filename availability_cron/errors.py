"""The one error hierarchy of availability-cron.

Every error the CLI knows how to report derives from :class:`AvailabilityCronError`.
Database errors are translated into these once, in :mod:`availability_cron.db`;
provider errors are split into retryable and permanent in
:mod:`availability_cron.providers.base`. The first line of each docstring is the
default message.
"""

from __future__ import annotations


class AvailabilityCronError(Exception):
    """availability-cron failed."""

    #: When a run fails midway: its summary so far (a refresh.RunSummary), so the
    #: numbers printed still count the work that was done and written.
    summary: object | None = None

    def __init__(self, message: str | None = None) -> None:
        doc = (type(self).__doc__ or "").strip().splitlines()
        super().__init__(message or (doc[0] if doc else type(self).__name__))

    @property
    def message(self) -> str:
        return str(self.args[0])


class ConfigError(AvailabilityCronError):
    """A setting or a command-line option is invalid (exit code 2)."""


class DatabaseUnavailable(AvailabilityCronError):
    """The database cannot be reached."""


class SchemaMissing(AvailabilityCronError):
    """The schema is missing or out of date: run `availability-cron db migrate`."""


class NotPrimary(AvailabilityCronError):
    """The database is read-only (a hot standby?): point DATABASE_URL at the primary."""


class ReadOnlySession(AvailabilityCronError):
    """The database session is read-only (default_transaction_read_only is on)."""


class ConnectionLost(AvailabilityCronError):
    """The database connection was lost in the middle of the run."""


class DatabaseError(AvailabilityCronError):
    """The database refused a statement."""


class TransactionPooler(AvailabilityCronError):
    """The lock's connection does not keep its own server session (a transaction-mode pooler?)."""


class NotPermitted(AvailabilityCronError):
    """The database role is not allowed to do this."""
