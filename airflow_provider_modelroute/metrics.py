"""The provider's metrics (docs/lineage-and-metrics.md), sent through Airflow's ``Stats``: dimensions are in
the name (plain StatsD drops tags) and also tags. A metric never fails a task."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

from airflow_provider_modelroute import api

log = logging.getLogger(__name__)


def _send(kind: str, name: str, value: Any, **tags: str) -> None:
    try:
        from airflow_provider_modelroute.version_compat import stats

        getattr(stats(), kind)(f"modelroute.{name}", value, tags=tags or None)
    except Exception as exc:  # a metrics backend must never fail a task or a trigger
        log.debug("Could not send metric %s: %s", name, exc)


def request(method: str, target: str, status: int | None) -> None:
    """Count an answer (or a connection failure: ``status`` None) as ``request.<endpoint>.<outcome>``, e.g.
    ``get_executions_result`` for ``GET .../v1/executions/exec_1/result``, ``storage`` for a presigned URL."""
    path, prefix = urlsplit(target).path, f"{api.API_PREFIX}/"
    words = [w for w in path.rpartition(prefix)[2].split("/") if w and not w.startswith(("exec_", "file_"))]
    endpoint = "storage" if "://" in target and prefix not in path else "_".join([method.lower(), *words])
    if status is None:
        outcome = "connection_error"
    elif status == 429:
        outcome = "rate_limited"
        _send("incr", "rate_limited", 1)
    else:
        outcome = "ok" if status < 400 else "client_error" if status < 500 else "server_error"
    _send("incr", f"request.{endpoint}.{outcome}", 1, endpoint=endpoint, outcome=outcome)


def retry() -> None:
    """A request retried (after a retryable error or a 429) or a download resumed."""
    _send("incr", "retry", 1)


def rate_budget_wait(seconds: float) -> None:
    """Time a request waited for the rate-limit window to reopen."""
    if seconds >= 0.001:
        _send("timing", "rate_budget.wait", timedelta(seconds=seconds))


def poll_to_terminal(seconds: float, status: str) -> None:
    """Time from the first status poll of a wait to the poll that saw the execution end."""
    _send("timing", "execution.poll_to_terminal", timedelta(seconds=seconds), status=status)


def bytes_transferred(direction: str, count: int) -> None:
    _send("incr", f"bytes.{direction}", count)
