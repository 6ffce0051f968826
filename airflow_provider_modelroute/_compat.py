"""The only module that knows which Airflow it runs on.

Names come from ``airflow.providers.common.compat.sdk`` (``airflow.sdk`` on 3.x, the old homes on
2.11) and triggers from ``airflow.triggers.base``. Features newer than 2.11 are detected here, once.
Everything imported at module top is cheap: DAG files import the provider at every parse.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from airflow import __version__ as _airflow_version
from airflow.providers.common.compat.sdk import (
    AirflowException,
    AirflowFailException,
    AirflowNotFoundException,
    AirflowSensorTimeout,
    AirflowSkipException,
    BaseHook,
    BaseOperator,
    BaseOperatorLink,
    BaseSensorOperator,
    PokeReturnValue,
    conf,
)
from airflow.triggers.base import BaseTrigger, TriggerEvent
from packaging.version import Version

try:
    from airflow.providers.common.compat.sdk import mask_secret
except ImportError:  # common-compat < 1.22 (the newest for Python 3.10 is 1.20) does not map it yet
    import importlib

    def _find_mask_secret() -> Any:
        # the homes common-compat 1.22+ looks in: Airflow 3.1+, 3.0, 2.11
        for home in (
            "airflow.sdk.log",
            "airflow.sdk.execution_time.secrets_masker",
            "airflow.utils.log.secrets_masker",
        ):
            try:
                return importlib.import_module(home).mask_secret
            except (ImportError, AttributeError):
                continue
        raise ImportError("mask_secret not found in this Airflow") from None

    mask_secret = _find_mask_secret()

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import Connection, Context
    from airflow.sdk.types import TaskInstanceKey  # type-checked against Airflow 3

_AIRFLOW = Version(Version(_airflow_version).base_version)
if Version("2.11") > _AIRFLOW:
    raise RuntimeError(
        f"airflow-provider-modelroute needs Apache Airflow 2.11 or newer, not {_airflow_version}: "
        "upgrade Airflow, or pin an older provider."
    )

AIRFLOW_V_3_1_PLUS = Version("3.1") <= _AIRFLOW
#: The webhook receiver is an api-server plugin app (``fastapi_apps``): Airflow 3.1+.
WEBHOOK_RECEIVER_SUPPORTED = AIRFLOW_V_3_1_PLUS


async def aget_connection(conn_id: str) -> Connection:
    """Look a connection up without blocking the triggerer's event loop (2.11 and 3.x)."""
    from airflow.providers.common.compat.connection import get_async_connection

    return await get_async_connection(conn_id)


def task_state_store(context: Context) -> Any | None:
    """The retry-durable per-task store of Airflow 3.3+ (None where Airflow has none)."""
    return context.get("task_state_store")


def xcom_value(ti_key: TaskInstanceKey, key: str) -> Any:
    """Read an XCom value for an operator extra link (2.11 and 3.x)."""
    from airflow.providers.common.compat.sdk import XCom

    return XCom.get_value(ti_key=ti_key, key=key)


def stats() -> Any:
    """Airflow's metrics client: StatsD, OpenTelemetry or nothing, as the deployment configured it."""
    try:
        from airflow.providers.common.compat.sdk import Stats
    except ImportError:  # common-compat releases that do not map it yet (Airflow 2.11 and 3.0 keep it here)
        from airflow.stats import Stats
    return Stats


def object_storage_path(url: str, conn_id: str | None = None) -> Any:
    """An ``ObjectStoragePath`` (imported on first use: it is only needed when a task runs)."""
    from airflow.providers.common.compat.sdk import ObjectStoragePath

    return ObjectStoragePath(url, conn_id=conn_id)


# -- webhooks: Airflow's server side, imported on use (only the api-server and triggerer) --


def airflow_plugin_base() -> type:
    """``AirflowPlugin`` (imported on use: only the plugins manager needs it)."""
    from airflow.providers.common.compat.sdk import AirflowPlugin

    return AirflowPlugin


def event_submitter() -> Any | None:
    """Airflow's internal "resume this deferred task with an event" (3.0.6+), or None where it is missing.

    ``handle_event_submit(event, *, task_instance, session)``: the same signature from 3.0.6 to 3.3.2;
    Airflow 3.3's human-in-the-loop endpoint resumes tasks with it under a row lock.
    """
    try:
        from airflow.models.trigger import handle_event_submit
    except ImportError:
        return None
    return handle_event_submit


def server_db() -> Any:
    """The metadata-DB names the webhook receiver uses (api-server only; imported on use)."""
    from types import SimpleNamespace

    from airflow.models.taskinstance import TaskInstance
    from airflow.models.trigger import Trigger
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from airflow.utils.state import TaskInstanceState

    return SimpleNamespace(
        TaskInstance=TaskInstance,
        Trigger=Trigger,
        XComModel=XComModel,
        create_session=create_session,
        TaskInstanceState=TaskInstanceState,
    )


