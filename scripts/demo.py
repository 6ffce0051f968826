"""`make demo`: run the example DAG end to end against the local ModelRoute server (no API key).

Starts the local server, points ``modelroute_default`` at it, runs
``airflow dags test example_modelroute_generate_and_store`` in a throwaway AIRFLOW_HOME, and prints a
short summary: the DAG run's state, the execution, the file that landed (checked against the server's
sha256), how long it took, and the log file that holds Airflow's full output.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from airflow_provider_modelroute import api
from airflow_provider_modelroute.testing import ModelRouteServer

REPO = Path(__file__).resolve().parent.parent
DAG_ID = "example_modelroute_generate_and_store"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def airflow(*args: str, env: dict[str, str], log: Path) -> None:
    """Run an ``airflow`` CLI command with its output appended to ``log``; exit with its tail if it fails."""
    with log.open("a") as out:
        out.write(f"\n$ airflow {' '.join(args)}\n")
        out.flush()
        result = subprocess.run(
            [sys.executable, "-m", "airflow", *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            check=False,
        )
    if result.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        sys.exit(f"{tail}\n\n`airflow {' '.join(args)}` failed (exit {result.returncode}); full log: {log}")


def main() -> None:
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="modelroute-demo-"))
    destination = work / "images"
    log = work / "demo.log"
    print(f"Running {DAG_ID} with `airflow dags test` against the local ModelRoute server (~30 s)...")
    with ModelRouteServer(pending_seconds=0.5, processing_seconds=1.5) as server:
        env = {
            **os.environ,
            **server.airflow_connection_env(),
            "AIRFLOW_HOME": str(work / "airflow-home"),
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "example_dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        }
        airflow("db", "migrate", env=env, log=log)
        conf = json.dumps({"destination": f"{destination.as_uri()}/"})
        airflow("dags", "test", DAG_ID, "--conf", conf, env=env, log=log)
        stats = server.stats()
        executions = [server.execution(e) for e in server.execution_ids()]
        true_sha256 = {
            f["file_id"]: server.file_info(f["file_id"])["sha256"]
            for e in executions
            for f in api.result_files(e)
        }
    finished = re.findall(r"DagRun Finished: .*?\bstate=(\w+)", log.read_text(errors="replace"))
    run_state = finished[-1] if finished else "unknown"
    images = sorted(destination.glob("*.png")) if destination.exists() else []
    if run_state != "success" or len(images) != 1 or not images[0].read_bytes().startswith(PNG_MAGIC):
        found = sorted(p.name for p in destination.iterdir()) if destination.exists() else []
        sys.exit(f"The demo failed: DAG run {run_state}, files in {destination}: {found}. Full log: {log}")
    image = images[0]
    sha256 = hashlib.sha256(image.read_bytes()).hexdigest()
    verified = (
        "matches the server's" if true_sha256.get(image.stem) == sha256 else "DIFFERS from the server's"
    )
    execution = executions[0]
    print(f"DAG run:    {run_state}")
    print(f"Execution:  {execution['id']} {execution['status']} ({stats['executions_created']} created)")
    print(f"Output:     {image}")
    print(f"            {image.stat().st_size} bytes, PNG, sha256 {sha256[:16]}... ({verified})")
    print(f"Downloaded: {stats['bytes_served']} bytes from the server's storage")
    print(f"Took:       {time.monotonic() - started:.0f} s")
    print(f"Full log:   {log}")


if __name__ == "__main__":
    main()
