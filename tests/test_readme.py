"""The README's Python snippets run as written (a DAG definition parses; test snippets pass)."""

from __future__ import annotations

import inspect
import os
import re
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
    tmp_path: Path,
    deferrable: bool,
) -> None:
    dag_id = f"daily_images_{dialect.name}_{deferrable}"
    namespace: dict = {}
    exec(compile(FIRST_DAG.replace('"daily_images"', f'"{dag_id}"'), "README.md", "exec"), namespace)
    dag = namespace["dag"]
    dag.get_task("generate").deferrable = deferrable
    dag.get_task("generate").poll_interval = 0.05
    # the README's destinations, moved to a moto bucket (as aws_default) and a temporary folder
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", os.environ[f"AIRFLOW_CONN_{s3_bucket.conn_id.upper()}"])
    to_s3, to_local = dag.get_task("to_s3"), dag.get_task("to_local")
    to_s3.destination = to_s3.destination.replace("my-bucket", s3_bucket.name)
    to_local.destination = to_local.destination.replace("file:///data", tmp_path.as_uri())
    dr = run_dag(dag)
    assert dr.state == "success", task_states(dr)
    assert task_states(dr) == {"generate": "success", "to_s3": "success", "to_local": "success"}
    assert server.stats()["executions_created"] == 1
    (on_s3,), (local,) = xcom(dr, "to_s3"), xcom(dr, "to_local")
    assert on_s3["sha256"] == local["sha256"] == server.file_info(on_s3["file_id"])["sha256"]
    assert len(s3_bucket.keys("images/")) == 1 and len(list(tmp_path.rglob("*.png"))) == 1
