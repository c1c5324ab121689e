"""Redaction: which text is a secret, and keeping it out of everything the job prints, logs
and stores.

Every rule lives here, so that `config`, error messages, the log and the stored errors agree:

- **The password of a connection string is what libpq reads.** libpq's own parser
  (``psycopg.conninfo.conninfo_to_dict``) is asked, so ``?pass%77ord=...`` (libpq decodes the
  key) is a password here too, as are ``sslpassword`` and a key=value password with quotes
  or backslash escapes.
- **The secret is the whole password**, in each exact form it takes: as written in the
  string (percent-encoded, quoted, escaped) and as decoded. Never its fragments: a password
  ``Str0ng:7500`` must not turn every ``7500`` of an output into ``***``.
- **Structured output is redacted by structure** (:func:`redact_url`), before it is
  serialised; serialised text is never scrubbed. **Free text** (an error message, a log
  line, a stored error) is scrubbed of whole secrets (:func:`scrub`).

psycopg is imported only inside the functions that ask libpq: loading the settings and
starting the CLI must stay fast.
"""

from __future__ import annotations

import functools
import re
import urllib.parse
from dataclasses import dataclass

#: What replaces a secret.
MASK = "***"

#: libpq connection parameters whose value is a secret.
PASSWORD_KEYS = frozenset({"password", "sslpassword"})

#: Free text is not scrubbed of shorter secrets (structured redaction hides them all).
MIN_SCRUBBED = 3
#: A secret shorter than this is replaced only where it stands as a whole word: a password
#: ``word`` sits in "password authentication failed" by chance. A longer one cannot, so it
#: is replaced wherever it occurs, inside a longer word included.
WHOLE_WORD_BELOW = 8

_URI_PREFIXES = ("postgresql://", "postgres://")
_SPACE = " \t\n\v\f\r"  # C isspace(), as libpq's key=value parser uses it


@dataclass(frozen=True)
class _Span:
    """Where a password is written in a connection string, and the forms it takes there."""

    start: int
    end: int
    forms: tuple[str, ...]


def _libpq(conninfo: str) -> dict[str, str] | None:
    """libpq's reading of ``conninfo`` (URL or key=value); None if libpq cannot parse it."""
    from psycopg import ProgrammingError
    from psycopg.conninfo import conninfo_to_dict

    try:
        params = conninfo_to_dict(conninfo)
    except (ProgrammingError, ValueError):
        return None
    return {k: str(v) for k, v in params.items() if v is not None}


def _password_spans(conninfo: str) -> list[_Span]:
    """Every place a password is written in ``conninfo``, read by libpq's grammar.

    A string that libpq cannot parse yields what could be read before the error.
    """
    if conninfo.startswith(_URI_PREFIXES):
        return _uri_spans(conninfo)
    return _keyword_spans(conninfo)


def _uri_spans(url: str) -> list[_Span]:
    """The userinfo password and the password parameters of a URL.

    libpq ends the userinfo at the first ``@`` or ``/``; a further ``@`` before the host
    ends (before any ``/`` or ``?``) still belongs to it here, so that ``user:p@ss@host``
    hides ``p@ss``, which is what the user meant.
    """
    spans = []
    begin = url.index("://") + 3
    at = _find_any(url, "@/", begin)
    query_from = begin
    if at < len(url) and url[at] == "@":
        while (later := url.find("@", at + 1)) >= 0 and later < _find_any(url, "/?", at + 1):
            at = later
        colon = url.find(":", begin, at)
        if colon >= 0:
            raw = url[colon + 1:at]
            spans.append(_Span(colon + 1, at, (raw, urllib.parse.unquote(raw))))
        query_from = at + 1
    question = url.find("?", query_from)
    if question < 0:
        return spans
    position = question + 1
    for param in url[question + 1:].split("&"):
        key, equals, value = param.partition("=")
        if equals and urllib.parse.unquote(key) in PASSWORD_KEYS:
            start = position + len(key) + 1
            spans.append(_Span(start, start + len(value), (value, urllib.parse.unquote(value))))
        position += len(param) + 1
    return spans


def _find_any(text: str, chars: str, start: int) -> int:
    """Index of the first of ``chars`` in ``text`` from ``start``, else len(text)."""
    found = [i for i in (text.find(c, start) for c in chars) if i >= 0]
    return min(found, default=len(text))


def _keyword_spans(conninfo: str) -> list[_Span]:
    """The password values of a key=value string, scanned as libpq's conninfo_parse does."""
    spans: list[_Span] = []
    text, n = conninfo, len(conninfo)
    i = _skip_space(text, 0)
    while i < n:
        key_start = i
        while i < n and text[i] != "=" and text[i] not in _SPACE:
            i += 1
        key = text[key_start:i]
        i = _skip_space(text, i)
        if i >= n or text[i] != "=":
            return spans  # libpq: missing "=" after the key
        start = _skip_space(text, i + 1)
        i, value = _keyword_value(text, start)
        if key in PASSWORD_KEYS:
            raw = text[start:i]
            closed = raw.startswith("'") and len(raw) >= 2 and raw.endswith("'")
            inner = raw[1:-1] if closed else raw.removeprefix("'")
            spans.append(_Span(start, i, (raw, inner, value)))
        i = _skip_space(text, i)
    return spans


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i] in _SPACE:
        i += 1
    return i


def _keyword_value(text: str, i: int) -> tuple[int, str]:
    """Where the key=value value starting at ``i`` ends, and the value libpq reads: quoted
    ('...') or up to the next space, a backslash escaping the character after it."""
    quoted = text.startswith("'", i)
    i += quoted
    value: list[str] = []
    while i < len(text):
        char = text[i]
        if char == "\\":
            value.append(text[i + 1:i + 2])
            i += 2
        elif (char == "'") if quoted else (char in _SPACE):
            return i + quoted, "".join(value)
        else:
            value.append(char)
            i += 1
    return len(text), "".join(value)


