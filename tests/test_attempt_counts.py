""" "Retried" and "not retried", counted at the server; and who cancels first when a task times out."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta

import pytest

from airflow_provider_modelroute.exceptions import ModelRouteConnectionError, ModelRoutePermanentError
from airflow_provider_modelroute.hooks.modelroute import ModelRouteAsyncHook, ModelRouteHook
from airflow_provider_modelroute.operators.modelroute import ModelRouteExecuteOperator
from airflow_provider_modelroute.testing import ModelRouteServer
from airflow_provider_modelroute.testing.dialects import Dialect
from tests.conftest import connection_json, make_dag, run_dag, task_instance, xcom
from tests.test_execute import run_execute

POLL = "GET /v1/executions/{id}"
CANCEL = "POST /v1/executions/{id}/cancel"
UNKNOWN_ID = "exec_00000000-0000-0000-0000-00000000abcd"
MAX_RETRIES = 2


@pytest.fixture
def hook(server: ModelRouteServer, monkeypatch: pytest.MonkeyPatch) -> ModelRouteHook:
    """A hook on connection ``mr``: the local server, ``MAX_RETRIES`` retries."""
    conn = json.loads(connection_json(server, max_retries=MAX_RETRIES))
    monkeypatch.setenv("AIRFLOW_CONN_MR", json.dumps(conn))
    return ModelRouteHook("mr")


def test_connection_errors_are_retried_then_reported(server: ModelRouteServer, hook: ModelRouteHook) -> None:
    server.add_fault(POLL, "drop", count=None)
    with pytest.raises(ModelRouteConnectionError):
        hook.get_execution(UNKNOWN_ID)
    assert server.stats()["requests"][POLL] == MAX_RETRIES + 1


@pytest.mark.xfail(
    strict=True,
    reason="aiohttp resends an idempotent request once when the server drops a kept-alive connection, "
    "so the async client sends two requests per attempt",
)
def test_async_connection_errors_are_retried_then_reported(
    server: ModelRouteServer, hook: ModelRouteHook
) -> None:
    server.add_fault(POLL, "drop", count=None)

    async def poll() -> None:
        async with ModelRouteAsyncHook(hook.modelroute_conn_id) as client:
            await client.get_execution(UNKNOWN_ID)

    with pytest.raises(ModelRouteConnectionError):
        asyncio.run(poll())
    assert server.stats()["requests"][POLL] == MAX_RETRIES + 1


def test_async_unknown_execution_is_not_retried_in_any_reading(
    server: ModelRouteServer, hook: ModelRouteHook, dialect: Dialect
) -> None:
    async def poll() -> None:
        async with ModelRouteAsyncHook(hook.modelroute_conn_id) as client:
            await client.get_execution(UNKNOWN_ID)

    with pytest.raises(ModelRoutePermanentError):  # a documented error body, or a bare 404
        asyncio.run(poll())
    assert server.stats()["requests"][POLL] == 1


@pytest.mark.usefixtures("airflow_db")
def test_the_operator_cancels_before_airflow_times_the_task_out(
    server: ModelRouteServer, request: pytest.FixtureRequest
) -> None:
    # Airflow's timeout strikes execution_timeout after the task starts (not before its start_date);
    # the operator's own deadline comes a margin earlier, so its cancel is on the server's log first.
    with make_dag(f"{request.node.name}_warm_up") as dag:  # a process's first run starts slowly
        ModelRouteExecuteOperator(
            task_id="warm_up", model="test-image", input={"prompt": "p"}, poll_interval=0.05
        )
    run_dag(dag)
    limit = timedelta(seconds=10)
    dr = run_execute(request, execution_timeout=limit, input={"prompt": "p", "_simulate": {"seconds": 3600}})
    assert dr.state == "failed"
    execution_id = xcom(dr, "generate", "execution_id")
    started = task_instance(dr, "generate").start_date
    if started is None:
        pytest.skip("this Airflow's dag.test() keeps no start_date for the task it timed out (2.11)")
    airflow_timeout = (started + limit).timestamp()
    log = [entry for entry in server.request_log() if entry["id"] == execution_id]
    cancels = [entry["at"] for entry in log if entry["route"] == CANCEL]
    assert len(cancels) == 1
    assert cancels[0] < airflow_timeout
    assert all(entry["at"] <= cancels[0] for entry in log if entry["route"] == POLL)  # no poll after
