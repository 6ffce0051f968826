"""Apache Airflow provider for ModelRoute: submit AI executions, wait deferrably, store their files."""

from __future__ import annotations

__version__ = "0.1.0"
