"""Drill 2 only: the example DAG's submit -> deferrable wait -> store, with executions the drill ends.

The local server keeps each execution PROCESSING for an hour (``input._simulate``); the drill completes
them through the server's admin API once it has killed and restarted the triggerer. So every wait is
deferred when the triggerer dies, whatever the machine's speed: no race between the kill and the
executions' own end.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG, Param

from airflow_provider_modelroute.operators.modelroute import ModelRouteExecuteOperator
from airflow_provider_modelroute.sensors.modelroute import ModelRouteExecutionSensor
from airflow_provider_modelroute.transfers.modelroute import ModelRouteToStorageOperator

EXECUTION = "{{ ti.xcom_pull(task_ids='submit', key='execution_id') }}"

with DAG(
    dag_id="drill_modelroute_held",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    default_args={"retries": 2, "retry_delay": timedelta(seconds=1)},
    params={"prompt": Param("a held lighthouse", type="string"), "destination": Param("", type="string")},
    tags=["drill"],
):
    submit = ModelRouteExecuteOperator(
        task_id="submit",
        model="flux-1.1-pro",
        input={"prompt": "{{ params.prompt }}", "_simulate": {"seconds": 3600}},
        metadata={"dag_id": "{{ dag.dag_id }}", "run_id": "{{ run_id }}"},
        wait_for_completion=False,
    )
    wait = ModelRouteExecutionSensor(
        task_id="wait", execution_id=EXECUTION, deferrable=True, poke_interval=5, timeout=60 * 60
    )
    store = ModelRouteToStorageOperator(
        task_id="store",
        execution_id=EXECUTION,
        destination="{{ params.destination }}",
        overwrite="skip_if_identical",
    )
    submit >> wait >> store
