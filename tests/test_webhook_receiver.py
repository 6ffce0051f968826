"""The webhook receiver inside Airflow's own api-server app (in-process), on a real metadata DB.

A real task instance (created by dag.test()) is put into the DEFERRED state the way Airflow defers
it (a Trigger row of our trigger, ``next_method``), then deliveries are POSTed to the app.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from collections.abc import Iterator
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import pytest

from airflow_provider_modelroute.testing import ModelRouteServer
from airflow_provider_modelroute.version_compat import AIRFLOW_V_3_1_PLUS
from airflow_provider_modelroute.webhooks import mode, receiver
from tests.conftest import connection_json, make_dag, run_dag, task_instance

pytestmark = pytest.mark.skipif(
    not AIRFLOW_V_3_1_PLUS, reason="the receiver is an api-server plugin app (Airflow 3.1+)"
)

SECRET = "whsec_receiver_test_" + "ab" * 16
CONN_ID = "modelroute_hooks"


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    """Airflow's api-server app, plugins mounted, in this process."""
    import os
    import secrets

    from airflow.api_fastapi.app import create_app
    from fastapi.testclient import TestClient

    os.environ.setdefault("AIRFLOW__API_AUTH__JWT_SECRET", secrets.token_urlsafe(32))
    with TestClient(create_app()) as test_client:
        yield test_client


@pytest.fixture
def hooked(server: ModelRouteServer, monkeypatch: pytest.MonkeyPatch) -> ModelRouteServer:
    """A connection with a webhook secret (the receiver looks it up by the id in its path)."""
    monkeypatch.setenv(
        f"AIRFLOW_CONN_{CONN_ID.upper()}",
        connection_json(server, webhook_secret=SECRET, webhook_receiver_url="https://airflow.example/x"),
    )
    monkeypatch.setattr(receiver, "seen_events", OrderedDict())
    monkeypatch.setattr(receiver, "secret_cache", {})
    return server


def completed_task(airflow_db: None, server: ModelRouteServer, name: str) -> tuple[Any, str]:
    """A real task instance whose operator started a (now COMPLETED) execution; returns (ti, execution id)."""
    from airflow_provider_modelroute.operators.modelroute import ModelRouteExecuteOperator

    dag = make_dag(f"webhook_receiver_{name}")
    with dag:
        ModelRouteExecuteOperator(
            task_id="generate", model="test-image", input={"prompt": name}, wait_for_completion=False
        )
    dag_run = run_dag(dag)
    ti = task_instance(dag_run, "generate")
    assert str(ti.state) == "success", "the setup task did not run"
    [execution_id] = server.execution_ids()
    server.set_execution_status(execution_id, "COMPLETED")
    return ti, execution_id


def set_state(ti: Any, state: str, execution_id: str | None = None, deferred_seconds_ago: float = 60) -> None:
    """Set the task instance's ``state``; DEFERRED as Airflow defers, on our trigger for ``execution_id``."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.trigger import Trigger
    from airflow.utils.session import create_session

    from airflow_provider_modelroute.triggers.modelroute import ModelRouteExecutionTrigger

    with create_session() as session:
        row = session.get(TaskInstance, ti.id)
        row.state, row.next_method, row.next_kwargs, row.trigger_id = state, None, None, None
        if state == "deferred":
            trigger = Trigger.from_object(ModelRouteExecutionTrigger(str(execution_id), poll_interval=600))
            trigger.created_date -= timedelta(seconds=deferred_seconds_ago)
            session.add(trigger)
            session.flush()
            row.trigger_id, row.next_method, row.next_kwargs = trigger.id, "execute_complete", {}


def db_state(ti: Any) -> SimpleNamespace:
    """The task instance's state, resume event and recorded webhook event, read from the DB."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    from tests.conftest import xcom

    with create_session() as session:
        row = session.get(TaskInstance, ti.id)
        event = decode_next_kwargs(row.next_kwargs).get("event") if row.next_kwargs else None
        state, trigger_id = str(row.state), row.trigger_id
    run = SimpleNamespace(run_id=ti.run_id, dag_id=ti.dag_id)
    return SimpleNamespace(
        state=state,
        event=event,
        trigger_id=trigger_id,
        recorded=xcom(run, ti.task_id, mode.EVENT_XCOM_KEY),
    )


def decode_next_kwargs(raw: Any) -> dict[str, Any]:
    """``next_kwargs`` as a dict: serde-encoded on Airflow 3.2+, a plain dict on 3.1."""
    try:
        from airflow.models.trigger import _decode_next_kwargs  # Airflow 3.3+
    except ImportError:
        try:
            from airflow.sdk.serde import deserialize  # Airflow 3.2
        except ImportError:  # Airflow 3.1: stored as it is
            return dict(raw)
        return dict(deserialize(raw))
    return dict(_decode_next_kwargs(raw))


