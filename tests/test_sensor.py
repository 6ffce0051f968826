"""ModelRouteExecutionSensor in poke, reschedule and deferrable modes, in real DAG runs."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from airflow_provider_modelroute._compat import AIRFLOW_V_3_0_PLUS
from airflow_provider_modelroute.hooks.modelroute import ModelRouteHook
from airflow_provider_modelroute.operators.modelroute import ModelRouteExecutionLink
from airflow_provider_modelroute.sensors.modelroute import ModelRouteExecutionSensor
from airflow_provider_modelroute.testing import ModelRouteServer
from tests.conftest import make_dag, run_dag, task_states, xcom

pytestmark = pytest.mark.usefixtures("airflow_db")

MODES = [
    pytest.param({"mode": "poke"}, id="poke"),
    pytest.param({"mode": "reschedule"}, id="reschedule"),
    pytest.param({"deferrable": True}, id="deferrable"),
]


def start_execution(seconds: float, **simulate: Any) -> str:
    execution = ModelRouteHook().create_execution(
        "test-image", {"prompt": "p", "_simulate": {"seconds": seconds, **simulate}}
    )
    return str(execution["id"])


def complete_after_polls(server: ModelRouteServer, execution_id: str, polls: int = 3) -> threading.Thread:
    """End the execution COMPLETED once the sensor has polled it ``polls`` times."""

    def watch() -> None:
        deadline = time.monotonic() + 60
        while server.stats()["requests"].get("GET /v1/executions/{id}", 0) < polls:
            if time.monotonic() > deadline:
                return
            time.sleep(0.02)
        server.set_execution_status(execution_id, "COMPLETED")

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def run_sensor(request: pytest.FixtureRequest, execution_id: str, **kwargs: Any) -> Any:
    with make_dag(request.node.name, params={"execution": execution_id}) as dag:
        ModelRouteExecutionSensor(
            task_id="wait",
            execution_id="{{ params.execution }}",
            poke_interval=0.1,
            **{"timeout": 30, **kwargs},
        )
    return run_dag(dag)


@pytest.mark.parametrize("mode", MODES)
def test_waits_for_completion(
    server: ModelRouteServer, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, mode: dict
) -> None:
    deferrals: list[dict] = []
    original = ModelRouteExecutionSensor.defer

    def spy(self: ModelRouteExecutionSensor, **kwargs: Any) -> None:
        deferrals.append(kwargs["trigger"].serialize()[1])
        original(self, **kwargs)

    monkeypatch.setattr(ModelRouteExecutionSensor, "defer", spy)
    execution_id = start_execution(60)
    complete_after_polls(server, execution_id)
    dr = run_sensor(request, execution_id, **mode)
    assert dr.state == "success"
    assert task_states(dr) == {"wait": "success"}
    result = xcom(dr, "wait")
    assert result["id"] == execution_id and result["status"] == "COMPLETED"
    assert result["files"][0]["file_id"].startswith("file_")
    assert server.stats()["requests"]["GET /v1/executions/{id}"] >= 3  # it waited, polling
    url = f"{server.base_url}/executions/{execution_id}"  # the extra link, to the local dashboard page
    assert xcom(dr, "wait", "execution_url") == url
    if AIRFLOW_V_3_0_PLUS:  # Airflow 3 stores each extra link's target in XCom when the task ends
        assert xcom(dr, "wait", ModelRouteExecutionLink().xcom_key) == url
    if mode.get("deferrable"):
        assert [d["execution_id"] for d in deferrals] == [execution_id]
        assert deferrals[0]["cancel_on_kill"] is False  # the sensor did not start it: never cancels
    else:
        assert deferrals == []


def test_already_completed_execution_needs_no_deferral(
    server: ModelRouteServer, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    execution_id = start_execution(0)
    time.sleep(0.3)
    monkeypatch.setattr(ModelRouteExecutionSensor, "defer", lambda *a, **k: pytest.fail("deferred"))
    dr = run_sensor(request, execution_id, deferrable=True)
    assert dr.state == "success"
    assert xcom(dr, "wait")["status"] == "COMPLETED"


@pytest.mark.parametrize("mode", MODES)
def test_unsuccessful_execution_fails_at_once(
    server: ModelRouteServer,
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
    mode: dict,
) -> None:
    execution_id = start_execution(0.3, outcome="FAILED", error_code="CONTENT_MODERATION_REJECTED")
    started = time.monotonic()
    dr = run_sensor(request, execution_id, timeout=60, **mode)
    assert dr.state == "failed"
    assert task_states(dr) == {"wait": "failed"}
    assert time.monotonic() - started < 30  # not waiting out the 60 s timeout
    assert "CONTENT_MODERATION_REJECTED" in capsys.readouterr().out


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("soft_fail", "state"), [(False, "failed"), (True, "skipped")])
def test_timeout_and_soft_fail(
    server: ModelRouteServer,
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
    mode: dict,
    soft_fail: bool,
    state: str,
) -> None:
    execution_id = start_execution(60)
    dr = run_sensor(request, execution_id, timeout=1, soft_fail=soft_fail, retries=2, **mode)
    assert task_states(dr) == {"wait": state}
    assert dr.state == ("failed" if state == "failed" else "success")
    if not soft_fail:
        assert "timed out" in capsys.readouterr().out.lower()
    assert server.stats()["cancels"] == {}  # the sensor never cancels what it did not start
    assert server.execution(execution_id)["status"] in ("PENDING", "PROCESSING")


def test_a_retry_resumed_with_an_earlier_trys_event_pokes_again(server: ModelRouteServer) -> None:
    # Airflow 3.0 resumes a retried deferred task at execute_complete with the failed try's event.
    execution_id = start_execution(0)
    while ModelRouteHook().get_execution(execution_id)["status"] != "COMPLETED":
        time.sleep(0.02)
    sensor = ModelRouteExecutionSensor(task_id="wait", execution_id=execution_id, deferrable=True)
    failed = {"status": "error", "error": {"code": "X", "message": "m"}, "execution_id": execution_id}

    class TaskInstance:
        try_number = 2

    context: Any = {"ti": TaskInstance()}
    result = sensor.execute_complete(context, {**failed, "try_number": 1})  # stale: starts over
    assert result["id"] == execution_id and result["status"] == "COMPLETED"
    with pytest.raises(Exception, match="X: m"):  # this try's own event is final
        sensor.execute_complete(context, {**failed, "try_number": 2})
