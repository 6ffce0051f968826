"""Drill 6 only: requests no retry can fix must fail at once (try 1 of 4), naming the fix.

The example DAG covers invalid input (an empty prompt) and a bad destination through its params; the
cases it cannot express (its model and connection are fixed) are here, one task each. Every task has
retries configured, so a task that is retried instead of failed shows up as try_number > 1.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG

from airflow_provider_modelroute.operators.modelroute import ModelRouteExecuteOperator

with DAG(
    dag_id="drill_modelroute_bad_inputs",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    default_args={"retries": 3, "retry_delay": timedelta(seconds=1)},
    tags=["drill"],
):
    ModelRouteExecuteOperator(task_id="unknown_model", model="no-such-model", input={"prompt": "a fox"})
    ModelRouteExecuteOperator(
        task_id="missing_connection",
        modelroute_conn_id="modelroute_missing",
        model="flux-1.1-pro",
        input={"prompt": "a fox"},
    )
    ModelRouteExecuteOperator(
        task_id="wrong_api_key",
        modelroute_conn_id="modelroute_wrong_key",  # well-formed, but not a key the server knows
        model="flux-1.1-pro",
        input={"prompt": "a fox"},
    )
    ModelRouteExecuteOperator(
        task_id="malformed_api_key",
        modelroute_conn_id="modelroute_malformed_key",  # sent (the server judges keys): UNAUTHORIZED
        model="flux-1.1-pro",
        input={"prompt": "a fox"},
    )
