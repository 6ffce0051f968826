"""The provider's metrics, sent through Airflow's ``Stats`` (StatsD or OpenTelemetry, as configured).

Every name is below (README "Metrics" lists them too); StatsD adds Airflow's ``statsd_prefix``
(``airflow.``). Dimensions are part of the name, since plain StatsD drops tags; they are also passed
as tags for the backends that keep them. A metric that cannot be sent never fails a task.
"""

from __future__ import annotations

import functools
import logging
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

from airflow_provider_modelroute import api

#: ``modelroute.request.<endpoint>.<outcome>``: one per API response or connection failure.
#: ``<endpoint>`` is the method and path without ids (``get_executions``, ``post_executions_cancel``,
#: ``get_files_download``...; ``storage`` for presigned URLs); ``<outcome>``: ``ok``, ``rate_limited``,
#: ``client_error``, ``server_error`` or ``connection_error``.
REQUEST = "modelroute.request.{endpoint}.{outcome}"
#: Responses 429 (also counted in ``modelroute.request.*.rate_limited``).
RATE_LIMITED = "modelroute.rate_limited"
#: Retries of a request (after a retryable error or a 429) and resumes of a download.
RETRY = "modelroute.retry"
#: Time a request waited for the rate-limit window (the ``X-RateLimit-*`` budget) to reopen.
RATE_BUDGET_WAIT = "modelroute.rate_budget.wait"
#: Time from the first status poll of a wait to the poll that saw the execution end.
POLL_TO_TERMINAL = "modelroute.execution.poll_to_terminal"
#: Bytes copied by the transfer operators: ``modelroute.bytes.download`` / ``modelroute.bytes.upload``.
BYTES = "modelroute.bytes.{direction}"

log = logging.getLogger(__name__)


@functools.cache
def _stats() -> Any:
    from airflow_provider_modelroute.version_compat import stats

    return stats()


def _send(kind: str, name: str, value: Any, tags: dict[str, str] | None = None) -> None:
    try:
        getattr(_stats(), kind)(name, value, tags=tags)
    except Exception as exc:  # a metrics backend must never fail a task or a trigger
        log.debug("Could not send metric %s: %s", name, exc)


def endpoint(method: str, target: str) -> str:
    """``get_executions_result`` for ``GET .../v1/executions/exec_1/result``; ``storage`` off the API."""
    path = urlsplit(target).path if "://" in target else target
    if "://" in target:
        if f"{api.API_PREFIX}/" not in path:
            return "storage"
        path = path.split(f"{api.API_PREFIX}/", 1)[1]
    words = [word for word in path.split("/") if word and not word.startswith(("exec_", "file_"))]
    return "_".join([method.lower(), *words])


def request(method: str, target: str, status: int | None) -> None:
    """Count one API answer (``status``) or connection failure (``status`` None)."""
    if status is None:
        outcome = "connection_error"
    elif status < 400:
        outcome = "ok"
    elif status == 429:
        outcome = "rate_limited"
        _send("incr", RATE_LIMITED, 1)
    else:
        outcome = "client_error" if status < 500 else "server_error"
    name = endpoint(method, target)
    _send("incr", REQUEST.format(endpoint=name, outcome=outcome), 1, {"endpoint": name, "outcome": outcome})


def retry() -> None:
    _send("incr", RETRY, 1)


def rate_budget_wait(seconds: float) -> None:
    if seconds >= 0.001:
        _send("timing", RATE_BUDGET_WAIT, timedelta(seconds=seconds))


def poll_to_terminal(seconds: float, status: str) -> None:
    _send("timing", POLL_TO_TERMINAL, timedelta(seconds=seconds), {"status": status})


def bytes_transferred(direction: str, count: int) -> None:
    _send("incr", BYTES.format(direction=direction), count)
