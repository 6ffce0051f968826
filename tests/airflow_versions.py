"""The Airflow version the tests run on: some behaviours differ by version (the package itself asks
``version_compat`` for features, not versions)."""

from __future__ import annotations

from airflow import __version__
from airflow.triggers.base import BaseTrigger
from packaging.version import Version

_AIRFLOW = Version(Version(__version__).base_version)
AIRFLOW_V_3_0_PLUS = Version("3.0") <= _AIRFLOW
AIRFLOW_V_3_1_PLUS = Version("3.1") <= _AIRFLOW
AIRFLOW_V_3_3_PLUS = Version("3.3") <= _AIRFLOW
#: Airflow 3.3 calls ``BaseTrigger.on_kill`` when a deferred task is killed or times out.
TRIGGER_ON_KILL_SUPPORTED = hasattr(BaseTrigger, "on_kill")
