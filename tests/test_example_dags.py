"""The example DAGs import cleanly and run to success against the local server, in every dialect."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_modelroute.testing import ModelRouteServer
from airflow_provider_modelroute.testing.dialects import Dialect
from tests.conftest import REPO, dag_bag, run_dag, task_states, xcom

pytestmark = pytest.mark.usefixtures("airflow_db")

EXAMPLES = REPO / "example_dags"


@pytest.fixture(scope="module")
def dagbag() -> Any:
    """The example DAGs, polling every 0.1 s instead of every 5 s (the local server is fast)."""
    bag = dag_bag(EXAMPLES)
    for dag in bag.dags.values():
        for task in dag.tasks:
            for name in ("poll_interval", "poke_interval"):
                if name in getattr(task, "partial_kwargs", {}):
                    task.partial_kwargs[name] = 0.1
                elif hasattr(task, name):
                    setattr(task, name, 0.1)
    return bag


def test_examples_import_without_errors(dagbag: Any) -> None:
    assert dagbag.import_errors == {}
    assert set(dagbag.dag_ids) == {
        "example_modelroute_generate_and_store",
        "example_modelroute_batch",
        "example_modelroute_image_to_image",
        "example_modelroute_taskflow",
        "example_modelroute_on_new_images",
        "example_modelroute_land_outside_executions",
    }


def stored_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def assert_matches_server(server: ModelRouteServer, stored: list[dict], folder: Path) -> None:
    files = stored_files(folder)
    assert [Path(item["uri"].removeprefix("file://")).name for item in stored] == [p.name for p in files]
    for item, path in zip(stored, files, strict=True):
        assert hashlib.sha256(path.read_bytes()).hexdigest() == item["sha256"]
        assert item["sha256"] == server.file_info(item["file_id"])["sha256"]


def test_generate_and_store(server: ModelRouteServer, dialect: Dialect, dagbag: Any, tmp_path: Path) -> None:
    dag = dagbag.get_dag("example_modelroute_generate_and_store")
    dr = run_dag(dag, run_conf={"prompt": "a test lighthouse", "destination": f"{tmp_path.as_uri()}/"})
    assert dr.state == "success"
    assert task_states(dr) == {
        "submit": "success",
        "wait": "success",
        "store": "success",
        "report": "success",
    }
    stored = xcom(dr, "store")
    assert len(stored) == 1 and stored[0]["content_type"] == "image/png"
    assert_matches_server(server, stored, tmp_path)
    execution = server.execution(xcom(dr, "submit", "execution_id"))
    assert execution["input"] == {"prompt": "a test lighthouse"}
    assert server.stats()["executions_created"] == 1


def run_mapped(server: ModelRouteServer, dag: Any, source_task: str, tmp_path: Path) -> Any:
    """Run a DAG that generates and stores one image per prompt: each mapped item once, all succeed."""
    prompts = ["one", "two", "three"]
    dr = run_dag(dag, run_conf={"prompts": prompts, "destination": f"{tmp_path.as_uri()}/"})
    assert dr.state == "success"
    states = [(ti.task_id, ti.map_index, str(ti.state)) for ti in dr.get_task_instances()]
    assert sorted(s for s in states if s[0] != source_task) == [
        (task, index, "success") for task in ("generate", "store") for index in range(3)
    ]
    assert server.stats()["executions_created"] == 3
    assert sorted(server.execution(e)["input"]["prompt"] for e in server.execution_ids()) == sorted(prompts)
    return dr


def test_batch_with_mapping_and_pool(
    server: ModelRouteServer, dialect: Dialect, dagbag: Any, tmp_path: Path
) -> None:
    from airflow.models.pool import Pool

    Pool.create_or_update_pool(
        "modelroute_api", slots=2, description="ModelRoute API", include_deferred=False
    )
    dr = run_mapped(server, dagbag.get_dag("example_modelroute_batch"), "inputs", tmp_path)
    assert all(ti.pool == "modelroute_api" for ti in dr.get_task_instances() if ti.task_id != "inputs")
    assert len(stored_files(tmp_path)) == 3


def test_image_to_image(server: ModelRouteServer, dialect: Dialect, dagbag: Any, tmp_path: Path) -> None:
    dag = dagbag.get_dag("example_modelroute_image_to_image")
    source = tmp_path / "in" / "sample.png"
    out = tmp_path / "out"
    dr = run_dag(dag, run_conf={"source": source.as_uri(), "destination": f"{out.as_uri()}/"})
    assert dr.state == "success"
    assert set(task_states(dr).values()) == {"success"}
    file_id = xcom(dr, "upload")
    assert file_id.startswith("file_")
    assert server.file_info(file_id)["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    execution = server.execution(xcom(dr, "transform", "execution_id"))
    assert execution["input"]["image"] == file_id
    assert_matches_server(server, xcom(dr, "store"), out)
    assert server.stats()["executions_created"] == 1


def test_taskflow_mapping(server: ModelRouteServer, dialect: Dialect, dagbag: Any, tmp_path: Path) -> None:
    dr = run_mapped(server, dagbag.get_dag("example_modelroute_taskflow"), "prompts", tmp_path)
    stored = [item for index in range(3) for item in xcom(dr, "store", map_index=index)]
    assert_matches_server(server, sorted(stored, key=lambda item: Path(item["uri"]).name), tmp_path)
