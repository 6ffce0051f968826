"""Asset events on a real metadata DB: what a transfer lands (dag.test()), and completed executions that
no task waits for, delivered to the webhook receiver inside Airflow's api-server app."""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_modelroute import api
from airflow_provider_modelroute.hooks.modelroute import ModelRouteHook
from airflow_provider_modelroute.testing import ModelRouteServer
from airflow_provider_modelroute.transfers.modelroute import ModelRouteToStorageOperator
from airflow_provider_modelroute.version_compat import AIRFLOW_V_3_1_PLUS, Asset, AssetAlias
from airflow_provider_modelroute.webhooks import receiver
from tests import test_webhook_receiver
from tests.airflow_versions import AIRFLOW_V_3_0_PLUS
from tests.conftest import REPO, connection_json, dag_bag, make_dag, run_dag, task_states, xcom
from tests.test_webhook_receiver import SECRET, delivery, post

pytestmark = pytest.mark.usefixtures("airflow_db")
client = test_webhook_receiver.client  # Airflow's api-server app, in this process (a fixture)
needs_receiver = pytest.mark.skipif(
    not AIRFLOW_V_3_1_PLUS, reason="the receiver is an api-server plugin app (Airflow 3.1+)"
)

OUTSIDE_CONN = "modelroute_outside"  # its own connection: no other test's DAG schedules on its assets


def asset_events(uri: str, prefix: bool = False) -> list[tuple[str, dict[str, Any]]]:
    """(asset URI, extra) of each event recorded on the asset ``uri`` (or on every URI under it)."""
    from airflow.utils.session import create_session
    from sqlalchemy import select

    try:
        from airflow.models.asset import AssetEvent as Event
        from airflow.models.asset import AssetModel as Model
    except ImportError:  # Airflow 2.11
        from airflow.models.dataset import DatasetEvent as Event
        from airflow.models.dataset import DatasetModel as Model
    asset_id = getattr(Event, "asset_id", None) or Event.dataset_id
    where = Model.uri.startswith(uri) if prefix else Model.uri == uri
    query = select(Model.uri, Event.extra).join(Event, asset_id == Model.id).where(where).order_by(Event.id)
    with create_session() as session:
        return [(found, dict(extra)) for found, extra in session.execute(query)]


def completed(server: ModelRouteServer, model: str, **input: Any) -> str:
    execution = ModelRouteHook().create_execution(model, input)
    server.set_execution_status(execution["id"], "COMPLETED")
    return str(execution["id"])


def test_a_transfer_records_each_landed_file_on_its_outlets(server: ModelRouteServer, tmp_path: Path) -> None:
    execution_id = completed(server, "test-multi", prompt="two", count=2)
    dag = make_dag("assets_transfer")
    with dag:
        ModelRouteToStorageOperator(
            task_id="store",
            execution_id=execution_id,
            destination="{{ dag_run.conf['destination'] }}",  # known only at run time: the alias
            outlets=[Asset("modelroute_test_landed"), AssetAlias("modelroute_test_landed_files")],
        )
    if not AIRFLOW_V_3_0_PLUS:  # Airflow 2.11 records events only on datasets and aliases its DB knows
        dag.sync_to_db()
    dag_run = run_dag(dag, run_conf={"destination": f"{tmp_path.as_uri()}/"})
    assert task_states(dag_run) == {"store": "success"}
    records = xcom(dag_run, "store")
    assert len(records) == 2

    files = [{k: r[k] for k in ("file_id", "uri", "size_bytes", "sha256")} for r in records]
    assert asset_events(tmp_path.as_uri(), prefix=True) == [
        (file["uri"], {"execution_id": execution_id, **file}) for file in files
    ]
    assert asset_events("modelroute_test_landed") == [
        ("modelroute_test_landed", {"execution_id": execution_id, "files": files})
    ]
    for file in files:
        landed = Path(file["uri"].removeprefix("file://")).read_bytes()
        assert (len(landed), hashlib.sha256(landed).hexdigest()) == (file["size_bytes"], file["sha256"])
        assert file["sha256"] == server.file_info(file["file_id"])["sha256"]
    assert "http" not in json.dumps(asset_events(tmp_path.as_uri(), prefix=True)), "no download URL"


