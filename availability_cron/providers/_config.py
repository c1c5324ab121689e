"""Reading a workspace's provider_config: typed getters whose errors name the key.

Every error is a PermanentProviderError ("calcom: provider_config.event_type_id must
be ..."), raised before any call goes out. Secrets come from ``token`` or from the
environment variable that ``token_env`` names, and only when the operator has scoped that
variable to the workspace being refreshed (:mod:`.scopes`); neither value is ever put in a
message.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

from .errors import PermanentProviderError
from .scopes import SecretScopes, current_call

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_RESERVED_HEADERS = frozenset({
    "host", "forwarded", "via", "cookie", "connection", "keep-alive", "te", "trailer",
    "upgrade", "content-length", "transfer-encoding", "expect",
})


class ConfigReader:
    """Typed, validating access to one workspace's provider_config.

    ``workspace_id`` and ``scopes`` decide which variables ``token_env`` may name; both
    default to those of the refresh job's current call (:func:`.scopes.calling`), so a
    provider called by the job needs to pass neither. With no workspace known at all,
    ``token_env`` is refused: a secret must never be resolved for nobody in particular.
    """

    def __init__(self, provider: str, config: Mapping[str, Any],
                 environ: Mapping[str, str] | None = None, *,
                 workspace_id: str | None = None,
                 scopes: SecretScopes | None = None) -> None:
        self.provider = provider
        self.config = config
        self.environ = environ or {}
        call = current_call()
        self.workspace_id = workspace_id if workspace_id is not None else (
            call.workspace_id if call else None)
        self.scopes = scopes if scopes is not None else (call.scopes if call else SecretScopes())

    def error(self, key: str, expected: str) -> PermanentProviderError:
        return PermanentProviderError(f"{self.provider}: provider_config.{key} must be {expected}")

    def only(self, allowed: Iterable[str]) -> None:
        """Reject keys this provider does not know (typos must not pass silently)."""
        allowed = set(allowed)
        unknown = sorted(set(self.config) - allowed)
        if unknown:
            raise PermanentProviderError(
                f"{self.provider}: unknown provider_config key {unknown[0]!r}; "
                f"allowed: {', '.join(sorted(allowed))}"
            )

    def text(self, key: str, *, default: str | None = None, required: bool = False) -> str | None:
        value = self.config.get(key)
        if value is None:
            if required:
                raise self.error(key, "set (a non-empty string)")
            return default
        if not isinstance(value, str) or not value.strip():
            raise self.error(key, "a non-empty string")
        return value.strip()

    def required_text(self, key: str) -> str:
        value = self.text(key, required=True)
        assert value is not None
        return value

    def integer(self, key: str, *, default: int, lo: int, hi: int) -> int:
        value = self.config.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise self.error(key, f"an integer from {lo} to {hi}")
        return value

    def identifier(self, key: str, *, required: bool = False) -> str | None:
        """An identifier given as a string or an integer (JSON numbers for ids are common)."""
        value = self.config.get(key)
        if value is None:
            if required:
                raise self.error(key, "set (a string or an integer)")
            return None
        if isinstance(value, bool) or not isinstance(value, str | int) or str(value).strip() == "":
            raise self.error(key, "a string or an integer")
        return str(value).strip()

    def url(self, key: str, *, default: str | None = None, schemes: tuple[str, ...] = (
            "https", "http")) -> str:
        value = self.text(key, default=default, required=default is None)
        assert value is not None
        parts = urlsplit(value)
        if parts.scheme not in schemes or not parts.netloc:
            raise self.error(key, f"an absolute {' or '.join(schemes)} URL")
        if parts.username or parts.password:
            raise self.error(key, "a URL without credentials (use token or token_env)")
        return value.rstrip("/")

    def headers(self, key: str) -> dict[str, str]:
        """Extra request headers; never one that decides where or how a request travels.

        ``Host`` and the forwarding headers would let a tenant route a request (and the
        operator secret bound to its URL's host) to another virtual host behind a shared
        front; the framing and connection headers would let it smuggle requests; cookies
        and proxy credentials are the job's to manage, not a tenant's.
        """
        value = self.config.get(key, {})
        if not isinstance(value, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise self.error(key, "an object of string header names to string values")
        for name in value:
            lowered = name.lower()
            if lowered in _RESERVED_HEADERS or lowered.startswith(("x-forwarded-", "proxy-")):
                raise PermanentProviderError(
                    f"{self.provider}: provider_config.{key} may not set {name}: the job "
                    "decides where and how requests travel"
                )
        return dict(value)

    def secret(self, *, required: bool, token_key: str = "token",
               env_key: str = "token_env") -> str | None:
        """The token from ``token``, or from the environment variable named by ``token_env``
        if the operator has scoped that variable to this workspace (see :mod:`.scopes`)."""
        direct = self.config.get(token_key)
        env_name = self.config.get(env_key)
        if direct is not None and env_name is not None:
            raise PermanentProviderError(
                f"{self.provider}: set provider_config.{token_key} or .{env_key}, not both"
            )
        if env_name is not None:
            if not isinstance(env_name, str) or not _ENV_NAME.fullmatch(env_name.strip()):
                raise self.error(env_key, "the name of an environment variable (A-Z, 0-9, _)")
            if self.workspace_id is None:
                raise PermanentProviderError(
                    f"{self.provider}: provider_config.{env_key} cannot be resolved: no "
                    "workspace is being refreshed (pass workspace_id to ConfigReader)"
                )
            return self.scopes.resolve(env_name.strip(), workspace_id=self.workspace_id,
                                       environ=self.environ, provider=self.provider,
                                       key=env_key)
        if direct is not None:
            if not isinstance(direct, str) or not direct.strip():
                raise self.error(token_key, "a non-empty string")
            return direct.strip()
        if required:
            raise PermanentProviderError(
                f"{self.provider}: provider_config needs {token_key} or {env_key}"
            )
        return None
