"""The README runs as written: its Python snippets, and its first DAG on file:// and s3://."""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import textwrap
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_modelroute.testing import ModelRouteServer
from airflow_provider_modelroute.testing.dialects import Dialect
from tests.conftest import REPO, S3Bucket, needs_airflow_sdk, run_dag, task_states, xcom


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.DOTALL)


SNIPPETS = python_blocks(REPO / "README.md")
#: Whole programs of the README and docs/; a snippet without imports is a part of the one before it.
PROGRAMS = {
    f"{path.relative_to(REPO)}#{i}": snippet
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    for i, snippet in enumerate(python_blocks(path))
    if "import " in snippet
}


def test_readme_has_snippets() -> None:
    assert len(PROGRAMS) >= 4 and len(SNIPPETS) >= 2


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, marks=needs_airflow_sdk(name)) if "from airflow.sdk" in s else name
        for name, s in PROGRAMS.items()
    ],
)
def test_snippet_runs(name: str, tmp_path: Path) -> None:
    saved = dict(os.environ)
    namespace: dict = {"__name__": "snippet"}
    try:
        exec(compile(PROGRAMS[name], name, "exec"), namespace)
        tests = [f for name, f in namespace.items() if name.startswith("test_") and callable(f)]
        for test in tests:
            test(**({"tmp_path": tmp_path} if "tmp_path" in inspect.signature(test).parameters else {}))
    finally:
        os.environ.clear()
        os.environ.update(saved)
    if "DAG(" in PROGRAMS[name]:
        assert any(type(v).__name__ == "DAG" for v in namespace.values())


FIRST_DAG = next(s for s in SNIPPETS if 'DAG("daily_images"' in s)
#: The README's S3 variant: the store task that replaces the first DAG's.
S3_STORE = next(s for s in SNIPPETS if "s3://my-bucket" in s)
LOCAL_DESTINATION = "file:///tmp/modelroute/images/"


def first_dag(dag_id: str, destination_root: str, s3: bool = False) -> Any:
    """The README's first DAG (its S3 variant if asked), its output moved under ``destination_root``."""
    text = FIRST_DAG.replace('"daily_images"', f'"{dag_id}"')
    if s3:
        local_store = re.search(r"^    store = .*?^    \)\n", text, flags=re.M | re.S)
        assert local_store is not None
        text = text.replace(local_store.group(0), textwrap.indent(S3_STORE, "    "))
    namespace: dict = {}
    exec(compile(text.replace(LOCAL_DESTINATION, destination_root), "README.md", "exec"), namespace)
    return namespace["dag"]


def test_first_dag_needs_no_logical_date() -> None:
    """A manual run on Airflow 3 has no logical date: the first DAG must not use one."""
    for variable in ("ds", "ds_nodash", "logical_date", "execution_date", "ts"):
        assert not re.search(r"{{[^}]*\b" + variable + r"\b", FIRST_DAG + S3_STORE), variable
    assert "{{ run_id }}" in FIRST_DAG and LOCAL_DESTINATION in FIRST_DAG
    assert "airflow.sdk" not in FIRST_DAG.replace("airflow.providers.common.compat.sdk", "")


@pytest.mark.usefixtures("airflow_db")
@pytest.mark.parametrize("deferrable", [True, False], ids=["deferrable", "in-worker"])
def test_first_dag_runs_in_every_dialect(
    server: ModelRouteServer, dialect: Dialect, tmp_path: Path, deferrable: bool
) -> None:
    dag = first_dag(f"daily_images_{dialect.name}_{deferrable}", f"{tmp_path.as_uri()}/")
    dag.get_task("generate").deferrable = deferrable
    dag.get_task("generate").poll_interval = 0.05
    dr = run_dag(dag)
    assert dr.state == "success", task_states(dr)
    assert task_states(dr) == {"generate": "success", "store": "success"}
    assert server.stats()["executions_created"] == 1
    (stored,) = xcom(dr, "store")
    (landed,) = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert landed.parent.name == dr.run_id  # one folder per run
    assert hashlib.sha256(landed.read_bytes()).hexdigest() == stored["sha256"]
    assert stored["sha256"] == server.file_info(stored["file_id"])["sha256"]


@pytest.mark.usefixtures("airflow_db")
def test_first_dag_stores_on_s3(
    server: ModelRouteServer, s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's S3 lines, on a moto bucket standing in for ``my-bucket`` (as ``aws_default``)."""
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", os.environ[f"AIRFLOW_CONN_{s3_bucket.conn_id.upper()}"])
    dag = first_dag("daily_images_s3", LOCAL_DESTINATION, s3=True)
    store = dag.get_task("store")
    assert store.destination_conn_id == "aws_default"
    store.destination = store.destination.replace("my-bucket", s3_bucket.name)
    dag.get_task("generate").poll_interval = 0.05
    dr = run_dag(dag)
    assert dr.state == "success", task_states(dr)
    (stored,) = xcom(dr, "store")
    (key,) = s3_bucket.keys("images/")
    assert stored["sha256"] == server.file_info(stored["file_id"])["sha256"]
    assert hashlib.sha256(s3_bucket.read(key)).hexdigest() == stored["sha256"]


# --- the quickstart block: tests/test_dist.py runs it on the built wheel ------------------------

QUICKSTART_MARK = "<!-- readme-test: quickstart"


def quickstart_block() -> str:
    text = (REPO / "README.md").read_text()
    after = text[text.index(QUICKSTART_MARK) :]
    return after[after.index("```sh\n") + len("```sh\n") : after.index("\n```", after.index("```sh"))]


def test_quickstart_block_is_what_the_wheel_test_runs() -> None:
    lines = quickstart_block().splitlines()
    assert lines[0].startswith("python -m airflow_provider_modelroute.testing ")
    assert any(line.startswith("export AIRFLOW_CONN_MODELROUTE_DEFAULT=") for line in lines)
    assert "airflow db migrate" in lines and "airflow dags test daily_images" in lines


def test_quickstart_connection_line_matches_the_stable_key() -> None:
    """The README's fixed connection line is what ``--port 9494 --stable-key`` serves."""
    from airflow_provider_modelroute.testing.__main__ import STABLE_API_KEY

    (line,) = [line for line in quickstart_block().splitlines() if line.startswith("export AIRFLOW_CONN_")]
    conn = json.loads(line.split("=", 1)[1].strip("'"))
    assert conn["password"] == STABLE_API_KEY
    assert conn["host"] == "http://127.0.0.1:9494"
