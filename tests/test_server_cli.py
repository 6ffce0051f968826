"""The local server's command line as a new user meets it: the export line, a stable key, help, dashboard."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import requests

from airflow_provider_modelroute.hooks.modelroute import ModelRouteHook
from airflow_provider_modelroute.testing.__main__ import STABLE_API_KEY, _parser


@contextmanager
def cli(*args: str, terminal: bool = True) -> Iterator[tuple[dict[str, Any], str]]:
    """Run the CLI; yield its JSON line and what it shows on stderr (a terminal, as a person runs it)."""
    leader, follower = pty.openpty() if terminal else os.pipe()
    process = subprocess.Popen(
        [sys.executable, "-m", "airflow_provider_modelroute.testing", *args],
        stdout=subprocess.PIPE,
        stderr=follower,
        text=True,
    )
    os.close(follower)
    try:
        assert process.stdout is not None
        info = json.loads(process.stdout.readline())  # printed once the server is ready
        shown = b""
        while not shown.rstrip().endswith((b"Ctrl+C.", b"_admin).")):  # the last line of the message
            shown += os.read(leader, 65536)
        yield info, shown.decode().replace("\r\n", "\n")
    finally:
        process.terminate()
        code = process.wait(timeout=120)  # a loaded machine is slow, not broken
        os.close(leader)
        assert code == 0


def export_line_of(shown: str) -> str:
    [line] = [line for line in shown.splitlines() if line.startswith("export ")]
    return line


def exported(line: str) -> dict[str, str]:
    """What the shell defines when it runs the line (a real shell, not our parsing)."""
    script = f'{line}\nprintf %s "$AIRFLOW_CONN_MODELROUTE_DEFAULT"'
    value = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout
    return {"AIRFLOW_CONN_MODELROUTE_DEFAULT": value}


def test_the_export_line_makes_a_working_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    with cli("--stable-key") as (info, shown):
        env = exported(export_line_of(shown))
        conn = json.loads(env["AIRFLOW_CONN_MODELROUTE_DEFAULT"])
        assert conn["host"] == info["base_url"] and conn["password"] == STABLE_API_KEY
        assert conn["extra"] == {"allow_insecure_storage_urls": True, "dashboard_url": info["base_url"]}
        monkeypatch.setenv("AIRFLOW_CONN_MODELROUTE_DEFAULT", env["AIRFLOW_CONN_MODELROUTE_DEFAULT"])
        hook = ModelRouteHook()
        assert hook.test_connection() == (True, f"Connected to ModelRoute at {info['base_url']}")

        execution = hook.create_execution("test-image", {"prompt": "a lighthouse"})
        page = requests.get(hook.execution_url(execution["id"]), timeout=10)  # the extra link's target
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert execution["id"] in page.text and "Status:" in page.text
        assert requests.get(f"{info['base_url']}/executions/exec_unknown", timeout=10).status_code == 404


def test_stable_key_survives_a_restart() -> None:
    with cli("--stable-key") as (first, _):
        pass
    with cli("--stable-key") as (second, _):
        pass
    assert first["api_key"] == second["api_key"] == STABLE_API_KEY
    with cli() as (fresh, _):
        assert fresh["api_key"] != STABLE_API_KEY  # without the flag, a new random key each time


def test_a_log_file_gets_no_key() -> None:
    with cli(terminal=False) as (info, shown):
        assert shown.startswith(f"ModelRoute local server ready at {info['base_url']}")
        assert info["api_key"] not in shown and "export " not in shown


def test_every_flag_has_help() -> None:
    undocumented = [a.dest for a in _parser()._actions if not a.help]
    assert undocumented == []
