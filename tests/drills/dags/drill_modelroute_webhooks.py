"""Webhook drills only: one deferrable, webhook-mode generate task per DAG; the connection sets the net.

``drill_modelroute_webhooks`` uses ``modelroute_webhooks`` (the default 10-minute safety net);
``drill_modelroute_webhooks_fast`` uses ``modelroute_webhooks_fast`` (5 s, to see the net catch a
dropped delivery). Run conf: ``seconds`` (how long the execution runs), ``early`` (see below).
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from airflow.sdk import DAG, Variable

from airflow_provider_modelroute.operators.modelroute import ModelRouteExecuteOperator


class HeldBeforeDeferral(ModelRouteExecuteOperator):
    """With conf ``early``, holds the task between its submit and its deferral until the local server has
    delivered the execution's end to the receiver: the early-event race, made certain (timing only)."""

    def submit(self, context: Any) -> dict[str, Any]:
        execution = super().submit(context)
        if not context["dag_run"].conf.get("early"):
            return execution
        from airflow_provider_modelroute.testing import RemoteModelRouteServer

        server = RemoteModelRouteServer(Variable.get("modelroute_admin_url"))
        deadline = time.monotonic() + 120
        while not any(
            d["execution_id"] == execution["id"]
            and d["event_type"] == "execution.completed"
            and d["status"] == 200
            for d in server.webhook_deliveries()
        ):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no delivery of {execution['id']}'s end within 120 s")
            time.sleep(0.2)
        return execution


def webhook_dag(dag_id: str, conn_id: str) -> DAG:
    with DAG(
        dag_id=dag_id, schedule=None, start_date=datetime(2026, 1, 1), catchup=False, tags=["drill"]
    ) as dag:
        HeldBeforeDeferral(
            task_id="generate",
            modelroute_conn_id=conn_id,
            model="test-image",
            input={
                "prompt": "{{ run_id }}",
                "_simulate": {"seconds": "{{ dag_run.conf.get('seconds', 8) }}"},
            },
            metadata={"run_id": "{{ run_id }}"},
            deferrable=True,
            webhook=True,
        )
    return dag


webhook_dag(dag_id="drill_modelroute_webhooks", conn_id="modelroute_webhooks")
webhook_dag(dag_id="drill_modelroute_webhooks_fast", conn_id="modelroute_webhooks_fast")
