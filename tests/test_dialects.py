"""The core flows in every dialect of the local server (every reading of the docs), in real DAG runs.

One DAG per dialect: upload an input (file://), submit and wait in each mode (worker, deferred, a
sensor in poke / reschedule / deferrable mode), copy the outputs to file:// and s3:// (moto), with
exactly one execution per submitting task. Cheaper layers are parametrized over the dialects in
test_hook.py and test_server.py.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_modelroute.operators.modelroute import ModelRouteExecuteOperator
from airflow_provider_modelroute.sensors.modelroute import ModelRouteExecutionSensor
from airflow_provider_modelroute.testing import ModelRouteServer
from airflow_provider_modelroute.testing.dialects import Dialect
from airflow_provider_modelroute.transfers.modelroute import (
    ModelRouteToStorageOperator,
    StorageToModelRouteOperator,
)
from tests.conftest import S3Bucket, make_dag, run_dag, task_states, xcom

pytestmark = pytest.mark.usefixtures("airflow_db")

PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"
)
SUBMITTING = ("generate_deferred", "generate_in_worker", "submit_only")
SENSORS = {"wait_poke": {"mode": "poke"}, "wait_reschedule": {"mode": "reschedule"}, "wait_deferred": {}}


def core_flows_dag(dag_id: str, source: Path, out: Path, bucket: S3Bucket) -> Any:
    fast = {"poll_interval": 0.05, "retries": 2}
    with make_dag(dag_id) as dag:
        upload = StorageToModelRouteOperator(
            task_id="upload", source=source.as_uri(), region="EU", ttl_days=7, retries=2
        )
        image = "{{ ti.xcom_pull(task_ids='upload') }}"
        deferred = ModelRouteExecuteOperator(
            task_id="generate_deferred",
            model="flux-1.1-pro",
            input={"prompt": "a lighthouse", "image": image},
            deferrable=True,
            **fast,
        )
        in_worker = ModelRouteExecuteOperator(
            task_id="generate_in_worker", model="test-multi", input={"prompt": "two", "count": 2}, **fast
        )
        submit_only = ModelRouteExecuteOperator(
            task_id="submit_only",
            model="test-image",
            input={"prompt": "watched"},
            wait_for_completion=False,
            **fast,
        )
        sensors = [
            ModelRouteExecutionSensor(
                task_id=task_id,
                execution_id="{{ ti.xcom_pull(task_ids='submit_only', key='execution_id') }}",
                poke_interval=0.05,
                timeout=60,
                deferrable=not mode,
                **mode,
            )
            for task_id, mode in SENSORS.items()
        ]
        to_s3 = ModelRouteToStorageOperator(
            task_id="to_s3",
            execution_id="{{ ti.xcom_pull(task_ids='generate_deferred', key='execution_id') }}",
            destination=f"s3://{bucket.name}/images/",
            destination_conn_id=bucket.conn_id,
        )
        to_local = ModelRouteToStorageOperator(
            task_id="to_local",
            execution_id="{{ ti.xcom_pull(task_ids='generate_in_worker', key='execution_id') }}",
            destination=f"{out.as_uri()}/",
        )
        upload >> deferred >> to_s3
        in_worker >> to_local
        submit_only >> sensors
    return dag


def test_core_flows(
    server: ModelRouteServer,
    dialect: Dialect,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    s3_bucket: S3Bucket,
) -> None:
    source, out = tmp_path / "in.png", tmp_path / "out"
    source.write_bytes(PNG)
    dr = run_dag(core_flows_dag(request.node.name, source, out, s3_bucket))
    assert dr.state == "success", task_states(dr)
    assert set(task_states(dr).values()) == {"success"}
    assert {ti.try_number for ti in dr.get_task_instances()} == {1}  # nothing needed a task retry

    stats = server.stats()
    assert stats["executions_created"] == len(SUBMITTING)  # exactly one per submitting task
    assert sorted(server.execution(e)["model"] for e in server.execution_ids()) == sorted(
        ["flux-1.1-pro", "test-multi", "test-image"]
    )
    assert "GET /v1/files/{file_id}/url" not in stats["requests"]  # /download alone serves them
    assert stats["storage_requests_with_authorization"] == 0

    uploaded = xcom(dr, "upload")
    assert server.file_info(uploaded)["sha256"] == hashlib.sha256(PNG).hexdigest()
    if dialect.upload == "v2":  # the uploading page's fields reach a server that reads them
        assert server.file_info(uploaded)["upload"] == {
            "content_type": "image/png",
            "purpose": "INPUT",
            "region": "EU",
            "ttl_days": 7,
        }
    generated = xcom(dr, "generate_deferred")
    assert generated["status"] == "COMPLETED"
    assert server.execution(generated["id"])["input"]["image"] == uploaded

    (on_s3,) = xcom(dr, "to_s3")
    key = on_s3["uri"].removeprefix(f"s3://{s3_bucket.name}/")
    assert hashlib.sha256(s3_bucket.read(key)).hexdigest() == on_s3["sha256"]
    assert on_s3["sha256"] == server.file_info(on_s3["file_id"])["sha256"]
    local = xcom(dr, "to_local")
    assert len(local) == 2 and sorted(p.name for p in out.iterdir()) == sorted(
        f"{r['file_id']}.png" for r in local
    )
    for record in local:
        assert hashlib.sha256((out / f"{record['file_id']}.png").read_bytes()).hexdigest() == record["sha256"]

    watched = xcom(dr, "submit_only", "execution_id")
    for task_id in SENSORS:
        assert xcom(dr, task_id)["id"] == watched and xcom(dr, task_id)["status"] == "COMPLETED"
    if dialect.submit == "sync":  # the POST answered the finished execution
        assert xcom(dr, "submit_only")["status"] == "COMPLETED"
