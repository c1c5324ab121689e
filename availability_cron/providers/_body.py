"""Reading a response body within the body cap: content decoding included, step by step.

httpx decodes ``Content-Encoding`` one network read at a time and hands over whatever a
read inflates to: a 64 KiB read of a gzip bomb becomes 64 MiB before any size check can
run. So the raw bytes are read here (``iter_raw``) and inflated with ``max_length``: no
decode step may produce more than what is left of :data:`MAX_BODY_BYTES` (and never more
than :data:`DECODE_STEP_BYTES` at once), so the body in memory never passes the cap by
more than one byte, whatever the compression ratio.

Only the encodings decoded here are advertised (:data:`ACCEPT_ENCODING`); a body in any
other encoding is a permanent error that says so, never bytes passed on undecoded.
"""

from __future__ import annotations

import json
import zlib
from typing import TYPE_CHECKING, Any

from .errors import PermanentProviderError, RetryableProviderError

if TYPE_CHECKING:
    import httpx

    from .base import FetchRequest

#: Largest response body read, in bytes (a month of slots is a few hundred KiB at most).
#: Both the bytes on the wire and the decoded body are held to it.
MAX_BODY_BYTES = 5 * 1024 * 1024
#: The Accept-Encoding header sent: exactly the encodings :class:`Decoder` knows.
ACCEPT_ENCODING = "gzip, deflate"
#: Most bytes one decode step produces; the deadline is checked between steps.
DECODE_STEP_BYTES = 1024 * 1024

#: What json.loads may build from one answer, estimated by :func:`json_weight`: room for
#: ~12,000 slots as objects of 4 fields (a month of half-hour slots, day and night, is
#: 1,440). 5 MiB of ``[{},{},...]`` would build ~130 MB; capped here, one answer builds
#: at most ~16 MB, so five workers' answers together stay under 100 MB.
MAX_JSON_WEIGHT = 16_000_000
#: Bytes json.loads builds at most per container or comma (measured on CPython 3.11:
#: 29-160, the most for objects with distinct keys and values), and per byte of text
#: (the decoded str and the string values).
_JSON_VALUE_BYTES = 200
_JSON_TEXT_BYTES = 2

_GZIP = 16 + zlib.MAX_WBITS  # gzip header and trailer
_ZLIB = zlib.MAX_WBITS  # RFC 9110 "deflate": the zlib format
_RAW = -zlib.MAX_WBITS  # bare deflate, which some servers send as "deflate"


class Decoder:
    """Inflates one body incrementally: :meth:`feed` raw bytes, :meth:`read` bounded pieces.

    ``read(limit)`` returns at most ``limit`` decoded bytes, b"" when the input fed so
    far is used up. :meth:`finish` raises zlib.error when the stream ended early.
    """

    def __init__(self, encoding: str) -> None:
        self.encoding = encoding
        self._wbits = _GZIP if encoding == "gzip" else _ZLIB
        self._inflate = zlib.decompressobj(self._wbits)
        self._pending = b""
        self._fed = False  # an empty body is empty, whatever its Content-Encoding
        #: Until the first decode succeeds, the input is kept: "deflate" may turn out raw.
        self._head: bytes | None = b"" if encoding == "deflate" else None

    def feed(self, data: bytes) -> None:
        self._fed = self._fed or bool(data)
        self._pending += data
        if self._head is not None:
            self._head += data

    def read(self, limit: int) -> bytes:
        while self._pending:
            if self._inflate.eof:  # a gzip body may hold several members (RFC 1952)
                if self._wbits != _GZIP:
                    self._pending = b""  # after the end of a zlib stream: ignored
                    return b""
                self._inflate = zlib.decompressobj(_GZIP)
            try:
                out = self._inflate.decompress(self._pending, limit)
            except zlib.error:
                if self._head is None:
                    raise
                # Not the zlib format: decode everything seen so far as bare deflate.
                self._wbits, self._inflate = _RAW, zlib.decompressobj(_RAW)
                self._pending, self._head = self._head, None
                continue
            if self._inflate.eof:
                self._pending = self._inflate.unused_data
            else:
                self._pending = self._inflate.unconsumed_tail
            if self._head is not None and (out or len(self._head) >= 2):
                self._head = None  # the zlib header checked out: no fallback any more
            if out or not self._inflate.eof:
                return out  # b"" only once all the input fed so far is used up
        return b""

    def finish(self) -> None:
        if not self._inflate.eof and self._fed:
            raise zlib.error("the compressed stream ends early")


