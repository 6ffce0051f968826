"""Upload an input image, run a model on it, and store the output.

Input files are never raw URLs: they are uploaded to ModelRoute first and referenced as
``file_...`` ids. ``source`` may be any ObjectStoragePath URL (with ``source_conn_id``).
"""

from __future__ import annotations

import base64
from datetime import datetime
from pathlib import Path

# Airflow 2.11 and 3.x alike (the common-compat provider comes with this one)
from airflow.providers.common.compat.sdk import DAG, Asset, Param, task

from airflow_provider_modelroute.operators.modelroute import ModelRouteExecuteOperator
from airflow_provider_modelroute.transfers.modelroute import (
    ModelRouteToStorageOperator,
    StorageToModelRouteOperator,
)

# A 1x1 PNG, so the example runs anywhere; point the ``source`` param at your own image.
_SAMPLE_PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"
)

with DAG(
    dag_id="example_modelroute_image_to_image",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    params={
        "source": Param("file:///tmp/modelroute/input/sample.png", type="string"),
        "destination": Param("file:///tmp/modelroute/edited/", type="string"),
    },
    tags=["example", "modelroute"],
) as dag:

    @task
    def ensure_sample_input(**context) -> None:
        source = context["params"]["source"]
        if source.startswith("file://"):
            path = Path(source.removeprefix("file://"))
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(_SAMPLE_PNG)

    upload = StorageToModelRouteOperator(task_id="upload", source="{{ params.source }}")

    transform = ModelRouteExecuteOperator(
        task_id="transform",
        model="flux-1.1-pro",
        input={"prompt": "the same scene at night", "image": "{{ ti.xcom_pull(task_ids='upload') }}"},
        deferrable=True,
    )

    store = ModelRouteToStorageOperator(
        task_id="store",
        execution_id="{{ ti.xcom_pull(task_ids='transform', key='execution_id') }}",
        destination="{{ params.destination }}",
        outlets=[Asset("modelroute_edited_images")],
    )

    ensure_sample_input() >> upload >> transform >> store
