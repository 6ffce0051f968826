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
        hint = api.error_hint(self.code)
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
    """The API refused the request for a reason no retry can fix: the task fails without retries."""


class ModelRouteAuthError(ModelRoutePermanentError):
    """UNAUTHORIZED (or a bare 401/403): the API key is wrong, revoked or missing."""


class ModelRouteInputError(ModelRoutePermanentError):
    """The request itself is wrong (validation, moderation, file format)."""


class ModelRouteNotFoundError(ModelRoutePermanentError):
    """The execution or file does not exist, has expired, or belongs to another organization."""


class ModelRouteRateLimitError(ModelRouteApiError):
    """RATE_LIMITED: too many requests; ``retry_after`` says how long to wait."""


_CLASS_BY_CODE: dict[str, type[ModelRouteApiError]] = {
    "UNAUTHORIZED": ModelRouteAuthError,
    "INPUT_VALIDATION_ERROR": ModelRouteInputError,
    "CONTENT_MODERATION_REJECTED": ModelRouteInputError,
    "FILE_FORMAT_UNSUPPORTED": ModelRouteInputError,
    "FILE_NOT_FOUND": ModelRouteNotFoundError,
    "RATE_LIMITED": ModelRouteRateLimitError,
}
_CLASS_BY_STATUS: dict[int, type[ModelRouteApiError]] = {
    401: ModelRouteAuthError,
    403: ModelRouteAuthError,
    404: ModelRouteNotFoundError,
    429: ModelRouteRateLimitError,
}


def api_error(
    code: str, message: str, *, http_status: int | None = None, **kwargs: Any
) -> ModelRouteApiError:
    """Build the most specific error class for an API error code (or, failing that, HTTP status)."""
    cls = _CLASS_BY_CODE.get(code) or _CLASS_BY_STATUS.get(http_status or 0, ModelRouteApiError)
    if api.is_permanent_error(code, http_status, kwargs.get("retryable")) != issubclass(
        cls, ModelRoutePermanentError
    ):
        # the status named a class, but the body says otherwise (e.g. a 404 marked retryable)
        cls = ModelRoutePermanentError if cls is ModelRouteApiError else ModelRouteApiError
    return cls(code, message, http_status=http_status, **kwargs)


class ModelRouteExecutionError(ModelRouteError):
    """An execution ended without a result: FAILED, CANCELLED or EXPIRED, or our deadline passed."""

    status = "FAILED"

    def __init__(
        self,
        execution_id: str,
        code: str | None = None,
        message: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.execution_id = execution_id
        self.code = code
        self.message = message
        self.hint = hint
        super().__init__(self._text())

    def _text(self) -> str:
        detail = f" {self.code}: {self.message}." if self.code or self.message else ""
        hint = f" What to do: {self.hint}" if self.hint else ""
        return f"ModelRoute execution {self.execution_id} ended {self.status}.{detail}{hint}"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.execution_id, self.code, self.message, self.hint))


class ModelRouteExecutionFailed(ModelRouteExecutionError):
    status = "FAILED"


class ModelRouteExecutionCancelled(ModelRouteExecutionError):
    status = "CANCELLED"


class ModelRouteExecutionExpired(ModelRouteExecutionError):
    status = "EXPIRED"


class ModelRouteExecutionFailedFinal(ModelRouteExecutionFailed, AirflowFailException):
    """FAILED in a way a new execution would repeat (or seen by a sensor): no Airflow retries."""


class ModelRouteExecutionCancelledFinal(ModelRouteExecutionCancelled, AirflowFailException):
    """CANCELLED, seen by a sensor: a retry cannot change a terminal state."""


class ModelRouteExecutionExpiredFinal(ModelRouteExecutionExpired, AirflowFailException):
    """EXPIRED, seen by a sensor: a retry cannot change a terminal state."""


class ModelRouteExecutionTimeout(ModelRouteExecutionError):
    """Our own deadline passed before the execution finished; ``message`` names the limit."""

    status = "TIMED OUT"

    def _text(self) -> str:
        return f"Stopped waiting for ModelRoute execution {self.execution_id}: {self.message}"


#: (status, final) -> error class
EXECUTION_ERRORS: dict[tuple[str, bool], type[ModelRouteExecutionError]] = {
    ("FAILED", False): ModelRouteExecutionFailed,
    ("CANCELLED", False): ModelRouteExecutionCancelled,
    ("EXPIRED", False): ModelRouteExecutionExpired,
    ("FAILED", True): ModelRouteExecutionFailedFinal,
    ("CANCELLED", True): ModelRouteExecutionCancelledFinal,
    ("EXPIRED", True): ModelRouteExecutionExpiredFinal,
}


def raise_for_execution(execution: dict[str, Any], *, final: bool = False) -> None:
    """Raise the error matching a FAILED / CANCELLED / EXPIRED execution (no-op otherwise).

    ``final``: no retry can help (a sensor watching this one execution). A FAILED execution whose
    code would fail again with the same input is final anyway: no Airflow retries, no new execution.
    """
    status = str(execution.get("status"))
    error: dict[str, Any] = execution.get("error") or {}
    repeats = status == "FAILED" and api.is_final_failure(error)
    cls = EXECUTION_ERRORS.get((status, final or repeats))
    if cls is None:
        return
    hint = api.error_hint(error.get("code"))
    if repeats:
        hint = f"{hint or 'change the input'}. A new execution would fail the same way: not retrying"
    elif final:
        hint = "the execution has ended; a retry of this task cannot change that"
    raise cls(str(execution.get("id")), error.get("code"), error.get("message"), hint)