def decoder_for(content_encoding: str | None, what: str) -> Decoder | None:
    """The decoder for a Content-Encoding header (None: identity); permanent error if unknown."""
    codings = [c.strip().lower() for c in (content_encoding or "").split(",")]
    codings = [c for c in codings if c and c != "identity"]
    if not codings:
        return None
    if len(codings) == 1 and codings[0] in ("gzip", "x-gzip", "deflate"):
        return Decoder("gzip" if codings[0] == "x-gzip" else codings[0])
    shown = "".join(ch if ch.isprintable() else "?" for ch in (content_encoding or ""))[:40]
    raise PermanentProviderError(
        f"{what}: the response's Content-Encoding {shown!r} is not one this job decodes "
        f"({ACCEPT_ENCODING}, or none)"
    )


def read_capped(response: httpx.Response, request: FetchRequest, what: str) -> bytes:
    """The decoded body of ``response``, at most MAX_BODY_BYTES, read before the deadline.

    Raises PermanentProviderError when the body (on the wire or decoded) passes the cap,
    is in an encoding not decoded here, or does not decode; RetryableProviderError when
    the deadline passes while it streams in.
    """
    declared = response.headers.get("Content-Length")
    if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise PermanentProviderError(
            f"{what}: response body of {int(declared)} bytes exceeds {MAX_BODY_BYTES}"
        )
    decoder = decoder_for(response.headers.get("Content-Encoding"), what)
    chunks: list[bytes] = []
    size = wire = 0

    def keep(piece: bytes) -> None:
        nonlocal size
        size += len(piece)
        if size > MAX_BODY_BYTES:
            raise PermanentProviderError(
                f"{what}: the decoded response body exceeds {MAX_BODY_BYTES} bytes"
            )
        chunks.append(piece)
        if request.time_left() <= 0:
            raise RetryableProviderError(f"{what}: timed out while reading the response")

    for raw in response.iter_raw():
        wire += len(raw)
        if wire > MAX_BODY_BYTES:
            raise PermanentProviderError(
                f"{what}: response body exceeds {MAX_BODY_BYTES} bytes"
            )
        if decoder is None:
            keep(raw)
            continue
        decoder.feed(raw)
        try:
            while piece := decoder.read(min(DECODE_STEP_BYTES, MAX_BODY_BYTES - size + 1)):
                keep(piece)
        except zlib.error:
            raise _undecodable(what, decoder) from None
        if request.time_left() <= 0:
            raise RetryableProviderError(f"{what}: timed out while reading the response")
    if decoder is not None:
        try:
            decoder.finish()
        except zlib.error:
            raise _undecodable(what, decoder) from None
    return b"".join(chunks)


def _undecodable(what: str, decoder: Decoder) -> PermanentProviderError:
    # zlib's own message says nothing useful to an operator; the encoding does.
    return PermanentProviderError(
        f"{what}: the {decoder.encoding} response body could not be decoded "
        "(corrupt or cut short)"
    )


def json_weight(body: bytes) -> int:
    """An upper bound on the bytes json.loads(body) builds, counted in a few milliseconds.

    Every value is a container or sits in one: the first member of a container needs no
    comma, every other one follows a comma, and an object member (key and value) costs
    at most twice a list item. So ``{``, ``[`` and ``,`` bound the values (commas and
    brackets inside strings count too: an over-estimate).
    """
    tokens = sum(body.count(token) for token in (b"{", b"[", b",")) + 1
    return _JSON_VALUE_BYTES * tokens + _JSON_TEXT_BYTES * len(body)


def load_json(body: bytes, what: str, status: int) -> Any:
    """``body`` parsed; PermanentProviderError if it is not JSON or would build too much."""
    weight = json_weight(body)
    if weight > MAX_JSON_WEIGHT:
        raise PermanentProviderError(
            f"{what}: HTTP {status} but the JSON answer is too large to parse: an estimated "
            f"{weight / 1e6:.0f} MB of objects; the limit is {MAX_JSON_WEIGHT / 1e6:.0f} MB"
        )
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise PermanentProviderError(f"{what}: HTTP {status} but the body is not valid JSON"
                                     ) from None
