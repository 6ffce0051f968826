"""Run a DAG file with ``airflow dags test`` in a fresh process, configured only by its environment.

For features Airflow sets up once per process from its configuration (OpenLineage's listener and
transport, the StatsD client): a subprocess gets them exactly as a worker would.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

AIRFLOW = str(Path(sys.executable).with_name("airflow"))


@functools.cache
def migrated_home() -> Path:
    """An ``AIRFLOW_HOME`` made as a user makes one (``airflow db migrate``), once per test session."""
    home = Path(tempfile.mkdtemp(prefix="modelroute-cli-home-"))
    atexit.register(shutil.rmtree, home, ignore_errors=True)
    env = {**os.environ, "AIRFLOW_HOME": str(home)}
    subprocess.run([AIRFLOW, "db", "migrate"], env=env, capture_output=True, check=True, timeout=600)
    return home


def run_dag_file(
    folder: Path, dag_id: str, source: str, env: dict[str, str], timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Write ``source`` as ``folder/<dag_id>.py`` and run it in ``migrated_home()``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{dag_id}.py").write_text(textwrap.dedent(source))
    full_env = {
        **os.environ,
        "AIRFLOW_HOME": str(migrated_home()),
        "AIRFLOW__CORE__DAGS_FOLDER": str(folder),
        **env,
    }
    return subprocess.run(
        [AIRFLOW, "dags", "test", dag_id],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def describe(result: subprocess.CompletedProcess[str]) -> str:
    """The end of a run's output, for assertion messages."""
    return (
        f"exit {result.returncode}\n--- stdout\n{result.stdout[-6000:]}\n--- stderr\n{result.stderr[-6000:]}"
    )