def delivery(
    server: ModelRouteServer,
    execution_id: str,
    *,
    event_type: str = "execution.completed",
    event_id: str = "evt_1",
    shape: str = "overview",
) -> bytes:
    execution = {
        k: v for k, v in server.execution(execution_id).items() if k not in ("input", "idempotency_key")
    }
    if shape == "overview":
        document = {"id": event_id, "event_type": event_type, "execution_id": execution_id, "data": execution}
    else:
        document = {"id": event_id, "type": event_type, "timestamp": int(time.time()), "data": execution}
    return json.dumps(document).encode()


def post(
    client: Any,
    body: bytes,
    *,
    route: mode.TaskRoute | None = None,
    secret: str = SECRET,
    timestamp: int | None = None,
    token: str | None = None,
    conn_id: str = CONN_ID,
) -> Any:
    sent = int(time.time()) if timestamp is None else timestamp
    base = mode.receiver_url("http://testserver", conn_id)
    url = route.webhook_url(base, SECRET) if route else base
    if token is not None:
        url = url.rsplit("token=", 1)[0] + f"token={token}"
    headers = {
        "X-Signature": mode.sign(secret, sent, body),
        "X-Signature-Timestamp": str(sent),
        "Content-Type": "application/json",
        "User-Agent": "ModelRoute-Webhooks/1.0",
    }
    return client.post(url.removeprefix("http://testserver"), content=body, headers=headers)


@pytest.mark.parametrize("shape", ["overview", "executions-page"])
def test_a_signed_delivery_resumes_the_deferred_task_without_api_calls(
    airflow_db: None, hooked: ModelRouteServer, client: Any, shape: str
) -> None:
    ti, execution_id = completed_task(airflow_db, hooked, f"resume_{shape}")
    set_state(ti, "deferred", execution_id)
    before = hooked.stats()["requests"]

    answer = post(client, delivery(hooked, execution_id, shape=shape), route=mode.TaskRoute.of(ti))

    assert answer.status_code == 200, answer.text
    assert answer.json() == {"outcome": "resumed"}
    after = db_state(ti)
    assert after.state == "scheduled" and after.trigger_id is None
    assert after.event["status"] == "done" and after.event["execution_id"] == execution_id
    assert after.event["execution"]["status"] == "COMPLETED" and after.event["execution"]["files"]
    assert after.event["try_number"] == ti.try_number
    # The operator turns that event into its result with no ModelRoute call at all.
    from airflow_provider_modelroute.operators.modelroute import ModelRouteExecuteOperator

    operator = ModelRouteExecuteOperator(task_id="generate", model="test-image", input={"prompt": "p"})
    pushed = {"execution_id": execution_id}  # what the operator pushed before deferring
    ti_then = SimpleNamespace(
        try_number=ti.try_number,
        max_tries=0,
        task_id="generate",
        map_index=-1,
        xcom_pull=lambda **kw: pushed[kw["key"]],
    )
    context: Any = {"ti": ti_then}
    result = operator.execute_complete(context, after.event)
    assert result["id"] == execution_id and result["files"] == after.event["execution"]["files"]
    assert hooked.stats()["requests"] == before, "resuming must not call the ModelRoute API"


