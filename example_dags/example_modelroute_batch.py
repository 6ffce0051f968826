"""Generate one image per prompt with dynamic task mapping, within ModelRoute's rate limit.

Each prompt is its own mapped task instance, so each retries (and re-attaches to its execution)
on its own. Concurrency is capped by the ``modelroute_api`` pool (create it once with
``airflow pools set modelroute_api 8 "ModelRoute API"``): every running task polls the API, and
polling is rate limited. Deferred tasks hold no worker slot; triggers of one triggerer share one
rate budget per connection.
"""

from __future__ import annotations

from datetime import datetime

# Airflow 2.11 and 3.x alike (the common-compat provider comes with this one)
from airflow.providers.common.compat.sdk import DAG, Asset, Param, task

from airflow_provider_modelroute.operators.modelroute import ModelRouteExecuteOperator
from airflow_provider_modelroute.transfers.modelroute import ModelRouteToStorageOperator

POOL = "modelroute_api"

with DAG(
    dag_id="example_modelroute_batch",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    params={
        "prompts": Param(["a red fox", "a blue whale", "a green parrot"], type="array"),
        "destination": Param("file:///tmp/modelroute/batch/", type="string"),
    },
    tags=["example", "modelroute"],
) as dag:

    @task
    def inputs(**context) -> list[dict]:
        return [{"prompt": prompt} for prompt in context["params"]["prompts"]]

    generate = ModelRouteExecuteOperator.partial(
        task_id="generate",
        model="flux-1.1-pro",
        deferrable=True,
        poll_interval=5,
        pool=POOL,
        retries=2,
    ).expand(input=inputs())

    ModelRouteToStorageOperator.partial(
        task_id="store",
        destination="{{ params.destination }}",
        pool=POOL,
        outlets=[Asset("modelroute_batch_images")],
    ).expand(execution_id=generate.output.map(lambda execution: execution["id"]))
