"""Where an operator's secret may be used, and where it may be sent.

``provider_config`` may be written by tenants; the environment belongs to the operator.
A workspace may therefore *name* an environment variable (``token_env``) only when the
operator has scoped that variable to it, and the value may only travel to the hosts the
operator allows for it. Two kinds of rule (docs/security.md):

- **a template**, a variable name with ``{workspace}`` in it: ``CALCOM_TOKEN_{workspace}``
  lets workspace ``acme`` name ``CALCOM_TOKEN_ACME`` and no other workspace name it. The
  workspace id is written in upper case with ``-`` as ``_``; only ids of lower-case
  letters, digits and ``-`` can use templates, because only for those is the mapping
  one-to-one (``a-b`` and ``a_b``, or ``acme`` and ``ACME``, would share a name);
- **an exact name** with the workspaces allowed to use it (``"*"``: all of them), for a
  token shared by several workspaces (an agency account, an in-house endpoint).

Each rule lists the destinations its secret may reach (``api.cal.com``,
``https://cal.internal:8443``, ``http://10.0.0.5:8080``; no scheme means https). With no
configuration the built-in rules apply: ``CALCOM_TOKEN_{workspace}``,
``CALENDLY_TOKEN_{workspace}`` and ``GHL_TOKEN_{workspace}``, each bound to that provider's
official API host. ``AVAILABILITY_CRON_SECRET_SCOPES`` adds rules (a JSON object).

Two checks use the rules, both in one place:

- :meth:`SecretScopes.resolve` (through ``ConfigReader.secret``) refuses a name that is not
  scoped to the workspace being refreshed;
- :meth:`Destinations.check` (through ``HttpSession``) refuses, before anything is sent, a
  request that would carry a scoped secret's value (in a header, a query value or a path
  segment) to a host its rule does not allow, whichever provider or plugin built it.

The workspace being refreshed is known from :func:`calling`, which the refresh job wraps
around every provider call (a context variable, so each worker thread has its own): a
plugin that uses ``ConfigReader`` is scoped without passing anything.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote, urlsplit

from .errors import PermanentProviderError

log = logging.getLogger(__name__)

#: The setting that adds rules.
SCOPES_ENV = "AVAILABILITY_CRON_SECRET_SCOPES"
PLACEHOLDER = "{workspace}"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
# Never resolvable, whatever a rule says: the job's own settings and credentials.
FORBIDDEN_ENV = re.compile(r"(?i)(^PG|DATABASE|^AVAILABILITY_CRON_|^AVAILABILITY_CACHE_)")
#: Workspace ids that templates can name: the mapping to a variable name is one-to-one.
_TEMPLATE_ID = re.compile(r"[a-z0-9-]{1,100}")
_HOST = re.compile(r"(?:(https?)://)?([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::([0-9]{1,5}))?/?")
_DEFAULT_PORTS = {"https": 443, "http": 80}
#: Scoped values shorter than this are not guarded on their way out (no token is so short).
MIN_GUARDED_CHARS = 8


def template_key(workspace_id: str) -> str | None:
    """``workspace_id`` as a template writes it (``acme-eu`` -> ``ACME_EU``); None if it cannot."""
    if not _TEMPLATE_ID.fullmatch(workspace_id):
        return None
    return workspace_id.upper().replace("-", "_")


@dataclass(frozen=True)
class Destination:
    """One place a secret may be sent: scheme, host and port."""

    scheme: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Destination:
        match = _HOST.fullmatch(text.strip())
        if match is None or not match[2].strip(".-"):
            raise ValueError(f"{text!r} is not a host, host:port or http(s)://host:port")
        scheme = (match[1] or "https").lower()
        port = int(match[3]) if match[3] else _DEFAULT_PORTS[scheme]
        if not 1 <= port <= 65535:
            raise ValueError(f"{text!r} has an invalid port")
        return cls(scheme, match[2].lower().strip("[]"), port)

    def __str__(self) -> str:
        default = _DEFAULT_PORTS[self.scheme] == self.port
        return f"{self.scheme}://{self.host}" + ("" if default else f":{self.port}")


def destination_of(url: str) -> Destination | None:
    """Where ``url`` goes, or None when it cannot be told (such a request is refused)."""
    try:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in _DEFAULT_PORTS or not parts.hostname:
            return None
        return Destination(scheme, parts.hostname.lower(), parts.port or _DEFAULT_PORTS[scheme])
    except ValueError:
        return None


@dataclass(frozen=True)
class ScopeRule:
    """One operator rule: a variable name (or template), who may name it, where it may go."""

    name: str
    #: None for a template (the workspace in the name); else the ids allowed, "*" for all.
    workspaces: frozenset[str] | None
    destinations: tuple[Destination, ...]

    @property
    def is_template(self) -> bool:
        return self.workspaces is None

    def name_for(self, workspace_id: str) -> str | None:
        """The variable this rule lets ``workspace_id`` name (templates), else None."""
        key = template_key(workspace_id)
        return None if key is None or not self.is_template else self.name.replace(
            PLACEHOLDER, key)

    def allows(self, env_name: str, workspace_id: str) -> bool:
        if self.workspaces is None:
            return self.name_for(workspace_id) == env_name
        return env_name == self.name and ("*" in self.workspaces or workspace_id in
                                          self.workspaces)

    def matches_name(self, env_name: str) -> bool:
        """Could some workspace name ``env_name`` under this rule?"""
        if self.workspaces is not None:
            return env_name == self.name
        prefix, _, suffix = self.name.partition(PLACEHOLDER)
        middle = env_name[len(prefix):len(env_name) - len(suffix)]
        return (env_name.startswith(prefix) and env_name.endswith(suffix)
                and len(env_name) > len(prefix) + len(suffix)
                and re.fullmatch(r"[A-Z0-9_]+", middle) is not None)


BUILTIN_RULES: tuple[ScopeRule, ...] = (
    ScopeRule("CALCOM_TOKEN_{workspace}", None, (Destination("https", "api.cal.com", 443),)),
    ScopeRule("CALENDLY_TOKEN_{workspace}", None,
              (Destination("https", "api.calendly.com", 443),)),
    ScopeRule("GHL_TOKEN_{workspace}", None,
              (Destination("https", "services.leadconnectorhq.com", 443),)),
)


def parse_rules(text: str) -> tuple[ScopeRule, ...]:
    """The rules of an ``AVAILABILITY_CRON_SECRET_SCOPES`` value; ValueError saying what is wrong.

    ``{"NAME_{workspace}": {"hosts": [...]}, "SHARED": {"workspaces": ["a", "b"], "hosts":
    [...]}}``: a template takes no ``workspaces``; an exact name needs them.
    """
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        raise ValueError("must be a JSON object (see docs/security.md)") from None
    if not isinstance(data, dict):
        raise ValueError("must be a JSON object of variable names to rules")
    rules: list[ScopeRule] = []
    for name, body in data.items():
        where = f"rule {name!r}"
        template = PLACEHOLDER in name
        if (not _ENV_NAME.fullmatch(name.replace(PLACEHOLDER, "X"))
                or name.count(PLACEHOLDER) > 1):
            raise ValueError(f"{where}: not a variable name (A-Z, 0-9, _, at most one "
                             f"{PLACEHOLDER})")
        if template and not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*_", name.partition(
                PLACEHOLDER)[0]):
            raise ValueError(f"{where}: a template needs a literal prefix ending in _ before "
                             f"{PLACEHOLDER} (like HTTP_TOKEN_{PLACEHOLDER}), so it cannot "
                             "name variables nobody meant for workspaces")
        if FORBIDDEN_ENV.search(name.replace(PLACEHOLDER, "X")):
            raise ValueError(f"{where}: the job's own settings and database credentials "
                             "(DATABASE_*, PG*, AVAILABILITY_CRON_*) cannot be scoped")
        if not isinstance(body, dict) or set(body) - {"hosts", "workspaces"}:
            raise ValueError(f'{where}: must be an object with "hosts" (and "workspaces" '
                             "for a name without {workspace})")
        hosts = body.get("hosts")
        if not isinstance(hosts, list) or not hosts or not all(isinstance(h, str)
                                                                for h in hosts):
            raise ValueError(f'{where}: "hosts" must be a non-empty list of host names')
        destinations = tuple(Destination.parse(h) for h in hosts)
        workspaces = body.get("workspaces")
        if template:
            if workspaces is not None:
                raise ValueError(f'{where}: a template names its workspace; drop "workspaces"')
            rules.append(ScopeRule(name, None, destinations))
            continue
        if workspaces == "*":
            allowed = frozenset({"*"})
        elif (isinstance(workspaces, list) and workspaces
              and all(isinstance(w, str) and w for w in workspaces)):
            allowed = frozenset(workspaces)
        else:
            raise ValueError(f'{where}: "workspaces" must be a non-empty list of workspace ids '
                             'or "*"')
        rules.append(ScopeRule(name, allowed, destinations))
    _refuse_overlaps(BUILTIN_RULES + tuple(rules))
    return tuple(rules)


def _refuse_overlaps(rules: tuple[ScopeRule, ...]) -> None:
    """Two templates that could produce one variable name would let one workspace name
    another's (``X_{workspace}`` and ``X_{workspace}_EU``: ``X_ACME_EU`` is acme's under
    one and acme-eu's under the other). An exact name a template could also produce is
    decided by its exact rule alone (see SecretScopes.rules_for), so it needs no check."""
    templates = sorted({r.name for r in rules if r.is_template})
    for i, first in enumerate(templates):
        p1, _, s1 = first.partition(PLACEHOLDER)
        for second in templates[i + 1:]:
            p2, _, s2 = second.partition(PLACEHOLDER)
            if ((p1.startswith(p2) or p2.startswith(p1))
                    and (s1.endswith(s2) or s2.endswith(s1))):
                raise ValueError(f"rules {first!r} and {second!r} could name the same "
                                 "variable for two workspaces; make their prefixes or "
                                 "suffixes distinct")


@dataclass(frozen=True)
class SecretScopes:
    """The operator's rules: the built-in ones plus those of AVAILABILITY_CRON_SECRET_SCOPES."""

    rules: tuple[ScopeRule, ...] = BUILTIN_RULES

    @classmethod
    def from_setting(cls, text: str | None) -> SecretScopes:
        return cls(BUILTIN_RULES + (parse_rules(text) if text else ()))

    def rules_for(self, env_name: str) -> list[ScopeRule]:
        """The rules deciding ``env_name``: its exact rules when it has any (an exact name
        the operator listed for some workspaces is theirs, whatever a template says),
        else the templates that can produce it."""
        exact = [r for r in self.rules if not r.is_template and r.name == env_name]
        return exact or [r for r in self.rules if r.is_template and r.matches_name(env_name)]

    def allows(self, env_name: str, workspace_id: str) -> bool:
        return any(rule.allows(env_name, workspace_id) for rule in self.rules_for(env_name))

    def resolve(self, env_name: str, *, workspace_id: str, environ: Mapping[str, str],
                provider: str, key: str = "token_env") -> str:
        """The value of ``env_name`` for ``workspace_id``; PermanentProviderError naming the rule.

        The name is not a secret (the value is), so messages say it.
        """
        where = f"{provider}: provider_config.{key}"
        if FORBIDDEN_ENV.search(env_name):
            raise PermanentProviderError(
                f"{where} may not name the job's own settings or database credentials "
                "(DATABASE_*, PG*, AVAILABILITY_CRON_*)"
            )
        if not self.allows(env_name, workspace_id):
            own = sorted({n for rule in self.rules if (n := rule.name_for(workspace_id))})
            hint = (f"this workspace may name {', '.join(own)}, or" if own
                    else "this workspace id cannot use a {workspace} template, so")
            raise PermanentProviderError(
                f"{where} names {env_name}, which the operator has not scoped to workspace "
                f"{workspace_id!r} ({hint} the operator lists it for this workspace in "
                f"{SCOPES_ENV}; see docs/security.md)"
            )
        value = environ.get(env_name)
        if not value:
            raise PermanentProviderError(
                f"{where} names {env_name}, which is not set in the job's environment"
            )
        return value

    def bind(self, environ: Mapping[str, str]) -> Destinations:
        """Every value a workspace could resolve under these rules, with where it may go."""
        allowed: dict[str, tuple[set[str], set[Destination]]] = {}
        for env_name, value in environ.items():
            # A short value ("UTC", "v2", "30") is no credential, and guarding it would
            # refuse unrelated requests that happen to carry the same word.
            if len(value.strip()) < MIN_GUARDED_CHARS or FORBIDDEN_ENV.search(env_name):
                continue
            for rule in self.rules_for(env_name):
                for form in {value, value.strip()}:  # as set, and as a provider strips it
                    names, places = allowed.setdefault(form, (set(), set()))
                    names.add(env_name)
                    places.update(rule.destinations)
        return Destinations({v: (tuple(sorted(n)), frozenset(p))
                             for v, (n, p) in allowed.items()})


