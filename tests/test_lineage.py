"""OpenLineage: what apache-airflow-providers-openlineage really emits for a generate-then-store DAG.

The DAG runs with ``airflow dags test`` in its own process, with OpenLineage's file transport set
through the environment (as a deployment would set it); the test reads the emitted events back.
"""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
from packaging.version import Version

from airflow_provider_modelroute.testing import ModelRouteServer
from tests.airflow_cli import describe, run_dag_file
from tests.conftest import S3Bucket

pytest.importorskip("airflow.providers.openlineage", reason="apache-airflow-providers-openlineage")
if Version(version("apache-airflow-providers-openlineage")) < Version("2.20"):
    # written against 2.20; with 2.4 (the lowest-dependency cell) its file transport wrote no events
    pytest.skip("needs apache-airflow-providers-openlineage 2.20+", allow_module_level=True)

DAG_SOURCE = """
from datetime import datetime

from airflow.providers.common.compat.sdk import DAG

from airflow_provider_modelroute.operators.modelroute import ModelRouteExecuteOperator
from airflow_provider_modelroute.transfers.modelroute import (
    ModelRouteToStorageOperator,
    StorageToModelRouteOperator,
)

with DAG("{dag_id}", schedule=None, start_date=datetime(2026, 1, 1)):
    upload = StorageToModelRouteOperator(task_id="upload", source="{source}")
    generate = ModelRouteExecuteOperator(
        task_id="generate",
        model="flux-1.1-pro",
        input={{"prompt": "the same at night", "image": "{{{{ ti.xcom_pull(task_ids='upload') }}}}"}},
        poll_interval=0.1,
    )
    store = ModelRouteToStorageOperator(
        task_id="store",
        execution_id="{{{{ ti.xcom_pull(task_ids='generate', key='execution_id') }}}}",
        destination="s3://{bucket}/images/",
        destination_conn_id="{conn_id}",
    )
    upload >> generate >> store
"""


def task_events(events: list[dict[str, Any]], task_id: str, event_type: str) -> dict[str, Any]:
    found = [e for e in events if e["eventType"] == event_type and e["job"]["name"].endswith(f".{task_id}")]
    assert found, (
        f"no {event_type} event for {task_id}; got {[(e['eventType'], e['job']['name']) for e in events]}"
    )
    return found[-1]


def datasets(event: dict[str, Any], side: str) -> list[tuple[str, str]]:
    return [(d["namespace"], d["name"]) for d in event[side]]


def test_generate_then_store_reports_input_produced_file_and_destination(
    server: ModelRouteServer, s3_bucket: S3Bucket, tmp_path: Path
) -> None:
    source = tmp_path / "in" / "photo.png"
    source.parent.mkdir()
    source.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    events_file = tmp_path / "openlineage.jsonl"
    dag_id = "lineage_generate_then_store"
    result = run_dag_file(
        tmp_path / "dags",
        dag_id,
        DAG_SOURCE.format(
            dag_id=dag_id, source=f"file://{source}", bucket=s3_bucket.name, conn_id=s3_bucket.conn_id
        ),
        {
            "AIRFLOW__OPENLINEAGE__TRANSPORT": json.dumps(
                {"type": "file", "log_file_path": str(events_file), "append": True}
            ),
            "AIRFLOW__OPENLINEAGE__NAMESPACE": "lineage-test",
        },
    )
    assert result.returncode == 0, describe(result)
    assert events_file.exists(), f"OpenLineage wrote no events\n{describe(result)}"
    events = [json.loads(line) for line in events_file.read_text().splitlines() if line.strip()]

    [execution_id] = server.execution_ids()
    produced = server.execution(execution_id)["result"]["file_id"]
    api = f"modelroute://{server.base_url.removeprefix('http://')}"
    [key] = s3_bucket.keys("images/")

    upload = task_events(events, "upload", "COMPLETE")
    assert datasets(upload, "inputs") == [("file", str(source).lstrip("/"))]
    [(namespace, uploaded)] = datasets(upload, "outputs")
    assert namespace == api and uploaded.startswith("file_")

    start = task_events(events, "generate", "START")
    assert datasets(start, "inputs") == [(api, uploaded)]  # the rendered input's file reference
    assert start["job"]["facets"]["modelroute"]["model"] == "flux-1.1-pro"
    generate = task_events(events, "generate", "COMPLETE")
    assert datasets(generate, "inputs") == [(api, uploaded)]
    assert datasets(generate, "outputs") == [(api, produced)]
    run_facets = generate["run"]["facets"]
    assert run_facets["externalQuery"] == {
        **run_facets["externalQuery"],
        "externalQueryId": execution_id,
        "source": "modelroute",
    }
    assert run_facets["modelroute_execution"]["cost"] == "0.040"

    store = task_events(events, "store", "COMPLETE")
    assert datasets(store, "inputs") == [(api, produced)]
    assert datasets(store, "outputs") == [(f"s3://{s3_bucket.name}", key)]
    assert store["outputs"][0]["outputFacets"]["outputStatistics"]["size"] == len(s3_bucket.read(key))
