"""The deployment files in deploy/ keep the promises the job relies on.

A run ends by itself within its worst case (budget + grace + closing providers + the
ping bound); a scheduler must let it, must never start two at once, must never retry or
replay missed runs in a burst, and must run exactly `availability-cron refresh`.

The systemd units are read with configparser (keys case-sensitive, as systemd's are) and,
when systemd-analyze is installed, verified by systemd itself. PyYAML is not a
dependency, so the CronJob is read by a small parser of the block-style YAML subset it
is written in, which refuses anything else rather than guessing.
"""

from __future__ import annotations

import configparser
import inspect
import json
import re
import shlex
import shutil
import subprocess
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from helpers import CLI

from availability_cron import deadline, refresh
from availability_cron.history import BOUND_SECONDS as HISTORY_SECONDS
from availability_cron.ping import TIMEOUT_SECONDS as PING_SECONDS
from availability_cron.settings import SPEC_BY_FIELD

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
SERVICE = DEPLOY / "systemd" / "availability-cron.service"
TIMER = DEPLOY / "systemd" / "availability-cron.timer"
CRONJOB = DEPLOY / "kubernetes" / "cronjob.yaml"

DEFAULT_BUDGET_SECONDS = int(str(SPEC_BY_FIELD["time_budget_ms"].default)) / 1000
CLOSE_SECONDS = inspect.signature(refresh._close_bounded).parameters["seconds"].default
#: The longest a run with default settings takes, from process start, network gone or not.
WORST_CASE_SECONDS = deadline.worst_case_seconds(int(str(SPEC_BY_FIELD["time_budget_ms"].default)))


def test_the_worst_case_is_the_sum_of_the_bounds_each_step_enforces():
    assert WORST_CASE_SECONDS == (DEFAULT_BUDGET_SECONDS + refresh.GRACE_SECONDS
                                  + deadline.WIND_DOWN_SECONDS + CLOSE_SECONDS + PING_SECONDS
                                  + HISTORY_SECONDS) == 56.5


# --- systemd ----------------------------------------------------------------------------------


def read_unit(path: Path) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    unit.read_string(path.read_text())
    return unit


def seconds(value: str) -> float:
    """A systemd time span of the forms used here: "55", "55s", "1min", "1min 5s"."""
    units = {"": 1, "s": 1, "sec": 1, "min": 60, "m": 60}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value)
    assert parts and "".join(n + u for n, u in parts) == value.replace(" ", ""), value
    return sum(float(n) * units[u] for n, u in parts)


def test_the_service_runs_availability_cron_refresh_once_per_start():
    service = read_unit(SERVICE)["Service"]

    argv = shlex.split(service["ExecStart"])

    assert service["Type"] == "oneshot"
    assert argv[0].startswith("/") and Path(argv[0]).name == "availability-cron"
    assert argv[1:] == ["refresh"]


def test_the_service_lets_a_run_reach_its_worst_case_and_kills_a_wedged_one_within_the_minute():
    service = read_unit(SERVICE)["Service"]

    assert WORST_CASE_SECONDS < seconds(service["TimeoutStartSec"]) < 60
    assert seconds(service["TimeoutStopSec"]) < 60


def test_the_service_counts_only_exit_0_as_success():
    service = read_unit(SERVICE)["Service"]

    assert not {"1", "2"} & set(service.get("SuccessExitStatus", "").split())


def test_the_service_runs_as_a_dedicated_user_with_settings_from_a_root_only_env_file():
    service = read_unit(SERVICE)["Service"]

    assert service["User"] not in ("", "root", "0")
    assert service["EnvironmentFile"] == "/etc/availability-cron/env"  # no "-": must exist


def test_the_service_is_hardened():
    service = read_unit(SERVICE)["Service"]

    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert service["ProtectHome"] in ("yes", "read-only", "tmpfs")
    assert service["PrivateTmp"] == "yes"
    assert service["CapabilityBoundingSet"] == ""
    # The run reads /proc/uptime to count its budget from process start.
    assert service.get("ProcSubset", "all") == "all"


def test_the_timer_starts_the_service_on_every_minute_without_catching_up():
    unit = read_unit(TIMER)
    timer = unit["Timer"]

    assert timer["OnCalendar"] == "*-*-* *:*:00"
    assert seconds(timer["AccuracySec"]) <= 1
    assert timer["Persistent"] == "false"
    assert timer["Unit"] == SERVICE.name
    assert unit["Install"]["WantedBy"] == "timers.target"


SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(SYSTEMD_ANALYZE is None,
                                           reason="systemd-analyze is not installed")


@needs_systemd_analyze
def test_systemd_accepts_both_units_without_a_warning(tmp_path):
    # verify checks that ExecStart is executable: point it at this checkout's command.
    for unit in (SERVICE, TIMER):
        text = unit.read_text().replace("/opt/availability-cron/.venv/bin/availability-cron",
                                        CLI)
        (tmp_path / unit.name).write_text(text)

    result = subprocess.run(
        [str(SYSTEMD_ANALYZE), "verify", "--man=no", str(tmp_path / TIMER.name),
         str(tmp_path / SERVICE.name)],
        capture_output=True, text=True, timeout=60,
    )

    ours = [line for line in (result.stdout + result.stderr).splitlines()
            if str(tmp_path) in line or "availability-cron" in line]
    assert result.returncode == 0, result.stderr
    assert ours == [], ours


@needs_systemd_analyze
def test_systemd_reads_the_timer_schedule_as_once_a_minute_on_the_minute():
    on_calendar = read_unit(TIMER)["Timer"]["OnCalendar"]

    result = subprocess.run(
        [str(SYSTEMD_ANALYZE), "calendar", "--iterations=3", on_calendar],
        capture_output=True, text=True, timeout=60,
    )

    assert result.returncode == 0, result.stderr
    stamps = [datetime.fromisoformat(s) for s in
              re.findall(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", result.stdout)]
    assert len(stamps) >= 3, result.stdout
    assert all(s.second == 0 for s in stamps)
    assert {(b - a).total_seconds() for a, b in zip(stamps, stamps[1:], strict=False)} == {60}


# --- Kubernetes ----------------------------------------------------------------------------------


def parse_yaml_subset(text: str) -> Any:
    """Parse block-style YAML: mappings, sequences, JSON-style flow lists, quoted or plain
    scalars, comments. Raises ValueError on anything else (flow maps, anchors, tags,
    block scalars, tabs, odd indentation, duplicate keys) instead of misreading it."""
    lines: list[tuple[int, int, str]] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        body = _strip_comment(raw).rstrip()
        if not body.strip() or (body == "---" and not lines):
            continue
        if "\t" in raw[: len(raw) - len(raw.lstrip())]:
            raise ValueError(f"line {number}: tab in indentation")
        lines.append((number, len(body) - len(body.lstrip(" ")), body.strip()))
    if not lines:
        return None
    value, end = _block(lines, 0, lines[0][1])
    if end != len(lines):
        raise ValueError(f"line {lines[end][0]}: unexpected indentation")
    return value


def _strip_comment(line: str) -> str:
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[:i]
    return line


_KEY = re.compile(r"^([A-Za-z0-9_./-]+):(?: (.*))?$")


def _block(lines: list[tuple[int, int, str]], i: int, indent: int) -> tuple[Any, int]:
    if lines[i][2] == "-" or lines[i][2].startswith("- "):
        return _sequence(lines, i, indent)
    return _mapping(lines, i, indent)


def _mapping(lines: list[tuple[int, int, str]], i: int, indent: int) -> tuple[Any, int]:
    out: dict[str, Any] = {}
    while i < len(lines) and lines[i][1] >= indent:
        number, at, text = lines[i]
        match = _KEY.match(text)
        if at != indent or not match:
            raise ValueError(f"line {number}: expected 'key: value' at column {indent}")
        key, rest = match.group(1), (match.group(2) or "").strip()
        if key in out:
            raise ValueError(f"line {number}: duplicate key {key!r}")
        i += 1
        if rest:
            out[key] = _scalar(rest, number)
        elif i < len(lines) and lines[i][1] > indent:
            out[key], i = _block(lines, i, lines[i][1])
        else:
            out[key] = None
    return out, i


def _sequence(lines: list[tuple[int, int, str]], i: int, indent: int) -> tuple[Any, int]:
    out: list[Any] = []
    while i < len(lines) and lines[i][1] >= indent:
        number, at, text = lines[i]
        if at != indent or not (text == "-" or text.startswith("- ")):
            raise ValueError(f"line {number}: expected '- item' at column {indent}")
        rest = text[1:].strip()
        if not rest:
            if not (i + 1 < len(lines) and lines[i + 1][1] > indent):
                raise ValueError(f"line {number}: empty item")
            item, i = _block(lines, i + 1, lines[i + 1][1])
        elif _KEY.match(rest):  # "- key: value" starts a mapping two columns in
            lines[i] = (number, indent + 2, rest)
            item, i = _mapping(lines, i, indent + 2)
        else:
            item, i = _scalar(rest, number), i + 1
        out.append(item)
    return out, i


def _scalar(text: str, number: int) -> Any:
    if text.startswith('"'):
        return json.loads(text)
    if text.startswith("'") and text.endswith("'") and len(text) >= 2:
        return text[1:-1].replace("''", "'")
    if text.startswith("["):
        value = json.loads(text)  # a flow list, written in its JSON form
        if not isinstance(value, list):
            raise ValueError(f"line {number}: not a list: {text}")
        return value
    if text[0] in "{&*!|>%@`" or ": " in text:
        raise ValueError(f"line {number}: unsupported YAML: {text}")
    if text in ("true", "false"):
        return text == "true"
    if text in ("null", "~"):
        return None
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    return text


@pytest.mark.parametrize("text", [
    "a: {b: 1}\n", "a: &x 1\n", "a: |\n  text\n", "a: 1\na: 2\n", "a:\n\tb: 1\n",
    "a:\n  b: 1\n   c: 2\n", "a:\n  - 1\n  b: 2\n",
])
def test_the_yaml_reader_refuses_what_it_does_not_understand(text):
    with pytest.raises(ValueError):
        parse_yaml_subset(text)


def test_the_yaml_reader_reads_nested_mappings_and_lists():
    text = 'a:\n  b: "x y"  # note\n  c:\n    - d: 1\n      e: [\"f\", \"g\"]\n    - h\n'

    assert parse_yaml_subset(text) == {"a": {"b": "x y", "c": [{"d": 1, "e": ["f", "g"]}, "h"]}}


@pytest.fixture(scope="module")
def cronjob() -> dict[str, Any]:
    doc = parse_yaml_subset(CRONJOB.read_text())
    assert (doc["apiVersion"], doc["kind"]) == ("batch/v1", "CronJob")
    return doc  # type: ignore[no-any-return]


def pod_spec(cronjob: dict[str, Any]) -> dict[str, Any]:
    return cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def test_the_cronjob_runs_every_minute_never_two_at_once_and_never_replays_a_backlog(cronjob):
    spec = cronjob["spec"]

    assert spec["schedule"] == "* * * * *"
    assert spec["concurrencyPolicy"] == "Forbid"
    # Below 10 s the controller may miss every start; at 60 s or more a late start could
    # overlap the next tick's.
    assert 10 <= spec["startingDeadlineSeconds"] < 60
    assert 1 <= spec["failedJobsHistoryLimit"] <= 5
    assert spec["successfulJobsHistoryLimit"] <= 5


def test_the_cronjob_never_retries_a_run_and_kills_only_a_wedged_one(cronjob):
    job = cronjob["spec"]["jobTemplate"]["spec"]

    assert job["backoffLimit"] == 0
    assert pod_spec(cronjob)["restartPolicy"] == "Never"
    assert WORST_CASE_SECONDS < job["activeDeadlineSeconds"] < 60


def test_the_cronjob_container_runs_availability_cron_refresh_with_settings_from_a_secret(
    cronjob,
):
    (container,) = pod_spec(cronjob)["containers"]

    assert container["command"] == ["availability-cron", "refresh"]
    assert "args" not in container
    assert any(source.get("secretRef", {}).get("name") for source in container["envFrom"])
    inline = {env["name"] for env in container.get("env", []) if "value" in env}
    assert not inline & {"DATABASE_URL", "AVAILABILITY_CRON_PING_URL",
                         "AVAILABILITY_CRON_LOCK_DATABASE_URL"}


def test_the_cronjob_runs_unprivileged_on_a_read_only_root_with_bounded_resources(cronjob):
    pod = pod_spec(cronjob)
    (container,) = pod["containers"]

    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["automountServiceAccountToken"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert "memory" in container["resources"]["limits"]


def test_a_run_stopped_by_sigterm_has_time_to_report_before_sigkill(cronjob):
    # systemd (systemctl stop, or TimeoutStartSec) and Kubernetes (activeDeadlineSeconds,
    # a pod deletion) send SIGTERM, then SIGKILL after their stop window; the run's stop
    # path (write what finished, close providers, /fail ping, run history) must fit it.
    service = read_unit(SERVICE)["Service"]

    assert deadline.stop_seconds() < seconds(service["TimeoutStopSec"]) < 60
    assert deadline.stop_seconds() < pod_spec(cronjob)["terminationGracePeriodSeconds"] < 60
