"""Cost: the hold, estimate and final cost in logs and XCom; ``max_estimated_cost`` cancels and fails."""

from __future__ import annotations

from typing import Any

import pytest

from airflow_provider_modelroute.exceptions import ModelRouteConfigError
from airflow_provider_modelroute.operators.modelroute import ModelRouteExecuteOperator
from airflow_provider_modelroute.testing import ModelRouteServer
from tests.conftest import task_instance, xcom
from tests.test_execute import run_execute

pytestmark = pytest.mark.usefixtures("airflow_db")


@pytest.mark.parametrize("deferrable", [False, True], ids=["sync", "deferrable"])
def test_cost_fields_are_logged_and_returned(
    server: ModelRouteServer,
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
    deferrable: bool,
) -> None:
    dr = run_execute(request, deferrable=deferrable, max_estimated_cost="0.05")
    assert dr.state == "success"
    result = xcom(dr, "generate")
    assert (result["hold_amount"], result["estimated_cost"], result["cost"]) == ("0.048", "0.040", "0.040")
    logs = capsys.readouterr().out
    assert "hold_amount 0.048, estimated_cost 0.040" in logs  # at submit
    assert "is COMPLETED: hold_amount 0.048, estimated_cost 0.040, cost 0.040" in logs  # at the end


def test_estimate_from_submit_fills_a_final_answer_without_it(
    server: ModelRouteServer, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An API whose GET answer carries only the final cost: the return value still has the estimate.
    document = ModelRouteServer._execution_document

    def final_cost_only(self: ModelRouteServer, execution: Any) -> dict[str, Any]:
        doc = document(self, execution)
        if doc["status"] == "COMPLETED":
            del doc["hold_amount"], doc["estimated_cost"]
        return doc

    monkeypatch.setattr(ModelRouteServer, "_execution_document", final_cost_only)
    dr = run_execute(request, deferrable=True)
    assert dr.state == "success"
    result = xcom(dr, "generate")
    assert (result["hold_amount"], result["estimated_cost"], result["cost"]) == ("0.048", "0.040", "0.040")


@pytest.mark.parametrize("deferrable", [False, True], ids=["sync", "deferrable"])
def test_estimate_above_max_cancels_and_fails_without_retry(
    server: ModelRouteServer,
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
    deferrable: bool,
) -> None:
    dr = run_execute(
        request,
        deferrable=deferrable,
        retries=2,
        max_estimated_cost=0.01,
        input={"prompt": "p", "_simulate": {"seconds": 60}},
    )
    assert dr.state == "failed"
    ti = task_instance(dr, "generate")
    assert ti.state == "failed" and ti.try_number == 1  # no retry: the estimate would not change
    [execution_id] = server.execution_ids()
    assert server.execution(execution_id)["status"] == "CANCELLED"  # the hold is released at once
    assert server.stats()["executions_created"] == 1
    assert "GET /v1/executions/{id}" not in server.stats()["requests"]  # no wait began
    logs = capsys.readouterr().out
    assert "estimated_cost 0.040, above max_estimated_cost 0.01: cancelled it" in logs
    assert "ModelRouteConfigError" in logs


@pytest.mark.parametrize("bad", [-1, "a lot", float("nan"), True])
def test_bad_max_estimated_cost_names_the_field(bad: Any) -> None:
    with pytest.raises(ModelRouteConfigError, match="max_estimated_cost must be a non-negative amount"):
        ModelRouteExecuteOperator(task_id="t", model="m", input={}, max_estimated_cost=bad)
