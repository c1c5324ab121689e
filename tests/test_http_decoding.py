"""Compressed response bodies are decoded within the body cap, chunk by chunk.

A gzip bomb (a small body that inflates a thousandfold) must never be inflated past
MAX_BODY_BYTES in memory, even within one network read.
"""

from __future__ import annotations

import gzip
import json
import time
import zlib
from datetime import UTC, datetime, timedelta

import pytest
from helpers import traced_peak
from httpserver import Reply

from availability_cron.providers import (
    FetchRequest,
    PermanentProviderError,
    RetryableProviderError,
)
from availability_cron.providers._body import MAX_JSON_WEIGHT, json_weight
from availability_cron.providers._http import MAX_BODY_BYTES, HttpSession


def request(seconds: float = 10.0) -> FetchRequest:
    start = datetime(2026, 12, 1, tzinfo=UTC)
    return FetchRequest("ws-1", {}, start, start + timedelta(days=30),
                        deadline=time.monotonic() + seconds)


@pytest.fixture
def session():
    s = HttpSession()
    yield s
    s.close()


def gzip_bomb(decoded_bytes: int) -> bytes:
    """A gzip member of ``decoded_bytes`` zero bytes (about 1/1000 of that on the wire)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    piece = b"\0" * (1 << 20)
    parts = [packer.compress(piece) for _ in range(decoded_bytes // len(piece))]
    return b"".join([*parts, packer.flush()])


def served(http_server, body: bytes, encoding: str, path: str = "/body") -> str:
    http_server.route(path, Reply(200, body, headers={"Content-Encoding": encoding,
                                                      "Content-Type": "application/json"}))
    return http_server.url(path)


def test_a_gzip_bomb_is_refused_without_inflating_past_the_body_cap(http_server, session):
    bomb = gzip_bomb(64 * MAX_BODY_BYTES // 5)  # 64 MiB of zeros: ~64 KiB, one network read
    url = served(http_server, bomb, "gzip")
    session.get(request(), served(http_server, b"[]", "identity", "/warm"), what="t")  # imports

    with traced_peak() as traced:
        with pytest.raises(PermanentProviderError) as info:
            session.get(request(), url, what="t: GET /body")
    peak = traced.bytes

    # The body cap, the chunks list and one bounded decode step: never the whole bomb.
    assert peak < 3 * MAX_BODY_BYTES, f"peak {peak / 1e6:.1f} MB"
    assert f"decoded response body exceeds {MAX_BODY_BYTES} bytes" in str(info.value)


def test_gzip_and_both_deflate_forms_are_decoded(http_server, session):
    body = b'{"slots": ["2026-12-01T09:00:00Z"]}' * 1000
    raw_deflate = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    forms = {
        "gzip": gzip.compress(body),
        "x-gzip": gzip.compress(body),
        "deflate": zlib.compress(body),  # RFC 9110 deflate: the zlib format
        "Deflate": raw_deflate.compress(body) + raw_deflate.flush(),  # what some servers send
    }
    for i, (encoding, encoded) in enumerate(forms.items()):
        http_server.route(f"/enc{i}", Reply(200, encoded,
                                            headers={"Content-Encoding": encoding}))
        text = session.get(request(), http_server.url(f"/enc{i}"), what="t", parse_json=False)
        assert text == body.decode(), encoding


def test_a_decoded_body_exactly_at_the_cap_is_accepted(http_server, session):
    body = b"[" + b" " * (MAX_BODY_BYTES - 2) + b"]"
    url = served(http_server, gzip.compress(body), "gzip")

    assert session.get(request(), url, what="t") == []


def test_only_the_decoded_encodings_are_advertised(http_server, session):
    url = served(http_server, gzip.compress(b"[]"), "gzip")

    session.get(request(), url, what="t")

    assert http_server.requests[0].headers["accept-encoding"] == "gzip, deflate"


@pytest.mark.parametrize("encoding", ["br", "zstd", "compress", "gzip, gzip"])
def test_an_encoding_that_is_not_decoded_is_a_clear_permanent_error(
    http_server, session, encoding
):
    url = served(http_server, b"\x1b\x00garbage", encoding)

    with pytest.raises(PermanentProviderError, match="Content-Encoding") as info:
        session.get(request(), url, what="t: GET /body")
    assert "gzip, deflate" in str(info.value)


def test_a_corrupt_gzip_body_is_a_permanent_error(http_server, session):
    url = served(http_server, gzip.compress(b"[1, 2, 3]")[:12] + b"\xff" * 40, "gzip")

    with pytest.raises(PermanentProviderError, match="could not be decoded"):
        session.get(request(), url, what="t: GET /body")


def test_a_truncated_gzip_body_is_a_permanent_error(http_server, session):
    url = served(http_server, gzip.compress(b"[1, 2, 3]" * 100)[:-8], "gzip")

    with pytest.raises(PermanentProviderError, match="could not be decoded"):
        session.get(request(), url, what="t: GET /body")


# --- what a JSON answer may build -------------------------------------------------------------


def dense_json(size: int) -> bytes:
    """``[{},{},...]`` of ``size`` bytes: json.loads builds ~25 bytes of objects per byte."""
    return b"[" + b"{}," * ((size - 4) // 3) + b"{}]"


def test_a_json_answer_that_would_build_too_much_is_refused_before_parsing(
    http_server, session
):
    url = served(http_server, gzip.compress(dense_json(MAX_BODY_BYTES)), "gzip")
    session.get(request(), served(http_server, b"[]", "identity", "/warm"), what="t")

    with traced_peak() as traced:
        with pytest.raises(PermanentProviderError, match="too large to parse") as info:
            session.get(request(), url, what="t: GET /body")
    peak = traced.bytes

    # The body and its count: json.loads would build ~130 MB.
    assert peak < 3 * MAX_BODY_BYTES, f"peak {peak / 1e6:.1f} MB"
    assert f"the limit is {MAX_JSON_WEIGHT / 1e6:.0f} MB" in str(info.value)


def test_an_error_body_that_would_build_too_much_gives_no_excerpt(http_server, session):
    http_server.route("/err", Reply(500, dense_json(MAX_BODY_BYTES)))
    session.get(request(), served(http_server, b"[]", "identity", "/warm"), what="t")

    with traced_peak() as traced:
        with pytest.raises(RetryableProviderError, match="HTTP 500$"):
            session.get(request(seconds=0.9), http_server.url("/err"), what="t")
    peak = traced.bytes

    assert peak < 3 * MAX_BODY_BYTES, f"peak {peak / 1e6:.1f} MB"


def test_an_answer_of_ten_thousand_slots_as_objects_is_parsed(http_server, session):
    slots = [{"start": f"2026-12-01T09:{i % 60:02d}:00Z", "end": "2026-12-01T10:00:00Z",
              "status": "available", "invitees_remaining": 1} for i in range(10_000)]
    url = served(http_server, gzip.compress(json.dumps({"slots": slots}).encode()), "gzip")

    assert len(session.get(request(), url, what="t")["slots"]) == 10_000


def test_the_json_estimate_is_an_upper_bound_for_the_densest_shapes():
    for body in (dense_json(1 << 20), b"[" + b"[]," * 300_000 + b"[]]",
                 b"[" + b"1.5," * 250_000 + b"1]", b"[" + b'"ab",' * 200_000 + b'"a"]',
                 b"[" + b'{"a":1},' * 130_000 + b"{}]",
                 b"[" + b"".join(b'{"k%d":%d},' % (i, i) for i in range(80_000)) + b"{}]",
                 b"[" + b"".join(b'{"k%d":"v%d"},' % (i, i) for i in range(60_000)) + b"{}]"):
        with traced_peak() as traced:
            value = json.loads(body)
        peak = traced.bytes
        del value
        assert json_weight(body) >= peak, body[:10]
