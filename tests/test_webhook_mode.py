"""Webhook mode in real dag.test() runs: per-execution URLs, the early event, the slow safety net."""

from __future__ import annotations

import json
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from airflow_provider_modelroute._compat import WEBHOOK_RECEIVER_SUPPORTED, AirflowFailException
from airflow_provider_modelroute.operators.modelroute import ModelRouteExecuteOperator
from airflow_provider_modelroute.sensors.modelroute import ModelRouteExecutionSensor
from airflow_provider_modelroute.testing import ModelRouteServer
from airflow_provider_modelroute.webhooks import routing, signing
from tests.conftest import connection_json, make_dag, run_dag, task_instance, task_states, xcom

pytestmark = pytest.mark.skipif(
    not WEBHOOK_RECEIVER_SUPPORTED, reason="webhook mode needs the api-server plugin app (Airflow 3.1+)"
)

SECRET = "whsec_mode_test_" + "cd" * 16
RECEIVER = "https://airflow.example.com/modelroute/webhooks/modelroute_default"
STATUS_READS = "GET /v1/executions/{id}"


@pytest.fixture
def webhook_server(server: ModelRouteServer, monkeypatch: pytest.MonkeyPatch) -> ModelRouteServer:
    """``modelroute_default`` in webhook mode, with a 1 s safety net so that dag.test() ends quickly."""
    from airflow_provider_modelroute.webhooks import receiver

    extras = {"webhook_secret": SECRET, "webhook_receiver_url": RECEIVER, "webhook_poll_interval": 1}
    monkeypatch.setenv("AIRFLOW_CONN_MODELROUTE_DEFAULT", connection_json(server, **extras))
    receiver._secrets.clear()
    receiver.seen_events.__init__()  # type: ignore[misc]
    return server


def route_of(url: str) -> tuple[routing.TaskRoute, str]:
    query = {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}
    return routing.TaskRoute.decode(query["route"]), query["token"]


class DeliveredEarly(ModelRouteExecuteOperator):
    """Test double of timing only: the execution ends, and its signed webhook reaches the real receiver,
    after the submit and before the task defers (the race a short execution wins in production)."""

    server: ModelRouteServer

    def submit(self, context: Any) -> dict[str, Any]:
        from fastapi.testclient import TestClient

        from airflow_provider_modelroute.webhooks.receiver import app

        execution = super().submit(context)
        self.server.set_execution_status(str(execution["id"]), "COMPLETED")
        document = {k: v for k, v in self.server.execution(str(execution["id"])).items() if k != "input"}
        body = json.dumps({"id": "evt_early", "type": "execution.completed", "data": document}).encode()
        stamp = str(int(time.time()))
        path = urlsplit(self.server.execution(str(execution["id"]))["webhook_url"])
        answer = TestClient(app).post(
            f"{path.path.removeprefix(routing.URL_PREFIX)}?{path.query}",
            content=body,
            headers={"X-Signature": signing.sign(SECRET, stamp, body), "X-Signature-Timestamp": stamp},
        )
        assert answer.json()["outcome"].startswith("recorded"), answer.text
        return execution


def test_an_event_before_the_task_defers_completes_it_with_no_status_read(
    airflow_db: None, webhook_server: ModelRouteServer
) -> None:
    DeliveredEarly.server = webhook_server
    dag = make_dag("webhook_mode_early_event")
    with dag:
        DeliveredEarly(
            task_id="generate",
            model="test-image",
            input={"prompt": "early"},
            deferrable=True,
            poll_interval=0.05,
        )
    dag_run = run_dag(dag)

    assert task_states(dag_run) == {"generate": "success"}
    [execution_id] = webhook_server.execution_ids()
    result = xcom(dag_run, "generate")
    assert result["id"] == execution_id and result["status"] == "COMPLETED" and result["files"]
    assert webhook_server.stats()["requests"].get(STATUS_READS, 0) == 0, "no ModelRoute status read at all"
    ti = task_instance(dag_run, "generate")
    route, token = route_of(webhook_server.execution(execution_id)["webhook_url"])
    assert route == routing.TaskRoute.of(ti) and routing.token_matches(SECRET, route.encode(), token)
    assert xcom(dag_run, "generate", routing.waiting_xcom_key(execution_id)) == execution_id


