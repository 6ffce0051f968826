"""Webhook mode in real dag.test() runs: per-execution URLs, the early event, the slow safety net."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections import OrderedDict
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from airflow_provider_modelroute.operators.modelroute import ModelRouteExecuteOperator
from airflow_provider_modelroute.sensors.modelroute import ModelRouteExecutionSensor
from airflow_provider_modelroute.testing import ModelRouteServer
from airflow_provider_modelroute.version_compat import AIRFLOW_V_3_1_PLUS, AirflowFailException, BaseOperator
from airflow_provider_modelroute.webhooks import mode, receiver
from tests.conftest import connection_json, make_dag, run_dag, task_instance, task_states, xcom

pytestmark = pytest.mark.skipif(
    not AIRFLOW_V_3_1_PLUS, reason="webhook mode needs the api-server plugin app (Airflow 3.1+)"
)

SECRET = "whsec_mode_test_" + "cd" * 16
RECEIVER = "https://airflow.example.com/modelroute/webhooks/modelroute_default"
STATUS_READS = "GET /v1/executions/{id}"


@pytest.fixture
def webhook_server(server: ModelRouteServer, monkeypatch: pytest.MonkeyPatch) -> ModelRouteServer:
    """``modelroute_default`` in webhook mode, with a 1 s safety net so that dag.test() ends quickly."""
    extras = {"webhook_secret": SECRET, "webhook_receiver_url": RECEIVER, "webhook_poll_interval": 1}
    monkeypatch.setenv("AIRFLOW_CONN_MODELROUTE_DEFAULT", connection_json(server, **extras))
    monkeypatch.setattr(receiver, "secret_cache", {})
    monkeypatch.setattr(receiver, "seen_events", OrderedDict())
    return server


def route_of(url: str) -> tuple[mode.TaskRoute, str]:
    query = {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}
    return mode.TaskRoute.decode(query["route"]), query["token"]


def deliver(server: ModelRouteServer, execution_id: str, webhook_url: str) -> str:
    """Sign the execution's completion as ModelRoute does, POST it to the real receiver app at
    ``webhook_url``'s route, and return the receiver's outcome."""
    from fastapi.testclient import TestClient

    document = {k: v for k, v in server.execution(execution_id).items() if k != "input"}
    body = json.dumps({"id": "evt_early", "type": "execution.completed", "data": document}).encode()
    stamp = str(int(time.time()))
    url = urlsplit(webhook_url)
    answer = TestClient(receiver.create_app()).post(
        f"{url.path.removeprefix(mode.URL_PREFIX)}?{url.query}",
        content=body,
        headers={"X-Signature": mode.sign(SECRET, stamp, body), "X-Signature-Timestamp": stamp},
    )
    return str(answer.json()["outcome"])


class DeliveredEarly(ModelRouteExecuteOperator):
    """Test double of timing only: the execution ends, and its signed webhook reaches the real receiver,
    after the submit and before the task defers (the race a short execution wins in production)."""

    server: ModelRouteServer

    def submit(self, context: Any) -> dict[str, Any]:
        execution = super().submit(context)
        execution_id = str(execution["id"])
        self.server.set_execution_status(execution_id, "COMPLETED")
        outcome = deliver(self.server, execution_id, self.server.execution(execution_id)["webhook_url"])
        assert outcome.startswith("recorded"), outcome
        return execution


class StoppedAfterItsWebhook(BaseOperator):
    """Plays the triggerer for a task the receiver resumed: the real receiver records the execution's
    end for this task, then Airflow stops the task's trigger through ``on_kill``."""

    server: ModelRouteServer

    def execute(self, context: Any) -> None:
        from airflow_provider_modelroute.hooks.modelroute import ModelRouteHook
        from airflow_provider_modelroute.triggers.modelroute import ModelRouteExecutionTrigger

        execution_id = str(ModelRouteHook().create_execution("test-image", {"prompt": "resume"})["id"])
        self.server.set_execution_status(execution_id, "COMPLETED")
        route = mode.TaskRoute.of(context["ti"])
        assert deliver(self.server, execution_id, route.webhook_url(RECEIVER, SECRET)).startswith("recorded")
        trigger = ModelRouteExecutionTrigger(
            execution_id, poll_interval=600, webhook_route=dataclasses.asdict(route), cancel_on_kill=True
        )
        asyncio.run(trigger.on_kill())


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
    assert route == mode.TaskRoute.of(ti) and mode.token_matches(SECRET, route.encode(), token)
    assert xcom(dag_run, "generate", mode.waiting_xcom_key(execution_id)) == execution_id


def test_a_trigger_stopped_after_its_webhook_says_the_task_resumed_and_cancels_nothing(
    airflow_db: None, webhook_server: ModelRouteServer, capsys: pytest.CaptureFixture[str]
) -> None:
    StoppedAfterItsWebhook.server = webhook_server
    dag = make_dag("webhook_mode_resume_log")
    with dag:
        StoppedAfterItsWebhook(task_id="generate")
    dag_run = run_dag(dag)

    assert task_states(dag_run) == {"generate": "success"}
    [execution_id] = webhook_server.execution_ids()
    logs = capsys.readouterr().out
    assert (
        f"ModelRoute execution {execution_id} ended (COMPLETED) and the task resumed from its webhook "
        "(event evt_early): this wait is over, nothing was cancelled" in logs
    ), logs[-3000:]
    assert webhook_server.stats()["cancels"] == {}


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
    assert xcom(dag_run, "wait", mode.waiting_xcom_key(execution_id)) == execution_id
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
