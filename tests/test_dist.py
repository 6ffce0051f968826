"""The built wheel, installed as a user installs it (plain pip, a fresh venv, Airflow pinned), runs the
README's first DAG, taken from the README text, to a file that lands on disk.

Slow (one Airflow install per version): `make test-dist` runs it on the wheel `make dist` built
(``MODELROUTE_WHEEL``); without it the test builds one. The local ModelRoute server runs from the
development environment in a process of its own, so the fresh venv holds only the wheel and what
pip resolves for it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from airflow_provider_modelroute.testing.remote import RemoteModelRouteServer
from tests.conftest import REPO
from tests.test_readme import FIRST_DAG, LOCAL_DESTINATION, quickstart_block
from tests.test_server_cli import cli
from tests.waiting import wait_for

pytestmark = [
    pytest.mark.dist,
    # kept out of `make test` (which deselects drills), as the other slow end-to-end tests are
    pytest.mark.drill,
    pytest.mark.timeout(1800),
]

#: What each Airflow needs pinned beside it when installed without its constraints file.
AIRFLOW_PINS = {
    "3.3.2": [],
    # cryptography 51 drops MultiFernet attributes Airflow 2.11 sets: every encrypted connection fails
    "2.11.2": ["cryptography<51"],
}
SERVER_COMMAND = "python -m airflow_provider_modelroute.testing "


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.environ.get("MODELROUTE_WHEEL"):
        return Path(os.environ["MODELROUTE_WHEEL"]).resolve()
    uv = shutil.which("uv") or str(REPO / ".uv" / "bin" / "uv")
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([uv, "build", "--quiet", "--wheel", "--out-dir", str(out), str(REPO)], check=True)
    (built,) = out.glob("*.whl")
    return built


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def local_server(command_line: str, port: int) -> Iterator[RemoteModelRouteServer]:
    """The README's server command, run by the development environment's Python, until it is ready."""
    args = command_line.removeprefix(SERVER_COMMAND).split(">")[0].replace("9494", str(port)).split()
    with cli(*args, terminal=False) as (info, _):
        yield RemoteModelRouteServer(info["admin_url"])


@pytest.mark.parametrize("airflow_version", list(AIRFLOW_PINS))
def test_wheel_runs_the_readme_first_dag(wheel: Path, airflow_version: str, tmp_path: Path) -> None:
    venv, home, out = tmp_path / "venv", tmp_path / "airflow", tmp_path / "images"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    started = time.monotonic()
    python = str(venv / "bin" / "python")
    requirements = [str(wheel), f"apache-airflow=={airflow_version}", *AIRFLOW_PINS[airflow_version]]
    pip = subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *requirements],
        capture_output=True,
        text=True,
    )
    pip_seconds = time.monotonic() - started
    assert pip.returncode == 0, pip.stderr[-4000:]
    record = REPO / "build" / "test-dist.txt"
    record.parent.mkdir(exist_ok=True)
    with record.open("a") as f:
        f.write(f"Airflow {airflow_version}: pip install of the wheel took {pip_seconds:.0f} s\n")
    installed = subprocess.run(
        [python, "-m", "pip", "list", "--format=json"],
        capture_output=True,
        text=True,
        check=True,
    )
    packages = {p["name"].lower(): p["version"] for p in json.loads(installed.stdout)}
    assert packages["apache-airflow"] == airflow_version
    assert packages["airflow-provider-modelroute"] == wheel.name.split("-")[1]

    # "Save this as $AIRFLOW_HOME/dags/daily_images.py", its output moved into this test's folder
    (home / "dags").mkdir(parents=True)
    (home / "dags" / "daily_images.py").write_text(FIRST_DAG.replace(LOCAL_DESTINATION, f"{out.as_uri()}/"))

    server_line, *commands = quickstart_block().splitlines()
    assert server_line.startswith(SERVER_COMMAND)
    port = free_port()
    script = (
        "\n".join(commands)
        .replace("9494", str(port))
        .replace(LOCAL_DESTINATION.removeprefix("file://"), f"{out}/")
    )
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "VIRTUAL_ENV", "PYTHON"))},
        "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    }
    with local_server(server_line, port) as server:
        run = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=1200,
        )
        assert run.returncode == 0, f"the quickstart failed:\n{run.stdout[-6000:]}\n{run.stderr[-6000:]}"
        (landed,) = wait_for("the output file", lambda: [p for p in out.rglob("*") if p.is_file()])
        assert landed.read_bytes().startswith(b"\x89PNG")
        assert run.stdout.strip().endswith(landed.name)  # the README's `ls` shows it
        (execution_id,) = server.execution_ids()
        file_id = server.execution(execution_id)["result"]["file_id"]
        assert landed.name == f"{file_id}.png"
        assert hashlib.sha256(landed.read_bytes()).hexdigest() == server.file_info(file_id)["sha256"]