def test_without_a_delivery_the_safety_net_polls_slowly(
    airflow_db: None, webhook_server: ModelRouteServer
) -> None:
    dag = make_dag("webhook_mode_safety_net")
    with dag:
        ModelRouteExecuteOperator(
            task_id="generate",
            model="test-image",
            input={"prompt": "net", "_simulate": {"seconds": 0.2}},
            deferrable=True,
            poll_interval=0.05,  # webhook mode replaces it with the connection's webhook_poll_interval
        )
    started = time.monotonic()
    dag_run = run_dag(dag)

    assert task_states(dag_run) == {"generate": "success"}
    assert xcom(dag_run, "generate")["status"] == "COMPLETED"
    # one look after 0.75-1.25 s, not one every 0.05 s
    assert webhook_server.stats()["requests"][STATUS_READS] == 1
    assert time.monotonic() - started >= 0.75
    [execution_id] = webhook_server.execution_ids()
    assert webhook_server.execution(execution_id)["webhook_url"].startswith(RECEIVER + "?route=")


def test_the_sensor_announces_its_wait_and_polls_slowly(
    airflow_db: None, webhook_server: ModelRouteServer
) -> None:
    from airflow_provider_modelroute.hooks.modelroute import ModelRouteHook

    execution_id = str(
        ModelRouteHook().create_execution("test-image", {"prompt": "s", "_simulate": {"seconds": 4}})["id"]
    )
    dag = make_dag("webhook_mode_sensor")
    with dag:
        ModelRouteExecutionSensor(
            task_id="wait", execution_id=execution_id, deferrable=True, poke_interval=0.05
        )
    dag_run = run_dag(dag)

    assert task_states(dag_run) == {"wait": "success"}
    assert xcom(dag_run, "wait", routing.waiting_xcom_key(execution_id)) == execution_id
    # the first poke, then a look every 0.75-1.25 s (not every 0.05 s) until it ends; a loaded
    # machine may start the task late, so only an upper bound (polling every 0.05 s: ~80 reads)
    assert 1 <= webhook_server.stats()["requests"][STATUS_READS] <= 7


def test_webhook_true_fails_at_once_when_it_cannot_be_on(airflow_db: None, server: ModelRouteServer) -> None:
    dag = make_dag("webhook_mode_required")
    with dag:
        ModelRouteExecuteOperator(
            task_id="unconfigured", model="test-image", input={"prompt": "x"}, deferrable=True, webhook=True
        )
        ModelRouteExecuteOperator(
            task_id="not_deferrable", model="test-image", input={"prompt": "x"}, webhook=True
        )
        ModelRouteExecuteOperator(
            task_id="default_off", model="test-image", input={"prompt": "x"}, deferrable=True
        )
        ModelRouteExecuteOperator(
            task_id="missing_connection",
            modelroute_conn_id="modelroute_missing",
            model="test-image",
            input={"prompt": "x"},
            deferrable=True,
            retries=2,
        )
    dag_run = run_dag(dag)

    states = task_states(dag_run)
    assert states["unconfigured"] == "failed" and states["not_deferrable"] == "failed"
    assert states["default_off"] == "success"
    assert states["missing_connection"] == "failed"
    assert task_instance(dag_run, "missing_connection").try_number == 1  # a config error: no retry
    [execution_id] = server.execution_ids()  # the failed tasks submitted nothing
    assert "webhook_url" not in server.execution(execution_id)


def test_a_config_error_is_a_fail_exception() -> None:
    from airflow_provider_modelroute.exceptions import ModelRouteConfigError

    assert issubclass(ModelRouteConfigError, AirflowFailException)