def url_secrets(url: str | None) -> list[str]:
    """Every exact form of every password in ``url`` (URL or key=value), longest first.

    The password libpq reads, and each form it is written in (as written, and decoded).
    Whole values only, never fragments. For a string libpq cannot parse (which never reaches
    a connection: :func:`availability_cron.db.check_url` refuses it), what could be read.
    """
    return list(_secrets_of(url)) if url else []


@functools.lru_cache(maxsize=64)
def _secrets_of(url: str) -> tuple[str, ...]:
    found = {form for span in _password_spans(url) for form in span.forms}
    params = _libpq(url)
    if params is not None:
        found.update(params.get(key, "") for key in PASSWORD_KEYS)
    return tuple(sorted((s for s in found if s), key=lambda s: (-len(s), s)))


def redact_url(url: str) -> str:
    """``url`` fit to print: every password (as libpq reads it) replaced by ``***``.

    URL or key=value. When libpq cannot parse ``url`` (so that nobody can say where its
    password is), or the URL is ambiguous (see :func:`ambiguous_url`), or libpq would
    still read a password other than ``***`` in the result, nothing after the scheme is
    shown.
    """
    if _libpq(url) is None:
        return _masked(url)
    pieces, last = [], 0
    for span in sorted(_password_spans(url), key=lambda s: s.start):
        pieces += [url[last:span.start], MASK]
        last = span.end
    redacted = "".join(pieces) + url[last:]
    params = _libpq(redacted)
    if (params is None or ambiguous_url(url)
            or any(params.get(key, MASK) not in (MASK, "") for key in PASSWORD_KEYS)):
        return _masked(url)
    return redacted


def _masked(url: str) -> str:
    return next((f"{p}{MASK}" for p in _URI_PREFIXES if url.startswith(p)), MASK)


def ambiguous_url(url: str) -> bool:
    """Whether libpq would read a URL's password as something else, and quote it in errors.

    Two shapes: an unencoded ``@`` after the first ``/`` (``user:p/ss@host/db``: libpq reads
    host ``user``, port ``p`` and database ``ss@host/db``), and a ``?`` before the user
    (``host?password=x@y``: libpq reads the user ``host?password=x`` and the host ``y``).
    """
    if not url.startswith(_URI_PREFIXES):
        return False
    rest = url.split("://", 1)[1]
    end = _find_any(rest, "@/", 0)
    if end < len(rest) and rest[end] == "@" and "?" in rest[:end].split(":", 1)[0]:
        return True
    slash = rest.find("/")
    return slash >= 0 and "@" in rest[slash:].split("?", 1)[0]


# libpq's parse errors quote the offending input ('invalid percent-encoded token: "s3cr%zz"',
# 'missing "=" after "secret" in connection info string', or the whole URL). Quoted input is
# cut, whatever the quote marks (a translated message may use others); libpq's own
# one-character punctuation is kept, so that the message still says what is wrong.
_QUOTED = re.compile(r'"[^"]*"|“[^”]*”|„[^“”]*[“”]|«[^»]*»|»[^«]*«')
_GRAMMAR = frozenset({'"="', '"]"', '":"', '"/"'})


def libpq_parse_error(message: str) -> str:
    """libpq's message about a connection string it cannot parse, on one line, without any
    of the input it quotes."""
    text = " ".join(message.split())
    return _QUOTED.sub(lambda m: m[0] if m[0] in _GRAMMAR else f'"{MASK}"', text)


def ping_url_secrets(url: str | None) -> list[str]:
    """The ping URL's path and its longer segments: a Healthchecks check URL is a credential
    (whoever has it can ping)."""
    if not url:
        return []
    path = urllib.parse.urlsplit(url).path.strip("/")
    return [p for p in [path, *path.split("/")] if len(p) >= 8]


def redact_secret_url(url: str) -> str:
    """Scheme and host only, for a URL that is itself a credential (the ping URL)."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return MASK
    return f"{parts.scheme}://{parts.hostname or ''}{port}/{MASK}"


def scrub(text: str, secrets: list[str]) -> str:
    """``text`` with every place any secret covers replaced by ``***``.

    A secret of fewer than WHOLE_WORD_BELOW characters is replaced only where it stands
    as a whole word (not inside a longer run of letters, digits and ``_``), so that a
    password ``word`` leaves "password authentication failed" readable; secrets shorter
    than MIN_SCRUBBED are left alone.
    """
    # Every match of every secret is found in the original text and the union of those
    # spans masked: replacing one secret after another would let a longer (tenant-chosen)
    # string that overlaps an operator secret mask only part of it.
    spans = sorted(
        match.span()
        for secret in set(secrets) if len(secret) >= MIN_SCRUBBED
        for match in _pattern(secret).finditer(text)
    )
    if not spans:
        return text
    out: list[str] = []
    position = 0
    for start, end in spans:
        if end <= position:
            continue
        if start > position:
            out += [text[position:start], MASK]
        elif not out:
            out.append(MASK)
        position = max(position, end)
    return "".join(out) + text[position:]


@functools.lru_cache(maxsize=1024)
def _pattern(secret: str) -> re.Pattern[str]:
    body = re.escape(secret)
    if len(secret) < WHOLE_WORD_BELOW:
        if re.match(r"\w", secret[0]):
            body = rf"(?<!\w){body}"
        if re.match(r"\w", secret[-1]):
            body = rf"{body}(?!\w)"
    return re.compile(body)
