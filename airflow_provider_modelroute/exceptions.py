"""One error model for the provider: every failure is a ``ModelRouteError`` that says what to do.

API errors keep the API's ``code``, ``message``, ``retryable``, ``details`` and ``request_id``.
Errors that no task retry can fix without a human change (bad input, bad credentials, bad
configuration) also subclass ``AirflowFailException``, so Airflow fails the task at once instead of
burning its retries.
"""

from __future__ import annotations

from typing import Any

from airflow_provider_modelroute import api
from airflow_provider_modelroute._compat import AirflowException, AirflowFailException


class ModelRouteError(AirflowException):
    """Base class of every error raised by this provider."""


class ModelRouteConfigError(ModelRouteError, AirflowFailException):
    """The connection or the task's arguments are wrong; the message names the field and the fix."""


class ModelRouteConnectionError(ModelRouteError):
    """No usable HTTP response: connection refused or dropped, timeout, truncated body."""

    retryable = True
    #: A kept-alive connection the server had closed: the first retry goes at once.
    stale = False


class ModelRouteTransferError(ModelRouteError):
    """A file transfer could not be completed and verified (nothing was published)."""


class ModelRouteApiError(ModelRouteError):
    """An error response from the ModelRoute API, with the fields of its documented error body."""

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
        spec = api.ERROR_CODES.get(self.code)
        if spec is not None:
            text += f". What to do: {spec.hint}"
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


class ModelRouteAuthError(ModelRouteApiError, AirflowFailException):
    """UNAUTHORIZED: the API key is wrong, revoked or missing."""


class ModelRouteInputError(ModelRouteApiError, AirflowFailException):
    """The request itself is wrong (validation, moderation, file format, idempotency conflict)."""


class ModelRouteNotFoundError(ModelRouteApiError):
    """The execution or file does not exist, has expired, or belongs to another organization."""


class ModelRouteRateLimitError(ModelRouteApiError):
    """RATE_LIMITED: too many requests; ``retry_after`` says how long to wait."""


_CLASS_BY_CODE: dict[str, type[ModelRouteApiError]] = {
    "UNAUTHORIZED": ModelRouteAuthError,
    "INPUT_VALIDATION_ERROR": ModelRouteInputError,
    "CONTENT_MODERATION_REJECTED": ModelRouteInputError,
    "FILE_FORMAT_UNSUPPORTED": ModelRouteInputError,
    "IDEMPOTENCY_CONFLICT": ModelRouteInputError,
    "FILE_NOT_FOUND": ModelRouteNotFoundError,
    "EXECUTION_NOT_FOUND": ModelRouteNotFoundError,
    "RATE_LIMITED": ModelRouteRateLimitError,
}
_CLASS_BY_STATUS: dict[int, type[ModelRouteApiError]] = {
    401: ModelRouteAuthError,
    404: ModelRouteNotFoundError,
    429: ModelRouteRateLimitError,
}


def api_error(
    code: str, message: str, *, http_status: int | None = None, **kwargs: Any
) -> ModelRouteApiError:
    """Build the most specific error class for an API error code (or, failing that, HTTP status)."""
    cls = _CLASS_BY_CODE.get(code) or _CLASS_BY_STATUS.get(http_status or 0, ModelRouteApiError)
    return cls(code, message, http_status=http_status, **kwargs)


class ModelRouteExecutionError(ModelRouteError):
    """An execution ended without a result: FAILED, CANCELLED or EXPIRED, or our deadline passed."""

    status = "FAILED"

    def __init__(self, execution_id: str, code: str | None = None, message: str | None = None) -> None:
        self.execution_id = execution_id
        self.code = code
        self.message = message
        detail = f" {code}: {message}" if code or message else ""
        super().__init__(f"ModelRoute execution {execution_id} ended {self.status}.{detail}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.execution_id, self.code, self.message))


class ModelRouteExecutionFailed(ModelRouteExecutionError):
    status = "FAILED"


class ModelRouteExecutionCancelled(ModelRouteExecutionError):
    status = "CANCELLED"


class ModelRouteExecutionExpired(ModelRouteExecutionError):
    status = "EXPIRED"


class ModelRouteExecutionTimeout(ModelRouteExecutionError):
    """Our own deadline (the task's ``timeout``) passed before the execution finished."""

    status = "TIMED OUT"


EXECUTION_ERRORS: dict[str, type[ModelRouteExecutionError]] = {
    "FAILED": ModelRouteExecutionFailed,
    "CANCELLED": ModelRouteExecutionCancelled,
    "EXPIRED": ModelRouteExecutionExpired,
}


def raise_for_execution(execution: dict[str, Any]) -> None:
    """Raise the error matching a FAILED / CANCELLED / EXPIRED execution (no-op otherwise)."""
    cls = EXECUTION_ERRORS.get(str(execution.get("status")))
    if cls is not None:
        error = execution.get("error") or {}
        raise cls(str(execution.get("id")), error.get("code"), error.get("message"))