@pytest.fixture
def outside(server: ModelRouteServer, monkeypatch: pytest.MonkeyPatch) -> ModelRouteServer:
    """A webhook connection, and a DAG scheduled on its ``test-image`` asset (``test-file``'s is only
    an outlet: no DAG is scheduled on it)."""
    from datetime import datetime, timezone

    from airflow.models.dag import DagModel
    from airflow.providers.common.compat.sdk import DAG
    from airflow.utils.session import create_session

    from tests.conftest import _dagbag_module

    monkeypatch.setenv(f"AIRFLOW_CONN_{OUTSIDE_CONN.upper()}", connection_json(server, webhook_secret=SECRET))
    monkeypatch.setattr(receiver, "seen_events", OrderedDict())
    monkeypatch.setattr(receiver, "secret_cache", {})
    bag = dag_bag(os.devnull)
    for dag_id, schedule in (
        ("assets_outside_consumer", Asset(f"modelroute://{OUTSIDE_CONN}/test-image")),
        ("assets_outside_producer", None),
    ):
        with DAG(dag_id, schedule=schedule, start_date=datetime(2026, 1, 1, tzinfo=timezone.utc)) as dag:
            ModelRouteToStorageOperator(
                task_id="land",
                execution_id="{{ params.get('execution_id') }}",
                destination="file:///tmp/unused/",
                outlets=[Asset(f"modelroute://{OUTSIDE_CONN}/test-file")],
            )
        bag.bag_dag(dag)
    _dagbag_module().sync_bag_to_db(bag, "dags-folder", None)
    with create_session() as session:
        session.get(DagModel, "assets_outside_consumer").is_paused = False
    return server


def queued_runs(dag_id: str) -> int:
    from airflow.models.asset import AssetDagRunQueue
    from airflow.utils.session import create_session
    from sqlalchemy import func, select

    with create_session() as session:
        return int(session.scalar(select(func.count()).where(AssetDagRunQueue.target_dag_id == dag_id)) or 0)


@needs_receiver
def test_a_completed_outside_execution_records_its_model_asset_once(
    outside: ModelRouteServer, client: Any
) -> None:
    execution_id = completed(outside, "test-image", prompt="made by the team's app")
    body = delivery(outside, execution_id, event_id="evt_outside_1")
    before = asset_events(f"modelroute://{OUTSIDE_CONN}/test-image")

    first = post(client, body, conn_id=OUTSIDE_CONN)
    receiver.seen_events = OrderedDict()  # another replica gets it again
    again = post(client, body, conn_id=OUTSIDE_CONN)

    assert first.json() == {"outcome": "asset event recorded"}, first.text
    assert again.status_code == 200
    [(_, extra)] = asset_events(f"modelroute://{OUTSIDE_CONN}/test-image")[len(before) :]
    assert extra == {
        "execution_id": execution_id,
        "file_ids": [f["file_id"] for f in api.result_files(outside.execution(execution_id))],
        "status": "COMPLETED",
        "model": "test-image",
        "webhook_event_id": "evt_outside_1",
    }
    assert extra["file_ids"], "the execution has files"
    assert queued_runs("assets_outside_consumer") >= 1, "the scheduled DAG gets no run"


@needs_receiver
def test_no_scheduled_dag_or_a_bad_signature_records_nothing(outside: ModelRouteServer, client: Any) -> None:
    unscheduled = completed(outside, "test-file", size_bytes=10)
    scheduled = completed(outside, "test-image", prompt="forged")
    failed = json.loads(delivery(outside, scheduled, event_type="execution.failed", event_id="evt_failed"))
    failed["data"]["status"] = "FAILED"
    before = asset_events(f"modelroute://{OUTSIDE_CONN}/", prefix=True)

    plain = post(client, delivery(outside, unscheduled, event_id="evt_plain"), conn_id=OUTSIDE_CONN)
    forged = post(
        client, delivery(outside, scheduled, event_id="evt_forged"), conn_id=OUTSIDE_CONN, secret="whsec_x"
    )
    not_completed = post(client, json.dumps(failed).encode(), conn_id=OUTSIDE_CONN)

    assert plain.json() == {"outcome": receiver.NO_WAITING_TASK}
    assert forged.status_code == 401
    assert not_completed.json()["outcome"].startswith("ignored")
    assert asset_events(f"modelroute://{OUTSIDE_CONN}/", prefix=True) == before


@pytest.fixture(scope="module")
def examples() -> Any:
    return dag_bag(REPO / "example_dags")


def test_the_outside_example_lands_the_execution_it_is_given(
    server: ModelRouteServer, examples: Any, tmp_path: Path
) -> None:
    execution_id = completed(server, "flux-1.1-pro", prompt="made by the team's app")
    dag = examples.get_dag("example_modelroute_land_outside_executions")
    run = run_dag(dag, run_conf={"execution_id": execution_id, "destination": f"{tmp_path.as_uri()}/"})
    assert run.state == "success"
    [stored] = xcom(run, "land", map_index=0)
    landed = Path(stored["uri"].removeprefix("file://")).read_bytes()
    assert hashlib.sha256(landed).hexdigest() == server.file_info(stored["file_id"])["sha256"]


def test_the_on_new_images_example_runs(examples: Any) -> None:
    run = run_dag(examples.get_dag("example_modelroute_on_new_images"))
    assert run.state == "success" and xcom(run, "announce") == []
