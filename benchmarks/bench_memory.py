"""Benchmark the refresh job's memory under hostile inputs: print peak RSS (asserts nothing).

Usage::

    .venv/bin/python benchmarks/bench_memory.py [--database-url URL] [--concurrency C]

Runs the installed ``availability-cron refresh`` as a subprocess, as cron does, against a
scratch database (on --database-url's server, else $DATABASE_URL's, else an embedded
PostgreSQL), beside HEALTHY healthy ``simulated`` workspaces, with the hostile inputs
of issue 7, item 3:

- a workspace whose provider_config is ~80 MB (written by PostgreSQL itself);
- an ``ics`` workspace whose feed (from a loopback server) is ~4.5 MB of 40,000 events;
- three ``http`` workspaces whose loopback server answers ~1 MB gzip bombs (~1 GB
  decoded each).

One run per hostile input, then one with all of them (and one with all but the
provider_config), then two rows beyond item 3, the worst the caps still allow at the
shipped concurrency (five feeds just under the ics cap; five 5 MiB JSON answers), then
the healthy run again. Each run's peak RSS is the child's own (``os.wait4``'s
ru_maxrss), so figures are attributable. See benchmarks/README.md, "Memory under
hostile inputs".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import warnings
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg
from bench_refresh import scratch_database, server, table
from psycopg.types.json import Jsonb

from availability_cron import db

warnings.filterwarnings("ignore", category=UserWarning, module="platformdirs")

CLI = str(Path(sys.executable).parent / "availability-cron")
HEALTHY = 200
HEALTHY_LATENCY_MS = 50
CONFIG_BYTES = 80_000_000
ICS_EVENTS = 40_000
BOMB_DECODED_BYTES = 1024 * 1024 * 1024  # ~1 MiB on the wire
BOMBS = 3
#: The shipped Kubernetes memory limit (deploy/kubernetes/cronjob.yaml).
LIMIT_MIB = 256

# Benchmark fixtures, not product SQL: fixed statements, values through placeholders.
INSERT_WORKSPACE = (
    "INSERT INTO availability_workspaces (workspace_id, provider, provider_config, enabled,"
    " created_at) VALUES (%(workspace_id)s, %(provider)s, %(config)s, %(enabled)s, %(at)s)"
)
# The 80 MB value is built by the server: the benchmark process never holds it.
INSERT_HUGE_CONFIG = (
    "INSERT INTO availability_workspaces (workspace_id, provider, provider_config, enabled,"
    " created_at) VALUES ('hostile-config', 'simulated', jsonb_build_object('latency_ms', 0,"
    " 'padding', repeat('x', %(size)s)), false, %(at)s)"
)
INSERT_CACHE = (
    "INSERT INTO workspace_availability_cache (workspace_id, slots_utc, slot_count,"
    " range_start, range_end, fetched_at, refreshed_at, stale_at)"
    " SELECT workspace_id, '[]', 0, %(at)s, %(at)s, %(at)s, %(at)s, %(at)s"
    " FROM availability_workspaces"
)
ENABLE_ONLY = (
    "UPDATE availability_workspaces SET enabled = (workspace_id LIKE 'healthy-%%'"
    " OR workspace_id = ANY(%(hostile)s))"
)
# Hostile workspaces are due first, so they are in flight at once, beside healthy ones.
MAKE_ALL_STALE = (
    "UPDATE workspace_availability_cache SET consecutive_failures = 0, last_error = NULL,"
    " stale_at = now() - CASE WHEN workspace_id LIKE 'hostile-%%' THEN interval '2 hours'"
    " ELSE interval '1 hour' END"
)
HOSTILE_ERRORS = (
    "SELECT workspace_id, last_error FROM workspace_availability_cache"
    " WHERE workspace_id = ANY(%(hostile)s) ORDER BY workspace_id"
)
COUNT_REFRESHED = (
    "SELECT count(*) FROM workspace_availability_cache"
    " WHERE workspace_id LIKE 'healthy-%%' AND refreshed_at > now() - interval '10 minutes'"
)

#: Beyond item 3: the worst the caps still allow, one row each (see the README).
AT_CAP_EVENTS = 4_500  # an ics feed just under MAX_FEED_BYTES
AT_CAP = 5  # as many as the shipped concurrency runs at once
AT_CAP_IDS = [f"hostile-ics-cap-{i}" for i in range(1, AT_CAP + 1)]
JSON_IDS = [f"hostile-json-{i}" for i in range(1, AT_CAP + 1)]

BOMB_IDS = [f"hostile-gzip-{i}" for i in range(1, BOMBS + 1)]
CASES: list[tuple[str, list[str]]] = [
    ("healthy only", []),
    ("+ provider_config of 80 MB", ["hostile-config"]),
    (f"+ ics feed of {ICS_EVENTS} events", ["hostile-ics"]),
    (f"+ {BOMBS} http gzip bombs", BOMB_IDS),
    ("+ all hostile inputs at once", ["hostile-config", "hostile-ics", *BOMB_IDS]),
    ("+ all but the provider_config", ["hostile-ics", *BOMB_IDS]),
    (f"+ {AT_CAP} ics feeds of {AT_CAP_EVENTS} events", AT_CAP_IDS),
    (f"+ {AT_CAP} http answers of 5 MiB JSON", JSON_IDS),
    ("healthy only, again", []),
]


# --- hostile bodies -------------------------------------------------------------------------


def ics_feed(count: int, start: datetime) -> bytes:
    lines = ["BEGIN:VCALENDAR", "VERSION:2.0", "PRODID:-//availability-cron//bench//EN"]
    for i in range(count):
        at = start + timedelta(minutes=10 * (i % 4000))
        lines += ["BEGIN:VEVENT", f"UID:event-{i}@bench", f"DTSTAMP:{at:%Y%m%dT%H%M%SZ}",
                  f"DTSTART:{at:%Y%m%dT%H%M%SZ}", "DURATION:PT5M", "END:VEVENT"]
    return ("\r\n".join([*lines, "END:VCALENDAR", ""])).encode()


def gzip_bomb(decoded: int) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    piece = b"\0" * (1 << 20)
    return b"".join([*(packer.compress(piece) for _ in range(decoded // len(piece))),
                     packer.flush()])


def json_at_cap() -> bytes:
    """5 MiB of ``[{},{},...]``: the densest objects per byte json.loads builds."""
    return b"[" + b"{}," * ((5 * 1024 * 1024 - 4) // 3) + b"{}]"


@contextmanager
def hostile_server(bodies: dict[str, tuple[bytes, dict[str, str]]]) -> Iterator[str]:
    """A loopback server answering each path prefix of ``bodies`` with its body, headers."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:  # http.server calls it by this name
            found = [answer for prefix, answer in bodies.items()
                     if self.path.startswith(prefix)]
            body, headers = found[0] if found else (b"{}", {})
            try:
                self.send_response(200 if found else 404)
                for name, value in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass

    class Server(ThreadingHTTPServer):
        def handle_error(self, request: Any, client_address: Any) -> None:
            pass  # the job hangs up on a bomb or a feed it refuses: that is the point

    httpd = Server(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        host, port = httpd.server_address[:2]
        yield f"http://{host}:{port}"
    finally:
        httpd.shutdown()
        httpd.server_close()


# --- database -------------------------------------------------------------------------------


def seed(conn: psycopg.Connection[Any], base_url: str) -> None:
    at = datetime.now(UTC) - timedelta(days=30)
    rows = [{"workspace_id": f"healthy-{i:04d}", "provider": "simulated",
             "config": Jsonb({"latency_ms": HEALTHY_LATENCY_MS}), "enabled": True, "at": at}
            for i in range(HEALTHY)]
    rows.append({"workspace_id": "hostile-ics", "provider": "ics", "enabled": False, "at": at,
                 "config": Jsonb({"url": f"{base_url}/feed.ics", "timezone": "UTC"})})
    rows += [{"workspace_id": w, "provider": "http", "enabled": False, "at": at,
              "config": Jsonb({"url": f"{base_url}/bomb/{{workspace_id}}"})} for w in BOMB_IDS]
    rows += [{"workspace_id": w, "provider": "ics", "enabled": False, "at": at,
              "config": Jsonb({"url": f"{base_url}/cap.ics?{w}", "timezone": "UTC"})}
             for w in AT_CAP_IDS]
    rows += [{"workspace_id": w, "provider": "http", "enabled": False, "at": at,
              "config": Jsonb({"url": f"{base_url}/json/{{workspace_id}}"})} for w in JSON_IDS]
    with conn.transaction(), conn.cursor() as cur:
        cur.executemany(INSERT_WORKSPACE, rows)
        cur.execute(INSERT_HUGE_CONFIG, {"size": CONFIG_BYTES, "at": at})
        cur.execute(INSERT_CACHE, {"at": at})
    conn.execute("VACUUM ANALYZE")


# --- one run --------------------------------------------------------------------------------


def refresh_once(url: str, concurrency: int) -> tuple[int, dict[str, Any], float, str]:
    """Run the command once; (peak RSS in KiB, its JSON summary, seconds, stderr tail)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("AVAILABILITY_") and k != "DATABASE_URL"}
    env.update({"DATABASE_URL": url, "AVAILABILITY_CRON_LOG_LEVEL": "WARNING",
                "AVAILABILITY_CRON_CONCURRENCY": str(concurrency)})
    with tempfile.TemporaryFile() as stderr:
        started = time.monotonic()
        child = subprocess.Popen([CLI, "refresh"], stdout=subprocess.PIPE, stderr=stderr,
                                 stdin=subprocess.DEVNULL, env=env)
        assert child.stdout is not None
        out = child.stdout.read()
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        seconds = time.monotonic() - started
        stderr.seek(0)
        tail = stderr.read().decode(errors="replace").strip().splitlines()[-1:]
    try:
        summary = json.loads(out)
    except ValueError:
        summary = {"exit": child.returncode}
    summary["exit"] = child.returncode
    return usage.ru_maxrss, summary, seconds, "".join(tail)[:160]


def bench(conn: psycopg.Connection[Any], url: str, concurrency: int) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for label, hostile in CASES:
        conn.execute(ENABLE_ONLY, {"hostile": hostile})
        conn.execute(MAKE_ALL_STALE)
        peak_kib, summary, seconds, tail = refresh_once(url, concurrency)
        healthy = conn.execute(COUNT_REFRESHED).fetchone()
        errors = conn.execute(HOSTILE_ERRORS, {"hostile": hostile}).fetchall()
        rows.append((
            label, f"{peak_kib / 1024:.0f}", f"{peak_kib / 1024 / LIMIT_MIB:.0%}",
            str(summary.get("exit")), f"{summary.get('refreshed', '-')}/"
            f"{summary.get('attempted', '-')}", str(summary.get("errors", "-")),
            f"{healthy[0] if healthy else 0}/{HEALTHY}", f"{seconds:.1f}",
        ))
        for workspace, error in errors:
            print(f"    {label}: {workspace}: {(error or 'no error')[:150]}", file=sys.stderr)
        if summary.get("exit") != 0 and tail:
            print(f"    {label}: stderr: {tail}", file=sys.stderr)
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL"),
                        help="a server to use (a scratch database is created and dropped "
                        "on it); default: $DATABASE_URL, else an embedded PostgreSQL")
    parser.add_argument("--concurrency", type=int, default=5,
                        help="AVAILABILITY_CRON_CONCURRENCY of the runs (default: 5, as shipped)")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    feed, at_cap = ics_feed(ICS_EVENTS, now), ics_feed(AT_CAP_EVENTS, now)
    bomb = gzip_bomb(BOMB_DECODED_BYTES)
    calendar, json_type = {"Content-Type": "text/calendar"}, {"Content-Type": "application/json"}
    bodies = {"/feed.ics": (feed, calendar), "/cap.ics": (at_cap, calendar),
              "/bomb/": (bomb, {**json_type, "Content-Encoding": "gzip"}),
              "/json/": (json_at_cap(), json_type)}
    print(f"date        {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    print(f"machine     {platform.machine()}, nproc {os.cpu_count()}, {platform.system()} "
          f"{platform.release()}, python {platform.python_version()}")
    print(f"inputs      {HEALTHY} simulated workspaces ({HEALTHY_LATENCY_MS} ms each); "
          f"provider_config {CONFIG_BYTES / 1e6:.0f} MB; ics feed {len(feed) / 1e6:.1f} MB "
          f"of {ICS_EVENTS} events; {BOMBS} gzip bombs of {len(bomb) / 1e6:.1f} MB "
          f"({BOMB_DECODED_BYTES / 1e9:.1f} GB decoded); beyond item 3: {AT_CAP} ics feeds "
          f"of {len(at_cap) / 1e6:.1f} MB ({AT_CAP_EVENTS} events), {AT_CAP} 5 MiB JSON answers")
    with server(args.database_url) as server_url, scratch_database(server_url) as url, \
            psycopg.connect(url, autocommit=True) as conn, hostile_server(bodies) as base:
        db.migrate(conn)
        seed(conn, base)
        rows = bench(conn, url, args.concurrency)
    table(
        f"peak RSS of `availability-cron refresh` (concurrency {args.concurrency}), one run "
        f"per row; limit {LIMIT_MIB} MiB",
        ("run", "peak MiB", f"of {LIMIT_MIB}", "exit", "refreshed/attempted", "errors",
         "healthy refreshed", "seconds"),
        rows,
    )
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