def store_xcom(
    session: Any, value: Any, *, key: str, dag_id: str, run_id: str, task_id: str, map_index: int
) -> None:
    """Store ``value`` as a task's XCom from a server process, as the execution API stores a worker's:
    in the XCom backend's serialized form, so ``XCom.get_one`` in a trigger reads back ``value``."""
    import inspect

    from airflow.models.dagrun import DagRun
    from airflow.models.xcom import XComModel
    from airflow.providers.common.compat.sdk import XCom
    from sqlalchemy import delete, select

    ids: dict[str, Any] = {"dag_id": dag_id, "run_id": run_id, "task_id": task_id, "map_index": map_index}
    stored = XCom.serialize_value(value, key=key, **ids)
    if "serialize" in inspect.signature(XComModel.set).parameters:  # Airflow 3.2+
        XComModel.set(key=key, value=stored, serialize=False, session=session, **ids)
        return
    # Airflow 3.1's XComModel.set would serialize again: do what its execution API's set_xcom does
    model: Any = XComModel
    session.execute(delete(model).where(model.key == key, *(getattr(model, k) == v for k, v in ids.items())))
    dag_run_id = session.scalar(select(DagRun.id).where(DagRun.dag_id == dag_id, DagRun.run_id == run_id))
    session.add(model(dag_run_id=dag_run_id, key=key, value=stored, **ids))
    session.flush()


def server_connection(conn_id: str) -> Any:
    """A connection as Airflow's server processes see it (metadata DB and secrets backends)."""
    from airflow.providers.common.compat.sdk import Connection

    if hasattr(Connection, "get"):  # the Task SDK's (3.x): in the api-server it reads the metadata DB too
        with contextlib.suppress(AirflowNotFoundException):
            return Connection.get(conn_id)
    from airflow.models.connection import Connection as ConnectionModel

    return ConnectionModel.get_connection_from_secrets(conn_id)


@contextmanager
def metadata_db_connections() -> Iterator[None]:
    """Let hooks in this (admin CLI) process read connections from the metadata DB, as Airflow's own
    ``airflow connections`` commands do on Airflow 3 (a plain process sees only env/secrets backends)."""
    import os

    old = os.environ.get("_AIRFLOW_PROCESS_CONTEXT")
    os.environ["_AIRFLOW_PROCESS_CONTEXT"] = "server"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("_AIRFLOW_PROCESS_CONTEXT", None)
        else:
            os.environ["_AIRFLOW_PROCESS_CONTEXT"] = old


def update_connection_extras(conn_id: str, extras: dict[str, Any]) -> bool:
    """Merge ``extras`` into a connection stored in the metadata DB; False if it is not stored there."""
    from airflow.models.connection import Connection as ConnectionModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        conn = session.scalar(select(ConnectionModel).where(ConnectionModel.conn_id == conn_id))
        if conn is None:
            return False
        conn.set_extra(json.dumps({**conn.extra_dejson, **extras}))
    return True


async def aget_xcom(*, key: str, dag_id: str, run_id: str, task_id: str, map_index: int) -> Any:
    """Read one XCom from a trigger, without blocking the triggerer's event loop.

    The triggerer's supervisor channel is async (``XCom.aget_one``, Airflow 3.3); ``dag.test()``'s
    in-process one is sync only: there the sync read runs in a worker thread.
    """
    from airflow.providers.common.compat.sdk import XCom

    ids = {"key": key, "dag_id": dag_id, "run_id": run_id, "task_id": task_id, "map_index": map_index}
    try:
        from airflow.sdk.execution_time import task_runner

        comms = getattr(task_runner, "SUPERVISOR_COMMS", None)
    except ImportError:
        comms = None
    if hasattr(XCom, "aget_one") and hasattr(comms, "asend"):
        return await XCom.aget_one(**ids)
    from asgiref.sync import sync_to_async

    return await sync_to_async(XCom.get_one, thread_sensitive=False)(**ids)


# -- Old names used only by tests, kept importable until the merge (tests/airflow_versions.py has them) --
AIRFLOW_V_3_0_PLUS = Version("3.0") <= _AIRFLOW
AIRFLOW_V_3_3_PLUS = Version("3.3") <= _AIRFLOW
TRIGGER_ON_KILL_SUPPORTED = hasattr(BaseTrigger, "on_kill")

__all__ = [
    "AIRFLOW_V_3_0_PLUS",
    "AIRFLOW_V_3_1_PLUS",
    "AIRFLOW_V_3_3_PLUS",
    "TRIGGER_ON_KILL_SUPPORTED",
    "WEBHOOK_RECEIVER_SUPPORTED",
    "AirflowException",
    "AirflowFailException",
    "AirflowNotFoundException",
    "AirflowSensorTimeout",
    "AirflowSkipException",
    "BaseHook",
    "BaseOperator",
    "BaseOperatorLink",
    "BaseSensorOperator",
    "BaseTrigger",
    "PokeReturnValue",
    "TriggerEvent",
    "aget_connection",
    "aget_xcom",
    "airflow_plugin_base",
    "conf",
    "event_submitter",
    "mask_secret",
    "metadata_db_connections",
    "object_storage_path",
    "server_connection",
    "server_db",
    "stats",
    "store_xcom",
    "task_state_store",
    "update_connection_extras",
    "xcom_value",
]
