"""Output for a person at a terminal, and none of it for cron.

The installed command runs with its stdout and/or stderr on a pseudo-terminal (the
``pty`` machinery of the standard library), as it would in a person's shell; with a pipe
instead, as under cron. Rules: stdout gets a table at a terminal and JSON otherwise
(``--format json`` always JSON); stderr shows a progress bar only when it is a terminal;
NO_COLOR removes colour.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
from typing import IO

import pytest
from helpers import CLI, CliResult, add_workspace, clean_env

pytestmark = pytest.mark.e2e

#: A control sequence selecting graphic rendition (colour, bold, ...): ESC [ params m.
SGR = re.compile(r"\x1b\[([0-9;]*)m")
#: Any escape sequence at all (cursor moves, erase line, SGR, ...).
ESCAPE = re.compile(r"\x1b")
#: One line of the stderr log (cli._configure_logging).
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR) ")


def run_cli_tty(*args: str, env: dict[str, str], stdout_tty: bool = True,
                stderr_tty: bool = True, timeout: float = 60) -> CliResult:
    """Run the installed command with stdout and/or stderr on a pseudo-terminal.

    A pty turns "\\n" into "\\r\\n"; the result has plain "\\n" again. Escape sequences are
    kept as written.
    """
    env = {**env, "TERM": "xterm-256color", "COLUMNS": "120", "LINES": "40"}
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        env.pop(name, None)  # let rich decide from the streams, as in a real shell
    ptys: dict[str, tuple[int, int]] = {}
    if stdout_tty:
        ptys["stdout"] = os.openpty()
    if stderr_tty:
        ptys["stderr"] = os.openpty()
    try:
        proc = subprocess.Popen(
            [CLI, *args], env=env, stdin=subprocess.DEVNULL,
            stdout=ptys["stdout"][1] if stdout_tty else subprocess.PIPE,
            stderr=ptys["stderr"][1] if stderr_tty else subprocess.PIPE,
        )
    finally:
        for _master, replica in ptys.values():
            os.close(replica)  # the child holds its own copies; EOF comes when it exits
    captured: dict[str, bytes] = {}

    def read(name: str, master: int | None, pipe: IO[bytes] | None) -> None:
        fd = master if master is not None else pipe.fileno()  # type: ignore[union-attr]
        chunks = []
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: the terminal's other side is closed
                break
            if not chunk:
                break
            chunks.append(chunk)
        captured[name] = b"".join(chunks)

    readers = [
        threading.Thread(target=read, args=(name, ptys[name][0] if name in ptys else None,
                                            None if name in ptys else getattr(proc, name)))
        for name in ("stdout", "stderr")
    ]
    for reader in readers:
        reader.start()
    try:
        returncode = proc.wait(timeout)
    finally:
        proc.kill()
        for reader in readers:
            reader.join(10)
        for master, _replica in ptys.values():
            os.close(master)

    def text(name: str) -> str:
        return captured.get(name, b"").decode("utf-8", errors="replace").replace("\r\n", "\n")

    return CliResult(returncode, text("stdout"), text("stderr"))


def colour_codes(text: str) -> list[str]:
    """The SGR parameters in ``text`` that set a colour (foreground or background)."""
    found = []
    for params in SGR.findall(text):
        codes = [int(p) for p in params.split(";") if p]
        i = 0
        while i < len(codes):
            code = codes[i]
            if code in (38, 48):  # extended colour: 38;5;n or 38;2;r;g;b
                found.append(";".join(map(str, codes[i:i + 3])))
                i += 3 if i + 1 < len(codes) and codes[i + 1] == 5 else 5
                continue
            if 30 <= code <= 37 or 40 <= code <= 47 or 90 <= code <= 97 or 100 <= code <= 107:
                found.append(str(code))
            i += 1
    return found


def tty_env(database_url: str, **extra: str) -> dict[str, str]:
    env = clean_env(DATABASE_URL=database_url, **extra)
    if "NO_COLOR" not in extra:
        env.pop("NO_COLOR", None)
    return env


#: Long enough that its log line is wider than the terminal (COLUMNS=120).
FAILURE = "the calendar provider is having a very bad day and says so at considerable length"


@pytest.fixture
def three_workspaces(conn):
    """Two workspaces that refresh (each taking a moment) and one that fails."""
    add_workspace(conn, "ws-1", config={"latency_ms": 300})
    add_workspace(conn, "ws-2", config={"latency_ms": 300})
    add_workspace(conn, "ws-bad", config={"fail": FAILURE})


# --- stdout: a table for a person, JSON for everything else ------------------------------------


def test_at_a_terminal_a_refresh_prints_its_summary_as_a_table(database_url, three_workspaces):
    result = run_cli_tty("refresh", env=tty_env(database_url))

    assert result.returncode == 0, result.stderr
    assert not result.stdout.lstrip().startswith("{"), result.stdout
    assert "availability-cron refresh" in result.stdout
    assert re.search(r"\brefreshed\b[^\n]*\b2\b", result.stdout), result.stdout
    assert re.search(r"\berrors\b[^\n]*\b1\b", result.stdout), result.stdout


def test_format_json_forces_json_at_a_terminal(database_url, three_workspaces):
    result = run_cli_tty("refresh", "--format", "json", env=tty_env(database_url))

    assert result.returncode == 0, result.stderr
    summary = result.json()
    assert (summary["refreshed"], summary["errors"]) == (2, 1)


@pytest.mark.parametrize("args", [("metrics",), ("refresh", "--dry-run")])
def test_at_a_terminal_metrics_and_dry_runs_print_tables(database_url, three_workspaces, args):
    result = run_cli_tty(*args, env=tty_env(database_url))

    assert result.returncode == 0, result.stderr
    assert not result.stdout.lstrip().startswith("{"), result.stdout
    expected = "availability caches at" if args == ("metrics",) else "dry run at"
    assert expected in result.stdout


def test_with_stdout_piped_a_run_at_a_terminal_still_prints_one_json_line(
    database_url, three_workspaces
):
    result = run_cli_tty("refresh", env=tty_env(database_url), stdout_tty=False)

    assert result.returncode == 0, result.stderr
    assert result.stdout == json.dumps(result.json(), separators=(",", ":")) + "\n"


# --- stderr: progress for a person, plain log lines for cron -----------------------------------


def test_a_refresh_shows_its_progress_on_stderr_when_stderr_is_a_terminal(
    database_url, three_workspaces
):
    result = run_cli_tty("refresh", env=tty_env(database_url), stdout_tty=False)

    assert result.returncode == 0, result.stderr
    assert "3/3" in result.stderr, result.stderr
    assert "refreshed 2" in result.stderr, result.stderr
    assert "errors 1" in result.stderr, result.stderr
    # A log line written while the bar shows is printed above it whole, not wrapped.
    assert re.search(rf"WARNING [^\n]*workspace ws-bad: [^\n]*{FAILURE}\n", result.stderr), (
        result.stderr)


def test_no_progress_when_stderr_is_not_a_terminal_even_with_stdout_on_one(
    database_url, three_workspaces
):
    result = run_cli_tty("refresh", env=tty_env(database_url), stderr_tty=False)

    assert result.returncode == 0, result.stderr
    assert "availability-cron refresh" in result.stdout  # stdout was a terminal: a table
    assert not ESCAPE.search(result.stderr), result.stderr
    lines = result.stderr.splitlines()
    assert lines and all(LOG_LINE.match(line) for line in lines), result.stderr


# --- NO_COLOR ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "stream"), [
    pytest.param(("refresh", "--dry-run"), "stdout", id="dry-run-table"),
    pytest.param(("refresh",), "stderr", id="refresh-progress"),
])
def test_no_color_removes_every_colour_from_terminal_output(database_url, conn,
                                                           three_workspaces, args, stream):
    coloured = run_cli_tty(*args, env=tty_env(database_url))
    conn.execute("DELETE FROM workspace_availability_cache")  # the same work again
    plain = run_cli_tty(*args, env=tty_env(database_url, NO_COLOR="1"))

    assert coloured.returncode == plain.returncode == 0, (coloured.stderr, plain.stderr)
    assert colour_codes(getattr(coloured, stream)), "no colour to remove: the test proves nothing"
    assert colour_codes(getattr(plain, stream)) == [], getattr(plain, stream)
