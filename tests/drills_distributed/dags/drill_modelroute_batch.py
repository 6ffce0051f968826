"""The distributed drills' batch: one execution per item, waited for deferrably, its output copied to
object storage as soon as it is ready.

Like ``example_modelroute_batch`` (dynamic task mapping, deferrable waits, one store per output),
but mapped as a task group, so that each item's copy starts when its own execution ends rather than
after the whole batch. The run's conf gives each item's model input (the local server reads how long
to run it from ``input._simulate.seconds``). The store copies the file the wait returned
(``source_file_id``: no second status read, so an execution costs three API requests).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG, Param, task, task_group

from airflow_provider_modelroute.operators.modelroute import ModelRouteExecuteOperator
from airflow_provider_modelroute.transfers.modelroute import ModelRouteToStorageOperator

#: Seconds between status polls: with many executions waiting on one key at 60 requests/min, polling
#: every few seconds would spend the budget on executions still running.
POLL_INTERVAL = 15
GENERATED_FILE = (
    "{{ ti.xcom_pull(task_ids='item.generate', map_indexes=ti.map_index)['files'][0]['file_id'] }}"
)

with DAG(
    dag_id="drill_modelroute_batch",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    # "upstream": an output is copied as soon as it is ready, before more submissions (Airflow's
    # default ranks every generate above every store, so copies would wait for the whole batch).
    default_args={"retries": 3, "retry_delay": timedelta(seconds=2), "weight_rule": "upstream"},
    params={
        "inputs": Param([], type="array", description="one model input per execution"),
        "destination": Param("", type="string", description="ObjectStoragePath URL of a folder"),
    },
    tags=["drill"],
):

    @task
    def items(**context) -> list[dict]:
        run_id = context["run_id"]
        return [
            {"model_input": model_input, "metadata": {"run_id": run_id, "item": index}}
            for index, model_input in enumerate(context["params"]["inputs"])
        ]

    @task_group
    def item(model_input: dict, metadata: dict) -> None:
        generate = ModelRouteExecuteOperator(
            task_id="generate",
            model="flux-1.1-pro",
            input=model_input,
            metadata=metadata,
            deferrable=True,
            poll_interval=POLL_INTERVAL,
        )
        store = ModelRouteToStorageOperator(
            task_id="store",
            source_file_id=GENERATED_FILE,
            destination="{{ params.destination }}",
            overwrite="skip_if_identical",  # a retry after a kill that struck once the copy was published
        )
        generate >> store

    item.expand_kwargs(items())
