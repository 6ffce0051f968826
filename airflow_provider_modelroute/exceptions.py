"""The provider's errors: a few classes by meaning, each saying what to do.

Whether a retry can help is an attribute (``retryable``, ``permanent``), decided by ``api.py``. A class
also subclasses ``AirflowFailException`` where no task retry can help (wrong configuration, a request
the API refuses for good, an execution that would fail again), so Airflow fails the task at once
instead of burning its retries; the factories below pick that class from the attribute.
"""

from __future__ import annotations

from typing import Any

from airflow_provider_modelroute import api
from airflow_provider_modelroute.version_compat import AirflowException, AirflowFailException


class ModelRouteError(AirflowException):
    """Base class of every error raised by this provider."""


class ModelRouteConfigError(ModelRouteError, AirflowFailException):
    """The connection or the task's arguments are wrong, or a limit the task set was hit; no retry."""


class ModelRouteConnectionError(ModelRouteError):
    """No usable HTTP response: connection refused or dropped, timeout, truncated body."""

    retryable = True
    #: A kept-alive connection the server had closed: the first retry goes at once.
    stale = False


class ModelRouteTransferError(ModelRouteError):
    """A file transfer could not be completed and verified (nothing was published)."""


class ModelRouteApiError(ModelRouteError):
    """An error answer of the ModelRoute API, with the fields of its documented error body.

    ``retryable``: sending the request again may succeed; ``permanent``: no task retry can fix it.
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        http_status: int | None = None,
        retryable: bool | None = None,
        details: list[dict[str, Any]] | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.code = code
        self.message = message
        self.http_status = http_status
        self.retryable = api.is_retryable_error(code, http_status, retryable)
        self.permanent = api.is_permanent_error(code, http_status, self.retryable)
        self.details = details or []
        self.request_id = request_id
        self.retry_after = retry_after
        super().__init__(self._describe())

    def _describe(self) -> str:
        status = f" (HTTP {self.http_status})" if self.http_status else ""
        text = f"ModelRoute {self.code}{status}: {self.message}"
        fields = "; ".join(
            f"{d.get('field', '?')}: {d.get('message') or d.get('code', '')}"
            for d in self.details
            if isinstance(d, dict)
        )
        if fields:
            text += f" [{fields}]"
        hint = api.error_hint(self.code, self.http_status)
        if hint is not None:
            text += f". What to do: {hint}"
        if self.request_id:
            text += f". Request id: {self.request_id}"
        return text

    def __reduce__(self) -> tuple[Any, ...]:
        kwargs = {
            "http_status": self.http_status,
            "retryable": self.retryable,
            "details": self.details,
            "request_id": self.request_id,
            "retry_after": self.retry_after,
        }
        return (_rebuild_api_error, (type(self), self.code, self.message, kwargs))


def _rebuild_api_error(cls: type[ModelRouteApiError], code: str, message: str, kwargs: dict[str, Any]) -> Any:
    return cls(code, message, **kwargs)


class ModelRoutePermanentError(ModelRouteApiError, AirflowFailException):
    """An API error no retry can fix (auth, input, not found, balance, an unlisted 4xx): no retries."""


def api_error(
    code: str, message: str, *, http_status: int | None = None, **kwargs: Any
) -> ModelRouteApiError:
    """The error of an API error answer: ``ModelRoutePermanentError`` when no retry can fix it."""
    permanent = api.is_permanent_error(code, http_status, kwargs.get("retryable"))
    cls = ModelRoutePermanentError if permanent else ModelRouteApiError
    return cls(code, message, http_status=http_status, **kwargs)


class ModelRouteExecutionError(ModelRouteError):
    """An execution ended without a result: ``status`` is FAILED, CANCELLED or EXPIRED."""

    def __init__(
        self,
        execution_id: str,
        status: str,
        code: str | None = None,
        message: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.execution_id = execution_id
        self.status = status
        self.code = code
        self.message = message
        self.hint = hint
        super().__init__(self._text())

    def _text(self) -> str:
        detail = f" {self.code}: {self.message}." if self.code or self.message else ""
        hint = f" What to do: {self.hint}" if self.hint else ""
        return f"ModelRoute execution {self.execution_id} ended {self.status}.{detail}{hint}"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.execution_id, self.status, self.code, self.message, self.hint))


class ModelRouteExecutionFinalError(ModelRouteExecutionError, AirflowFailException):
    """An execution ended in a way no task retry can change: no Airflow retries."""


class ModelRouteExecutionTimeout(ModelRouteExecutionError):
    """Our own deadline passed before the execution finished; ``message`` names the limit."""

    def __init__(self, execution_id: str, message: str) -> None:
        super().__init__(execution_id, "TIMED OUT", None, message)

    def _text(self) -> str:
        return f"Stopped waiting for ModelRoute execution {self.execution_id}: {self.message}"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.execution_id, self.message))


def raise_for_execution(execution: dict[str, Any], *, final: bool = False) -> None:
    """Raise the error of a FAILED / CANCELLED / EXPIRED execution (no-op otherwise).

    ``final``: no retry can help (a sensor watching this one execution). A FAILED execution whose
    code would fail again with the same input is final anyway: no Airflow retries, no new execution.
    """
    status = str(execution.get("status"))
    if status not in api.FAILED_STATUSES:
        return
    error: dict[str, Any] = execution.get("error") or {}
    repeats = status == "FAILED" and api.is_final_failure(error)
    hint = api.error_hint(error.get("code"))
    if repeats:
        hint = f"{hint or 'change the input'}. A new execution would fail the same way: not retrying"
    elif final:
        hint = "the execution has ended; a retry of this task cannot change that"
    cls = ModelRouteExecutionFinalError if final or repeats else ModelRouteExecutionError
    raise cls(str(execution.get("id")), status, error.get("code"), error.get("message"), hint)
