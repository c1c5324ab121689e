"""Provider plugins, installed for real and run through the installed `availability-cron`.

The example plugin (examples/availability-cron-example-plugin) and a deliberately broken
one are installed once for this module with ``pip install --target`` into a temporary
directory, never into the venv; each run sees them only through PYTHONPATH, exactly as
a plugin installed next to availability-cron would be seen.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from helpers import add_workspace, cache_row, clean_env, run_cli
from httpserver import LocalServer, Reply

pytestmark = pytest.mark.e2e

EXAMPLE_PLUGIN = Path(__file__).resolve().parents[1] / "examples" / \
    "availability-cron-example-plugin"
TOKEN = "example-tok-7c1d"

BROKEN_PYPROJECT = """\
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "availability-cron-broken-plugin"
version = "0.1.0"

[project.entry-points."availability_cron.providers"]
broken = "availability_cron_broken_plugin:BrokenProvider"

[tool.setuptools]
packages = ["availability_cron_broken_plugin"]
"""

BROKEN_INIT = """\
import availability_cron_missing_dependency  # not installed: importing this plugin fails

class BrokenProvider:
    name = "broken"
"""


def pip_install(sources: list[Path], target: Path) -> str:
    """Install ``sources`` (no dependencies) into ``target``; return how they were built."""
    base = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-input", "--quiet",
            "--disable-pip-version-check", "--no-cache-dir", "--target", str(target)]
    paths = [str(s) for s in sources]
    first = subprocess.run([*base, "--no-build-isolation", *paths], capture_output=True,
                           text=True, timeout=300)
    if first.returncode == 0:
        return "no build isolation"
    # setuptools before 70.1 builds wheels through the separate `wheel` package, which a
    # fresh venv lacks: then let pip build in an isolated environment of its own.
    shutil.rmtree(target, ignore_errors=True)
    second = subprocess.run([*base, *paths], capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, (
        f"pip install failed\n--- without build isolation:\n{first.stderr}\n"
        f"--- with build isolation:\n{second.stderr}"
    )
    return "build isolation"


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding the installed example and broken plugins (for PYTHONPATH)."""
    root = tmp_path_factory.mktemp("plugins")
    # Build from copies: pip builds in the source tree and would leave build/ and
    # *.egg-info behind in the repository.
    example = root / "example-src"
    shutil.copytree(EXAMPLE_PLUGIN, example,
                    ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    broken = root / "broken-src"
    (broken / "availability_cron_broken_plugin").mkdir(parents=True)
    (broken / "pyproject.toml").write_text(BROKEN_PYPROJECT)
    (broken / "availability_cron_broken_plugin" / "__init__.py").write_text(BROKEN_INIT)
    site = root / "site"

    started = time.monotonic()
    how = pip_install([example, broken], site)
    print(f"\nplugins installed ({how}) in {time.monotonic() - started:.1f}s", file=sys.stderr)

    assert (site / "availability_cron_example_plugin" / "__init__.py").is_file()
    return site


def plugin_env(database_url: str, site: Path, **extra: str) -> dict[str, str]:
    pythonpath = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    return clean_env(DATABASE_URL=database_url, PYTHONPATH=pythonpath, **extra)


def at(day: datetime, hour: int, minute: int = 0) -> str:
    return day.replace(hour=hour, minute=minute).isoformat().replace("+00:00", "Z")


def test_an_installed_plugin_refreshes_its_workspaces_through_the_installed_command(
    database_url: str, conn: psycopg.Connection[Any], http_server: LocalServer, plugin_site: Path
) -> None:
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).replace(hour=0, minute=0, second=0,
                                                               microsecond=0)
    http_server.route("/free", Reply(200, {"free": [
        {"from": at(tomorrow, 9), "minutes": 90},
        {"from": f"{tomorrow:%Y-%m-%d}T18:00:00+02:00", "minutes": 30},  # 16:00Z
    ]}))
    http_server.route("/garbage", Reply(200, {"free": [{"from": at(tomorrow, 9),
                                                        "minutes": "lots"}]}))
    add_workspace(conn, "ws-example", provider="example",
                  config={"url": http_server.url("/free"),
                          "token_env": "EXAMPLE_TOKEN_WS_EXAMPLE"})
    add_workspace(conn, "ws-example-garbage", provider="example",
                  config={"url": http_server.url("/garbage")})

    # The operator scopes the token to its workspace and to the plugin's (loopback) host.
    scopes = json.dumps({"EXAMPLE_TOKEN_{workspace}": {"hosts": [http_server.url()]}})
    result = run_cli("refresh", env=plugin_env(database_url, plugin_site,
                                               EXAMPLE_TOKEN_WS_EXAMPLE=TOKEN,
                                               AVAILABILITY_CRON_SECRET_SCOPES=scopes))

    assert result.returncode == 0, result.stderr
    summary = result.json()
    assert (summary["attempted"], summary["refreshed"], summary["errors"]) == (2, 1, 1)
    row = cache_row(conn, "ws-example")
    assert row is not None and row["last_error"] is None
    assert row["slots_utc"] == [at(tomorrow, 9), at(tomorrow, 9, 30), at(tomorrow, 10),
                                at(tomorrow, 16)]
    seen = next(s for s in http_server.requests if s.path == "/free")
    assert seen.headers["authorization"] == f"Bearer {TOKEN}"
    assert set(seen.query) == {"from", "until"}
    garbage = cache_row(conn, "ws-example-garbage")
    assert garbage is not None and garbage["slots_utc"] is None
    assert garbage["last_error"] == (
        "[permanent] example: free[0].minutes is not an integer from 0 to 10080"
    )


