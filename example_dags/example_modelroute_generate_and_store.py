"""Generate an image with ModelRoute and store it where your Airflow reaches, on a schedule.

submit -> wait (deferrable: no worker slot held) -> copy the output file to storage. The storage
destination is the ``destination`` param, else the Airflow Variable ``modelroute_destination``,
else a local folder; any ObjectStoragePath URL works (``s3://bucket/images/`` with
``destination_conn_id``, ``gs://...``, ``file:///...``). The stored files are an asset, so other
DAGs can be scheduled on them.

One task can also submit and wait: ``ModelRouteExecuteOperator(..., deferrable=True)``. Keeping
the two apart, as here, lets a retry of the wait never touch the submission.
"""

from __future__ import annotations

from datetime import datetime, timedelta

# Airflow 2.11 and 3.x alike (the common-compat provider comes with this one)
from airflow.providers.common.compat.sdk import DAG, Asset, Param, task

from airflow_provider_modelroute.operators.modelroute import ModelRouteExecuteOperator
from airflow_provider_modelroute.sensors.modelroute import ModelRouteExecutionSensor
from airflow_provider_modelroute.transfers.modelroute import ModelRouteToStorageOperator

GENERATED_IMAGES = Asset("modelroute_generated_images")

with DAG(
    dag_id="example_modelroute_generate_and_store",
    schedule="@daily",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    default_args={"retries": 2, "retry_delay": timedelta(seconds=30)},
    params={
        "prompt": Param("a lighthouse at dawn, watercolour", type="string"),
        "destination": Param("", type="string", description="ObjectStoragePath URL; empty: the Variable"),
    },
    tags=["example", "modelroute"],
) as dag:
    submit = ModelRouteExecuteOperator(
        task_id="submit",
        model="flux-1.1-pro",
        input={"prompt": "{{ params.prompt }}"},
        metadata={"dag_id": "{{ dag.dag_id }}", "run_id": "{{ run_id }}"},
        wait_for_completion=False,
    )

    wait = ModelRouteExecutionSensor(
        task_id="wait",
        execution_id="{{ ti.xcom_pull(task_ids='submit', key='execution_id') }}",
        deferrable=True,
        poke_interval=5,
        timeout=60 * 60,
    )

    store = ModelRouteToStorageOperator(
        task_id="store",
        execution_id="{{ ti.xcom_pull(task_ids='submit', key='execution_id') }}",
        destination=(
            "{{ params.destination or var.value.get('modelroute_destination', "
            "'file:///tmp/modelroute/images/') }}"
        ),
        overwrite="skip_if_identical",
        outlets=[GENERATED_IMAGES],
    )

    @task
    def report(stored: list[dict]) -> None:
        for item in stored:
            print(f"Stored {item['uri']} ({item['size_bytes']} bytes, sha256 {item['sha256']})")

    submit >> wait >> store
    report(store.output)
