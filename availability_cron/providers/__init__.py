"""Provider registry: providers are found by name through entry points, loaded lazily.

The group is ``availability_cron.providers``; the built-in providers register in
this package's pyproject.toml exactly as a plugin package would in its own.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from importlib.metadata import EntryPoint, entry_points

from ._config import ConfigReader
from ._http import HttpSession, credential_key, path_of
from .base import (
    FetchRequest,
    PermanentProviderError,
    Provider,
    ProviderContext,
    ProviderError,
    RetryableProviderError,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "ConfigReader",
    "HttpSession",
    "credential_key",
    "path_of",
    "FetchRequest",
    "PermanentProviderError",
    "Provider",
    "ProviderContext",
    "ProviderError",
    "ProviderRegistry",
    "RetryableProviderError",
]

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "availability_cron.providers"


def installed_entry_points() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


class ProviderRegistry:
    """Instantiates each provider once per run, on first use, by name.

    ``extra`` maps names to provider classes that take precedence over entry points
    (tests and embedding applications use it; the CLI does not).
    """

    def __init__(
        self,
        context: ProviderContext,
        extra: Mapping[str, type[Provider]] | None = None,
    ) -> None:
        self.context = context
        self._extra = dict(extra or {})
        self._entry_points: dict[str, EntryPoint] | None = None
        self._instances: dict[str, Provider] = {}
        self._failures: dict[str, PermanentProviderError] = {}
        self._name_locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        with self._lock:
            return sorted(set(self._eps()) | set(self._extra))

    def _eps(self) -> dict[str, EntryPoint]:
        if self._entry_points is None:
            self._entry_points = installed_entry_points()
        return self._entry_points

    def get(self, name: str) -> Provider:
        """The provider instance for ``name``; PermanentProviderError if none is installed.

        Each name is loaded and instantiated once per run, under a lock of its own: a
        plugin whose import or constructor hangs blocks only its own workspaces, never
        the others nor close(). A failure to load is remembered for the run.
        """
        with self._lock:
            if name in self._instances:
                return self._instances[name]
            if name in self._failures:
                raise self._failures[name]
            name_lock = self._name_locks.setdefault(name, threading.Lock())
        with name_lock:
            with self._lock:
                if name in self._instances:
                    return self._instances[name]
                if name in self._failures:
                    raise self._failures[name]
            try:
                instance = self._load(name)(self.context)
            except PermanentProviderError as exc:
                with self._lock:
                    self._failures[name] = exc
                raise
            except Exception as exc:
                error = PermanentProviderError(
                    f"provider {name!r} failed to start: {type(exc).__name__}: {exc}"
                )
                with self._lock:
                    self._failures[name] = error
                raise error from None
            with self._lock:
                self._instances[name] = instance
            return instance

    def _load(self, name: str) -> type[Provider]:
        cls = self._extra.get(name)
        if cls is not None:
            return cls
        with self._lock:
            eps = self._eps()
        ep = eps.get(name)
        if ep is None:
            installed = ", ".join(sorted(set(eps) | set(self._extra))) or "none"
            raise PermanentProviderError(f"unknown provider {name!r}; installed: {installed}")
        try:
            loaded: type[Provider] = ep.load()
        except Exception as exc:
            raise PermanentProviderError(
                f"provider {name!r} failed to load: {type(exc).__name__}: {exc}"
            ) from None
        return loaded

    def close(self) -> None:
        """Close every provider started this run, then the shared HTTP client."""
        with self._lock:
            instances = list(self._instances.values())
            self._instances.clear()
        for provider in instances:
            try:
                provider.close()
            except Exception:  # closing must never fail the run
                log.warning("provider %s failed to close", provider.name, exc_info=True)
        self.context.http.close()
