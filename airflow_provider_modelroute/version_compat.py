"""The only module that knows which Airflow it runs on.

Names come from ``airflow.providers.common.compat.sdk`` (``airflow.sdk`` on 3.x, the old homes on
2.11) and triggers from ``airflow.triggers.base``. Features newer than 2.11 are detected here, once.
Everything imported at module top is cheap: DAG files import the provider at every parse.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from airflow import __version__ as _airflow_version
from airflow.providers.common.compat.sdk import (
    AirflowException,
    AirflowFailException,
    AirflowNotFoundException,
    AirflowSensorTimeout,
    AirflowSkipException,
    Asset,
    AssetAlias,
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


__all__ = [
    "AIRFLOW_V_3_1_PLUS",
    "AirflowException",
    "AirflowFailException",
    "AirflowNotFoundException",
    "AirflowSensorTimeout",
    "AirflowSkipException",
    "Asset",
    "AssetAlias",
    "BaseHook",
    "BaseOperator",
    "BaseOperatorLink",
    "BaseSensorOperator",
    "BaseTrigger",
    "PokeReturnValue",
    "TriggerEvent",
    "aget_connection",
    "conf",
    "mask_secret",
    "object_storage_path",
    "stats",
    "task_state_store",
    "xcom_value",
]