@dataclass(frozen=True)
class Destinations:
    """Scoped secret values -> (their variable names, where they may be sent)."""

    by_value: Mapping[str, tuple[tuple[str, ...], frozenset[Destination]]] = field(
        default_factory=dict)

    def check(self, url: str, headers: Mapping[str, str] | None = None,
              params: Mapping[str, str] | None = None, *, what: str = "request") -> None:
        """Refuse (PermanentProviderError) a request carrying a scoped secret where it may not go.

        Looks at every header value (and the credential after an auth scheme such as
        ``Bearer``), every query value and every path segment: the places a token travels.
        """
        if not self.by_value:
            return
        parts = urlsplit(url)
        pieces = [unquote(s) for s in parts.path.split("/") if s]
        pieces += [v for _, v in parse_qsl(parts.query, keep_blank_values=True)]
        pieces += list((params or {}).values())
        for value in (headers or {}).values():
            pieces.append(value)
            if " " in value.strip():
                pieces.append(value.strip().split(" ", 1)[1].strip())
        target = destination_of(url)
        for piece in pieces:
            found = self.by_value.get(piece.strip())
            if found is None:
                continue
            names, places = found
            if target is None or target not in places:
                shown = str(target) if target else "an address that cannot be read"
                # The operator's log says which variable and where it may go; the stored
                # error does not: a tenant probing with guessed values must not learn
                # whose secret it matched.
                log.warning("refused to send the value of %s to %s; its rules allow %s",
                            " / ".join(names), shown,
                            ", ".join(sorted(str(p) for p in places)))
                raise PermanentProviderError(
                    f"{what}: refused to send an operator secret to {shown}, which its "
                    f"rules in {SCOPES_ENV} do not list (see docs/security.md)"
                )


@dataclass(frozen=True)
class Call:
    """What the refresh job is doing on this thread: refreshing one workspace."""

    workspace_id: str
    scopes: SecretScopes
    destinations: Destinations


_current: ContextVar[Call | None] = ContextVar("availability_cron_call", default=None)


@contextmanager
def calling(call: Call) -> Iterator[None]:
    """Mark the provider call made inside the block as ``call``'s (this thread only)."""
    token = _current.set(call)
    try:
        yield
    finally:
        _current.reset(token)


def current_call() -> Call | None:
    """The call being made on this thread, if the refresh job marked one."""
    return _current.get()