def test_a_workspace_naming_an_unknown_provider_gets_an_error_listing_the_installed_ones(
    database_url: str, conn: psycopg.Connection[Any], plugin_site: Path
) -> None:
    add_workspace(conn, "ws-nope", provider="nope")
    add_workspace(conn, "ws-simulated")

    result = run_cli("refresh", env=plugin_env(database_url, plugin_site))

    assert result.returncode == 0, result.stderr
    summary = result.json()
    assert (summary["success"], summary["refreshed"], summary["errors"]) == (True, 1, 1)
    row = cache_row(conn, "ws-nope")
    assert row is not None and row["consecutive_failures"] == 1
    assert row["last_error"].startswith("[permanent] unknown provider 'nope'; installed: ")
    installed = row["last_error"].split("installed: ", 1)[1].split(", ")
    assert {"example", "http", "simulated"} <= set(installed)
    assert installed == sorted(installed)


def test_a_plugin_that_fails_to_import_is_an_error_of_its_workspaces_only(
    database_url: str, conn: psycopg.Connection[Any], plugin_site: Path
) -> None:
    add_workspace(conn, "ws-broken", provider="broken")
    add_workspace(conn, "ws-simulated")

    result = run_cli("refresh", env=plugin_env(database_url, plugin_site))

    assert result.returncode == 0, result.stderr
    summary = result.json()
    assert (summary["success"], summary["refreshed"], summary["errors"]) == (True, 1, 1)
    row = cache_row(conn, "ws-broken")
    assert row is not None
    assert row["last_error"] == (
        "[permanent] provider 'broken' failed to load: ModuleNotFoundError: "
        "No module named 'availability_cron_missing_dependency'"
    )
    simulated = cache_row(conn, "ws-simulated")
    assert simulated is not None and simulated["last_error"] is None


def test_plugins_are_invisible_without_their_directory_on_the_path(
    database_url: str, conn: psycopg.Connection[Any]
) -> None:
    # Guards the other tests: the plugins must come from plugin_site, not from the venv.
    add_workspace(conn, "ws-example", provider="example", config={"url": "http://127.0.0.1:1/"})

    result = run_cli("refresh", env=clean_env(DATABASE_URL=database_url))

    assert result.returncode == 0, result.stderr
    row = cache_row(conn, "ws-example")
    assert row is not None
    assert row["last_error"].startswith("[permanent] unknown provider 'example'")
