"""Generate one image per prompt with ``@task.modelroute`` and dynamic task mapping, then store them.

The decorated function returns the execution's input; the task submits it, waits in the triggerer
(no worker slot held) and returns the execution, which ``ModelRouteToStorageOperator`` stores. Each
prompt is its own mapped task instance, so each retries, and re-attaches to its execution, on its own.
"""

from __future__ import annotations

from datetime import datetime

# Airflow 2.11 and 3.x alike (the common-compat provider comes with this one)
from airflow.providers.common.compat.sdk import Param, dag, task

from airflow_provider_modelroute.transfers.modelroute import ModelRouteToStorageOperator


@dag(
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    params={
        "prompts": Param(["a red fox", "a blue whale"], type="array"),
        "destination": Param("file:///tmp/modelroute/taskflow/", type="string"),
    },
    tags=["example", "modelroute"],
)
def example_modelroute_taskflow() -> None:
    @task
    def prompts(**context) -> list[str]:
        return context["params"]["prompts"]

    @task.modelroute(model="flux-1.1-pro", poll_interval=5, retries=2)
    def generate(prompt: str) -> dict:
        return {"prompt": prompt}

    images = generate.expand(prompt=prompts())

    ModelRouteToStorageOperator.partial(task_id="store", destination="{{ params.destination }}").expand(
        execution_id=images.map(lambda execution: execution["id"])
    )


example_modelroute_taskflow()
