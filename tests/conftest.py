"""Shared fixtures: an isolated Airflow home, the local ModelRoute server, and connections to it."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Airflow reads its configuration at import time: isolate it before anything imports airflow.
_HOME = Path(tempfile.mkdtemp(prefix="modelroute-airflow-home-"))
REPO = Path(__file__).resolve().parent.parent
os.environ["AIRFLOW_HOME"] = str(_HOME)
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(REPO / "example_dags")
os.environ.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "INFO")

import pytest  # noqa: E402

from airflow_provider_modelroute._compat import AIRFLOW_V_3_0_PLUS  # noqa: E402
from airflow_provider_modelroute.testing import ModelRouteServer  # noqa: E402

#: Retry quickly in tests; the policy is the same, only the waits are shorter.
FAST_RETRY_EXTRAS = {"retry_base_wait": 0.01, "retry_max_wait": 0.2, "max_retries": 4, "timeout": 5}


def connection_json(server: ModelRouteServer, **extra: object) -> str:
    """The ``AIRFLOW_CONN_*`` JSON for a connection to the local server."""
    conn = server.airflow_connection()
    conn["extra"] = {**conn.get("extra", {}), **FAST_RETRY_EXTRAS, **extra}
    return json.dumps(conn)


@pytest.fixture(scope="session")
def modelroute_server() -> Iterator[ModelRouteServer]:
    with ModelRouteServer(pending_seconds=0.05, processing_seconds=0.1) as server:
        yield server


@pytest.fixture
def server(modelroute_server: ModelRouteServer, monkeypatch: pytest.MonkeyPatch) -> ModelRouteServer:
    """The local server, reset, with ``modelroute_default`` pointing at it."""
    modelroute_server.reset()
    monkeypatch.setenv("AIRFLOW_CONN_MODELROUTE_DEFAULT", connection_json(modelroute_server))
    return modelroute_server


@pytest.fixture(scope="session")
def airflow_db() -> None:
    """Create Airflow's metadata DB once per session (only tests that run DAGs need it)."""
    from airflow.utils import db

    db.resetdb()
    if AIRFLOW_V_3_0_PLUS:
        from airflow.dag_processing.bundles.manager import DagBundlesManager

        DagBundlesManager().sync_bundles_to_db()


def run_dag(dag: Any, **kwargs: Any) -> Any:
    """Run a DAG in-process with ``dag.test()`` and return its DagRun (whatever the outcome)."""
    if AIRFLOW_V_3_0_PLUS:  # a DAG built in a test must be serialized before dag.test() on 3.x
        from airflow.dag_processing.dagbag import DagBag, sync_bag_to_db

        bag = DagBag(dag_folder=os.devnull)
        bag.bag_dag(dag)
        sync_bag_to_db(bag, "dags-folder", None)
    return dag.test(**kwargs)


def task_states(dag_run: Any) -> dict[str, str]:
    return {ti.task_id: str(ti.state) for ti in dag_run.get_task_instances()}


def xcom(dag_run: Any, task_id: str, key: str = "return_value", map_index: int = -1) -> Any:
    """Read one XCom value of a finished DagRun from the metadata DB."""
    from airflow.utils.session import create_session

    if AIRFLOW_V_3_0_PLUS:
        from airflow.models.xcom import XComModel

        with create_session() as session:
            query = XComModel.get_many(
                run_id=dag_run.run_id,
                dag_ids=dag_run.dag_id,
                task_ids=task_id,
                key=key,
                map_indexes=map_index,
            )
            row = session.scalars(query).first()
            return XComModel.deserialize_value(row) if row is not None else None
    from airflow.models.xcom import XCom

    with create_session() as session:
        return XCom.get_one(
            run_id=dag_run.run_id,
            dag_id=dag_run.dag_id,
            task_id=task_id,
            key=key,
            map_index=map_index,
            session=session,
        )


def make_dag(dag_id: str, **kwargs: Any) -> Any:
    """A manually triggered DAG for one test (dag ids must be unique per test: runs are kept)."""
    from datetime import datetime, timezone

    from airflow.providers.common.compat.sdk import DAG

    safe_id = "".join(c if c.isalnum() or c in "-_." else "_" for c in dag_id)
    return DAG(safe_id, schedule=None, start_date=datetime(2026, 1, 1, tzinfo=timezone.utc), **kwargs)


def task_instance(dag_run: Any, task_id: str) -> Any:
    return next(ti for ti in dag_run.get_task_instances() if ti.task_id == task_id)
