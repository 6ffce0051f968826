"""ModelRouteCancelExecutionOperator in real DAG runs against the local server."""

from __future__ import annotations

from typing import Any

import pytest

from airflow_provider_modelroute.operators.modelroute import (
    ModelRouteCancelExecutionOperator,
    ModelRouteExecuteOperator,
)
from airflow_provider_modelroute.testing import ModelRouteServer
from tests.conftest import make_dag, run_dag, task_states, xcom

pytestmark = pytest.mark.usefixtures("airflow_db")


def submit_then_cancel(request: pytest.FixtureRequest, **submit: Any) -> Any:
    with make_dag(request.node.name) as dag:
        generate = ModelRouteExecuteOperator(
            task_id="generate", model="test-image", poll_interval=0.05, **submit
        )
        cancel = ModelRouteCancelExecutionOperator(
            task_id="cancel", execution_id="{{ ti.xcom_pull(task_ids='generate', key='execution_id') }}"
        )
        generate >> cancel
    return run_dag(dag)


def test_cancels_a_running_execution(server: ModelRouteServer, request: pytest.FixtureRequest) -> None:
    dr = submit_then_cancel(
        request, wait_for_completion=False, input={"prompt": "p", "_simulate": {"seconds": 60}}
    )
    assert task_states(dr) == {"generate": "success", "cancel": "success"}
    execution_id = xcom(dr, "generate", "execution_id")
    assert server.execution(execution_id)["status"] == "CANCELLED"
    assert server.stats()["cancels"] == {execution_id: 1}
    assert xcom(dr, "cancel")["status"] == "CANCELLED"


@pytest.mark.parametrize("refusal", [None, "INPUT_VALIDATION_ERROR"], ids=["409", "other-4xx"])
def test_a_finished_execution_is_not_an_error(
    server: ModelRouteServer,
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
    refusal: str | None,
) -> None:
    # The docs do not say how the API refuses to cancel a finished execution: any 4xx will do.
    if refusal:
        server.add_fault("POST /v1/executions/{id}/cancel", "error", code=refusal)
    dr = submit_then_cancel(request, input={"prompt": "p"})  # waits until COMPLETED
    assert task_states(dr) == {"generate": "success", "cancel": "success"}
    execution_id = xcom(dr, "generate", "execution_id")
    assert server.execution(execution_id)["status"] == "COMPLETED"
    assert xcom(dr, "cancel")["status"] == "COMPLETED"
    assert (
        f"ModelRoute execution {execution_id} had already finished: it is COMPLETED"
        in capsys.readouterr().out
    )


def test_an_unknown_execution_fails_the_task(
    server: ModelRouteServer, request: pytest.FixtureRequest
) -> None:
    with make_dag(request.node.name) as dag:
        ModelRouteCancelExecutionOperator(
            task_id="cancel", execution_id="exec_00000000-0000-0000-0000-00000000dead"
        )
    dr = run_dag(dag)
    assert task_states(dr) == {"cancel": "failed"}
