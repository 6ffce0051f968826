"""`make demo`: run the example DAG end to end against the local ModelRoute server (no API key).

Starts the local server, points ``modelroute_default`` at it, runs
``airflow dags test example_modelroute_generate_and_store`` in a throwaway AIRFLOW_HOME, and prints
where the generated PNG landed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from airflow_provider_modelroute.testing import ModelRouteServer

REPO = Path(__file__).resolve().parent.parent
DAG_ID = "example_modelroute_generate_and_store"


def airflow(*args: str, env: dict[str, str], quiet: bool = False) -> None:
    command = [sys.executable, "-m", "airflow", *args]
    result = subprocess.run(command, env=env, capture_output=quiet, text=True, check=False)
    if result.returncode != 0:
        if quiet:
            print(result.stdout[-5000:], result.stderr[-5000:], sep="\n")
        sys.exit(f"`airflow {' '.join(args)}` failed with exit code {result.returncode}")


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="modelroute-demo-"))
    destination = work / "images"
    with ModelRouteServer(pending_seconds=0.5, processing_seconds=1.5) as server:
        env = {
            **os.environ,
            **server.airflow_connection_env(),
            "AIRFLOW_HOME": str(work / "airflow-home"),
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "example_dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        }
        print(f"Local ModelRoute server at {server.base_url}; Airflow home {env['AIRFLOW_HOME']}")
        airflow("db", "migrate", env=env, quiet=True)
        conf = json.dumps({"destination": f"{destination.as_uri()}/"})
        airflow("dags", "test", DAG_ID, "--conf", conf, env=env)
        stats = server.stats()
    images = sorted(destination.glob("*.png"))
    if len(images) != 1 or not images[0].read_bytes().startswith(b"\x89PNG\r\n\x1a\n"):
        sys.exit(f"Expected one PNG in {destination}, found {[p.name for p in destination.iterdir()]}")
    print()
    print(f"The DAG ran: {stats['executions_created']} execution, {stats['bytes_served']} bytes downloaded.")
    print(f"Output file: {images[0]} ({images[0].stat().st_size} bytes, PNG)")


if __name__ == "__main__":
    main()
