"""The README runs as written: its Python snippets, and its quickstart from install to s3://."""

from __future__ import annotations

import contextlib
import inspect
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from airflow_provider_modelroute.testing import ModelRouteServer
from airflow_provider_modelroute.testing.dialects import Dialect
from tests.conftest import REPO, S3Bucket, needs_airflow_sdk, run_dag, task_states, xcom

SNIPPETS = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.DOTALL)


def test_readme_has_snippets() -> None:
    assert len(SNIPPETS) >= 2


@pytest.mark.parametrize(
    "index",
    [
        pytest.param(i, marks=needs_airflow_sdk(f"README snippet #{i}")) if "airflow.sdk" in s else i
        for i, s in enumerate(SNIPPETS)
    ],
)
def test_snippet_runs(index: int, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    saved = dict(os.environ)
    namespace: dict = {"__name__": f"readme_snippet_{index}"}
    try:
        exec(compile(SNIPPETS[index], f"README.md[python #{index}]", "exec"), namespace)
        tests = [f for name, f in namespace.items() if name.startswith("test_") and callable(f)]
        for test in tests:
            test(**({"tmp_path": tmp_path} if "tmp_path" in inspect.signature(test).parameters else {}))
    finally:
        os.environ.clear()
        os.environ.update(saved)
    if "DAG(" in SNIPPETS[index]:
        assert any(type(v).__name__ == "DAG" for v in namespace.values())


FIRST_DAG = next(s for s in SNIPPETS if 'DAG("daily_images"' in s)


@needs_airflow_sdk("the README's first DAG")
@pytest.mark.usefixtures("airflow_db")
@pytest.mark.parametrize("deferrable", [True, False], ids=["deferrable", "in-worker"])
def test_first_dag_runs_in_every_dialect(
    server: ModelRouteServer,
    dialect: Dialect,
    s3_bucket: S3Bucket,
    monkeypatch: pytest.MonkeyPatch,
    deferrable: bool,
) -> None:
    dag_id = f"daily_images_{dialect.name}_{deferrable}"
    namespace: dict = {}
    exec(compile(FIRST_DAG.replace('"daily_images"', f'"{dag_id}"'), "README.md", "exec"), namespace)
    dag = namespace["dag"]
    dag.get_task("generate").deferrable = deferrable
    dag.get_task("generate").poll_interval = 0.05
    # the README's destination, moved to a moto bucket (as aws_default)
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", os.environ[f"AIRFLOW_CONN_{s3_bucket.conn_id.upper()}"])
    to_s3 = dag.get_task("to_s3")
    to_s3.destination = to_s3.destination.replace("my-bucket", s3_bucket.name)
    dr = run_dag(dag)
    assert dr.state == "success", task_states(dr)
    assert task_states(dr) == {"generate": "success", "to_s3": "success"}
    assert server.stats()["executions_created"] == 1
    (on_s3,) = xcom(dr, "to_s3")
    assert on_s3["sha256"] == server.file_info(on_s3["file_id"])["sha256"]
    assert len(s3_bucket.keys("images/")) == 1


# --- the quickstart, from install to a DAG that stores to s3:// -----------------------------------

QUICKSTART_MARK = "<!-- readme-test: quickstart"


def quickstart_block() -> str:
    text = (REPO / "README.md").read_text()
    after = text[text.index(QUICKSTART_MARK) :]
    return after[after.index("```sh\n") + len("```sh\n") : after.index("\n```", after.index("```sh"))]


def uv_binary() -> str | None:
    return shutil.which("uv") or next((str(p) for p in [REPO / ".uv" / "bin" / "uv"] if p.exists()), None)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.drill  # ~3 min: a fresh virtualenv, `airflow db migrate` and a DAG run
@needs_airflow_sdk("the quickstart DAG")
def test_quickstart_runs_from_install_to_s3(tmp_path: Path, moto_s3_endpoint: str) -> None:
    """The README's commands as a new user runs them: fresh venv and AIRFLOW_HOME, S3 on moto."""
    import boto3

    uv = uv_binary()
    if uv is None:
        pytest.skip("uv is needed to install Airflow in seconds (make setup provides .uv/bin/uv)")
    s3 = boto3.client(
        "s3",
        endpoint_url=moto_s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id="x",
        aws_secret_access_key="x",
    )
    with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
        s3.create_bucket(Bucket="my-bucket")
    home, venv = tmp_path / "home", tmp_path / "venv"
    subprocess.run([uv, "venv", "--quiet", "--python", sys.executable, str(venv)], check=True)
    dag_snippet = next(s for s in SNIPPETS if '"daily_images"' in s)
    (home / "airflow" / "dags").mkdir(parents=True)
    (home / "airflow" / "dags" / "daily_images.py").write_text(dag_snippet)  # "Save this as ..."

    # What differs from a user's machine: the source is this checkout (no network), uv stands in for
    # pip (same arguments) with the Airflow under test, a free port, and S3 is moto.
    port = str(free_port())
    script = (
        quickstart_block()
        .replace("git+https://github.com/modelroute/airflow-provider-modelroute", REPO.as_uri())
        .replace(
            "pip install ", f'"{uv}" pip install --quiet "apache-airflow=={version("apache-airflow")}" ', 1
        )
        .replace("9494", port)
    )
    env = {
        **{name: value for name, value in os.environ.items() if not name.startswith("AIRFLOW")},
        "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(home),
        "VIRTUAL_ENV": str(venv),
        "UV_CACHE_DIR": os.environ.get("UV_CACHE_DIR", str(Path.home() / ".cache" / "uv")),
        "AWS_ENDPOINT_URL": moto_s3_endpoint,
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    }
    process = subprocess.Popen(
        ["bash", "-euo", "pipefail", "-c", script],
        env=env,
        cwd=home,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # the backgrounded server too: ended with the whole group below
    )
    try:
        output, _ = process.communicate(timeout=900)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
    assert process.returncode == 0, f"the quickstart failed:\n{output[-8000:]}"
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="my-bucket", Prefix="images/").get("Contents", [])]
    assert len(keys) == 1 and keys[0].endswith(".png"), keys
    assert s3.get_object(Bucket="my-bucket", Key=keys[0])["Body"].read().startswith(b"\x89PNG")
