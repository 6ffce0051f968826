"""ModelRouteExecutionSensor in poke, reschedule and deferrable modes, in real DAG runs."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from airflow_provider_modelroute.hooks.modelroute import ModelRouteHook
from airflow_provider_modelroute.operators.modelroute import ModelRouteExecutionLink
from airflow_provider_modelroute.sensors.modelroute import ModelRouteExecutionSensor
from airflow_provider_modelroute.testing import ModelRouteServer
from airflow_provider_modelroute.version_compat import AirflowFailException
from tests.airflow_versions import AIRFLOW_V_3_0_PLUS
from tests.conftest import make_dag, run_dag, task_instance, task_states, xcom
from tests.waiting import wait_for

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


def wait_until_completed(execution_id: str) -> None:
    hook = ModelRouteHook()
    wait_for(
        f"{execution_id} to be COMPLETED",
        lambda: hook.get_execution(execution_id)["status"],
        until=lambda status: status == "COMPLETED",
    )


def complete_after_polls(server: ModelRouteServer, execution_id: str, polls: int = 3) -> list[Exception]:
    """End the execution COMPLETED once the sensor has polled it ``polls`` times (in a thread).

    Returns the list the thread puts its error in, if its wait times out.
    """
    errors: list[Exception] = []

    def polls_seen() -> int:
        return int(server.stats()["requests"].get("GET /v1/executions/{id}", 0))

    def watch() -> None:
        try:
            wait_for(f"{polls} polls of {execution_id}", polls_seen, until=lambda n: n >= polls)
            server.set_execution_status(execution_id, "COMPLETED")
        except Exception as exc:
            errors.append(exc)

    threading.Thread(target=watch, daemon=True).start()
    return errors


def run_sensor(request: pytest.FixtureRequest, execution_id: str, **kwargs: Any) -> Any:
    with make_dag(request.node.name, params={"execution": execution_id}) as dag:
        ModelRouteExecutionSensor(
            task_id="wait",
            execution_id="{{ params.execution }}",
            poke_interval=0.1,
            **{"timeout": 300, **kwargs},
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
    execution_id = start_execution(3600)
    watcher_errors = complete_after_polls(server, execution_id)
    dr = run_sensor(request, execution_id, **mode)
    assert watcher_errors == []
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
    wait_until_completed(execution_id)
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
    # a retryable code: the execution ended all the same, so no retry of the sensor can help
    execution_id = start_execution(0.3, outcome="FAILED", error_code="GENERATION_FAILED")
    dr = run_sensor(request, execution_id, timeout=60, retries=3, **mode)
    assert dr.state == "failed"
    assert task_states(dr) == {"wait": "failed"}
    assert task_instance(dr, "wait").try_number == 1  # failed at once: not up for retry
    logs = capsys.readouterr().out
    assert "GENERATION_FAILED" in logs
    assert "timed out" not in logs.lower()  # it failed on the outcome, not by waiting out its timeout


@pytest.mark.parametrize(
    ("reading", "mode"),  # a documented error body; a bare 404 (every mode's first check is a poke)
    [("literal", {"mode": "reschedule"}), ("presigned", {"deferrable": True})],
)
def test_unknown_execution_fails_at_once(
    server: ModelRouteServer,
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
    mode: dict,
    reading: str,
) -> None:
    server.dialect = reading
    dr = run_sensor(request, "exec_00000000-0000-0000-0000-000000000000", timeout=60, retries=3, **mode)
    assert task_states(dr) == {"wait": "failed"}
    assert task_instance(dr, "wait").try_number == 1
    assert server.stats()["requests"]["GET /v1/executions/{id}"] == 1  # no HTTP retries either
    assert "What to do: check the execution or file id" in capsys.readouterr().out  # no documented code


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
    execution_id = start_execution(3600)
    dr = run_sensor(request, execution_id, timeout=1, soft_fail=soft_fail, retries=2, **mode)
    assert task_states(dr) == {"wait": state}
    assert dr.state == ("failed" if state == "failed" else "success")
    if not soft_fail:
        logs = capsys.readouterr().out
        assert "timed out" in logs.lower()
        if mode.get("deferrable"):  # our message names the limit and its parameter
            assert "timeout=1 s (this sensor's `timeout` parameter)" in logs
    assert server.stats()["cancels"] == {}  # the sensor never cancels what it did not start
    assert server.execution(execution_id)["status"] in ("PENDING", "PROCESSING")


def test_a_retry_resumed_with_an_earlier_trys_event_pokes_again(server: ModelRouteServer) -> None:
    # Airflow 3.0 resumes a retried deferred task at execute_complete with the failed try's event.
    execution_id = start_execution(0)
    wait_until_completed(execution_id)
    sensor = ModelRouteExecutionSensor(task_id="wait", execution_id=execution_id, deferrable=True)
    failed = {"status": "error", "error": {"code": "X", "message": "m"}, "execution_id": execution_id}

    class TaskInstance:
        try_number = 2

        def xcom_push(self, key: str, value: Any) -> None:  # the sensor pushes its execution_url
            pass

    context: Any = {"ti": TaskInstance()}
    result = sensor.execute_complete(context, {**failed, "try_number": 1})  # stale: starts over
    assert result["id"] == execution_id and result["status"] == "COMPLETED"
    with pytest.raises(Exception, match="X: m"):  # this try's own event is final
        sensor.execute_complete(context, {**failed, "try_number": 2})


@pytest.mark.parametrize("outcome", ["FAILED", "CANCELLED", "EXPIRED"])
def test_every_unsuccessful_end_is_final_for_the_sensor(server: ModelRouteServer, outcome: str) -> None:
    execution_id = start_execution(60)
    server.set_execution_status(execution_id, outcome, "GENERATION_FAILED" if outcome == "FAILED" else None)
    sensor = ModelRouteExecutionSensor(task_id="wait", execution_id=execution_id)
    with pytest.raises(AirflowFailException, match=f"ended {outcome}"):
        sensor.poke({})  # type: ignore[arg-type]