def test_forged_stale_or_misrouted_deliveries_are_refused_and_resume_nothing(
    airflow_db: None, hooked: ModelRouteServer, client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    ti, execution_id = completed_task(airflow_db, hooked, "forged")
    set_state(ti, "deferred", execution_id)
    route = mode.TaskRoute.of(ti)
    body = delivery(hooked, execution_id)
    caplog.set_level(logging.DEBUG)

    now = int(time.time())
    forged = post(client, body, route=route, secret="whsec_guessed", timestamp=now)
    stale = post(client, body, route=route, timestamp=now - 301)
    wrong_token = post(client, body, route=route, token="00" * 32, timestamp=now)
    other_task = post(client, body, route=mode.TaskRoute(ti.dag_id, ti.run_id, "other"), token="00" * 32)
    unknown_conn = post(client, body, route=route, conn_id="modelroute_default")
    oversized = post(client, b" " * (300 * 1024) + body, route=route)

    assert (forged.status_code, stale.status_code) == (401, 401)
    assert (wrong_token.status_code, other_task.status_code) == (403, 403)
    assert unknown_conn.status_code == 404  # modelroute_default names no webhook secret
    assert oversized.status_code == 413
    assert db_state(ti).state == "deferred" and db_state(ti).recorded is None
    assert caplog.text.count("refused") >= 4, "the refusals were not logged"
    for secret, sent in ((SECRET, now), ("whsec_guessed", now), (SECRET, now - 301)):
        assert secret not in caplog.text
        assert mode.sign(secret, sent, body) not in caplog.text


def test_a_duplicated_delivery_is_a_no_op_even_on_another_replica(
    airflow_db: None, hooked: ModelRouteServer, client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    ti, execution_id = completed_task(airflow_db, hooked, "duplicate")
    set_state(ti, "deferred", execution_id)
    route, body = mode.TaskRoute.of(ti), delivery(hooked, execution_id)

    first = post(client, body, route=route)
    again = post(client, body, route=route)
    monkeypatch.setattr(receiver, "seen_events", OrderedDict())  # another replica
    elsewhere = post(client, body, route=route)

    assert first.json() == {"outcome": "resumed"}
    assert again.json() == {"outcome": "duplicate"}
    assert elsewhere.status_code == 200 and elsewhere.json()["outcome"].startswith("ignored")
    assert db_state(ti).state == "scheduled"


def test_an_event_before_the_task_defers_is_recorded_for_its_trigger(
    airflow_db: None, hooked: ModelRouteServer, client: Any
) -> None:
    ti, execution_id = completed_task(airflow_db, hooked, "early")
    set_state(ti, "running")

    answer = post(client, delivery(hooked, execution_id), route=mode.TaskRoute.of(ti))

    assert answer.status_code == 200 and answer.json()["outcome"].startswith("recorded")
    after = db_state(ti)
    assert after.state == "running"
    assert after.recorded["execution_id"] == execution_id
    assert after.recorded["execution"]["status"] == "COMPLETED"


def test_unknown_executions_and_non_final_events_get_a_quick_2xx(
    airflow_db: None, hooked: ModelRouteServer, client: Any
) -> None:
    ti, execution_id = completed_task(airflow_db, hooked, "unknown")
    set_state(ti, "deferred", execution_id)
    other = hooked.execution_ids()[0]
    started = json.loads(delivery(hooked, execution_id, event_type="execution.started", event_id="evt_s"))
    started["data"] = {"id": execution_id, "status": "PROCESSING"}
    unknown_type = json.loads(delivery(hooked, execution_id, event_id="evt_u"))
    unknown_type["event_type"] = "execution.archived"
    unknown_type["data"]["status"] = "ARCHIVED"
    not_json = b"not an event"

    answers = [
        post(client, delivery(hooked, execution_id, event_id="evt_org")),  # org-wide, no marker: unknown
        post(client, json.dumps(started).encode(), route=mode.TaskRoute.of(ti)),
        post(client, json.dumps(unknown_type).encode(), route=mode.TaskRoute.of(ti)),
        post(client, not_json, route=mode.TaskRoute.of(ti)),
        post(client, delivery(hooked, other, event_id="evt_o"), route=mode.TaskRoute(ti.dag_id, "nope", "x")),
    ]

    assert [a.status_code for a in answers] == [200] * len(answers)
    assert all(a.json()["outcome"].startswith("ignored") for a in answers), [a.json() for a in answers]
    assert db_state(ti).state == "deferred"


def test_an_organisation_wide_delivery_is_routed_by_the_waiting_marker(
    airflow_db: None, hooked: ModelRouteServer, client: Any
) -> None:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    ti, execution_id = completed_task(airflow_db, hooked, "org_wide")
    set_state(ti, "deferred", execution_id)
    with create_session() as session:
        XComModel.set(
            key=mode.waiting_xcom_key(execution_id),
            value=execution_id,
            dag_id=ti.dag_id,
            task_id=ti.task_id,
            run_id=ti.run_id,
            map_index=ti.map_index,
            session=session,
        )

    answer = post(client, delivery(hooked, execution_id, shape="executions-page"))

    assert answer.json() == {"outcome": "resumed"}
    assert db_state(ti).state == "scheduled"


def test_a_task_that_deferred_just_now_is_resumed_after_the_grace(
    airflow_db: None, hooked: ModelRouteServer, client: Any
) -> None:
    """Airflow 3.3.2 can fail a task resumed before the scheduler saw its deferring process end."""
    ti, execution_id = completed_task(airflow_db, hooked, "grace")
    set_state(ti, "deferred", execution_id, deferred_seconds_ago=0)
    started = time.monotonic()
    answer = post(client, delivery(hooked, execution_id), route=mode.TaskRoute.of(ti))
    assert answer.json() == {"outcome": "resumed"}
    assert time.monotonic() - started >= receiver.RESUME_GRACE * 0.9
    assert db_state(ti).state == "scheduled"


def test_an_unroutable_copy_of_an_event_does_not_shadow_the_routable_one(
    airflow_db: None, hooked: ModelRouteServer, client: Any
) -> None:
    """The organisation-wide endpoint and the execution's webhook_url get the same event id."""
    ti, execution_id = completed_task(airflow_db, hooked, "two_targets")
    set_state(ti, "deferred", execution_id)
    body = delivery(hooked, execution_id)
    org_wide = post(client, body)  # no route, no waiting marker: cannot be routed
    routed = post(client, body, route=mode.TaskRoute.of(ti))
    assert org_wide.json()["outcome"].startswith("ignored")
    assert routed.json() == {"outcome": "resumed"}
