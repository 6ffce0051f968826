"""The provider's errors, each saying what to do; where no task retry can help, the class is also an
``AirflowFailException``, so Airflow fails the task at once."""

from __future__ import annotations

import copyreg
from typing import Any

from airflow_provider_modelroute import api
from airflow_provider_modelroute.version_compat import AirflowException, AirflowFailException


class ModelRouteError(AirflowException):
    """Base class of every error raised by this provider."""

    def __reduce__(self) -> tuple[Any, ...]:  # unpickled from its state: subclasses take other arguments
        return (copyreg.__newobj__, (type(self), *self.args), self.__dict__)  # type: ignore[attr-defined]


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
    """An error answer of the API; ``retryable`` and ``permanent`` come from ``api.classify_error``."""

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
        self.code, self.message, self.http_status = code, message, http_status
        self.retryable, self.permanent = api.classify_error(code, http_status, retryable)
        self.details, self.request_id, self.retry_after = details or [], request_id, retry_after
        fields = "; ".join(
            f"{d.get('field', '?')}: {d.get('message') or d.get('code', '')}"
            for d in self.details
            if isinstance(d, dict)
        )
        hint = api.error_hint(code, http_status)
        super().__init__(
            f"ModelRoute {code}{f' (HTTP {http_status})' if http_status else ''}: {message}"
            + (f" [{fields}]" if fields else "")
            + (f". What to do: {hint}" if hint else "")
            + (f". Request id: {request_id}" if request_id else "")
        )


class ModelRoutePermanentError(ModelRouteApiError, AirflowFailException):
    """An API error no retry can fix (auth, input, not found, balance, an unlisted 4xx): no retries."""


def api_error(code: str, message: str, **kwargs: Any) -> ModelRouteApiError:
    """The error of an API error answer: ``ModelRoutePermanentError`` when no retry can fix it."""
    permanent = api.classify_error(code, kwargs.get("http_status"), kwargs.get("retryable"))[1]
    return (ModelRoutePermanentError if permanent else ModelRouteApiError)(code, message, **kwargs)


class ModelRouteExecutionError(ModelRouteError):
    """An execution ended without a result: ``status`` is FAILED, CANCELLED or EXPIRED."""

    def __init__(
        self, execution_id: str, status: str, code: str | None, message: str | None, hint: str | None = None
    ) -> None:
        self.execution_id, self.status, self.code, self.message = execution_id, status, code, message
        self.hint = hint
        detail = f" {code}: {message}." if code or message else ""
        super().__init__(
            f"ModelRoute execution {execution_id} ended {status}.{detail}"
            + (f" What to do: {hint}" if hint else "")
        )


class ModelRouteExecutionFinalError(ModelRouteExecutionError, AirflowFailException):
    """An execution ended in a way no task retry can change: no Airflow retries."""


class ModelRouteExecutionTimeout(ModelRouteExecutionError):
    """Our own deadline passed before the execution finished; ``message`` names the limit."""

    def __init__(self, execution_id: str, message: str) -> None:
        super().__init__(execution_id, "TIMED OUT", None, message)
        self.args = (f"Stopped waiting for ModelRoute execution {execution_id}: {message}",)


def raise_for_execution(execution: dict[str, Any], *, final: bool = False) -> None:
    """Raise the error of a FAILED / CANCELLED / EXPIRED execution; ``final``: no task retry can help."""
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
