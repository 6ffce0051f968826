"""The only module that knows which Airflow it runs on (2.11 and 3.x); cheap to import.

The provider imports every Airflow name from here (``airflow.providers.common.compat.sdk`` resolves them).
"""
# ruff: noqa: F401

from __future__ import annotations

import contextlib
import importlib
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

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import Connection, Context
    from airflow.sdk.types import TaskInstanceKey  # type-checked against Airflow 3

_AIRFLOW = Version(Version(_airflow_version).base_version)
if Version("2.11") > _AIRFLOW:
    raise RuntimeError(f"airflow-provider-modelroute needs Apache Airflow 2.11+, not {_airflow_version}")
AIRFLOW_V_3_1_PLUS = Version("3.1") <= _AIRFLOW

try:
    from airflow.providers.common.compat.sdk import mask_secret
except ImportError:  # common-compat < 1.22 (the newest for Python 3.10 is 1.20): its homes on 3.1+, 3.0, 2.11
    for _home in (
        "airflow.sdk.log",
        "airflow.sdk.execution_time.secrets_masker",
        "airflow.utils.log.secrets_masker",
    ):
        with contextlib.suppress(ImportError, AttributeError):
            mask_secret = importlib.import_module(_home).mask_secret
            break


async def aget_connection(conn_id: str) -> Connection:
    """Look a connection up without blocking the triggerer's event loop."""
    from airflow.providers.common.compat.connection import get_async_connection

    return await get_async_connection(conn_id)


def xcom_value(ti_key: TaskInstanceKey, key: str) -> Any:
    """Read an XCom value for an operator extra link."""
    from airflow.providers.common.compat.sdk import XCom

    return XCom.get_value(ti_key=ti_key, key=key)


def stats() -> Any:
    """Airflow's metrics client (StatsD, OpenTelemetry or nothing, as the deployment configured it)."""
    try:
        from airflow.providers.common.compat.sdk import Stats
    except ImportError:  # common-compat releases that do not map it yet
        from airflow.stats import Stats
    return Stats


def taskflow() -> tuple[Any, Any, Any]:
    """TaskFlow's ``DecoratedOperator``, ``task_decorator_factory``, ``determine_kwargs`` (3.x or 2.11),
    imported on first use: they are not cheap, and only ``@task.modelroute`` needs them."""
    from airflow.providers.common.compat.sdk import DecoratedOperator, task_decorator_factory

    try:
        from airflow.sdk.bases.decorator import determine_kwargs
    except ImportError:  # Airflow 2.11
        from airflow.utils.operator_helpers import determine_kwargs
    return DecoratedOperator, task_decorator_factory, determine_kwargs


def object_storage_path(url: str, conn_id: str | None = None) -> Any:
    """An ``ObjectStoragePath``, imported on first use."""
    from airflow.providers.common.compat.sdk import ObjectStoragePath

    return ObjectStoragePath(url, conn_id=conn_id)
