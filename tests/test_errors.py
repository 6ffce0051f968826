"""The error classes: fail-at-once where no retry can help, a hint for every error answer, pickling."""

from __future__ import annotations

import pickle

import pytest

from airflow_provider_modelroute import api
from airflow_provider_modelroute.exceptions import (
    ModelRouteApiError,
    ModelRouteExecutionError,
    ModelRouteExecutionFinalError,
    ModelRouteExecutionTimeout,
    ModelRoutePermanentError,
    api_error,
    raise_for_execution,
)
from airflow_provider_modelroute.version_compat import AirflowFailException


@pytest.mark.parametrize("status", [*range(400, 430), *range(500, 512)])
def test_every_error_answer_has_a_hint(status: int) -> None:
    for code in [*api.ERROR_CODES, f"HTTP_{status}", "SOMETHING_NEW"]:
        assert "What to do: " in str(api_error(code, "m", http_status=status)), code


@pytest.mark.parametrize(
    ("code", "status", "permanent"),
    [
        ("UNAUTHORIZED", 401, True),
        ("HTTP_404", 404, True),  # an unknown execution may come back as a bare 404...
        ("NOT_A_DOCUMENTED_CODE", 409, True),  # ...or any other 4xx
        ("INTERNAL_ERROR", 500, False),  # a server fault: a later try may succeed
        ("RATE_LIMITED", 429, False),
    ],
)
def test_permanent_api_errors_fail_the_task_at_once(code: str, status: int, permanent: bool) -> None:
    error = api_error(code, "m", http_status=status)
    assert error.permanent is permanent
    assert isinstance(error, ModelRoutePermanentError) is permanent
    assert isinstance(error, AirflowFailException) is permanent


def test_an_execution_that_would_fail_again_fails_at_once() -> None:
    failed = {"id": "exec_1", "status": "FAILED", "error": {"code": "CONTENT_MODERATION_REJECTED"}}
    with pytest.raises(ModelRouteExecutionFinalError, match="change it"):
        raise_for_execution(failed)
    with pytest.raises(ModelRouteExecutionError) as err:
        raise_for_execution({"id": "exec_1", "status": "EXPIRED"})
    assert err.value.status == "EXPIRED" and not isinstance(err.value, AirflowFailException)
    raise_for_execution({"id": "exec_1", "status": "COMPLETED"})  # no error


@pytest.mark.parametrize(
    "error",
    [
        ModelRouteApiError("GENERATION_FAILED", "m", http_status=500, request_id="req_1", retry_after=2.0),
        ModelRoutePermanentError("UNAUTHORIZED", "m", http_status=401),
        ModelRouteExecutionFinalError("exec_1", "FAILED", "GENERATION_FAILED", "m", "retry"),
        ModelRouteExecutionTimeout("exec_1", "it was still running"),
    ],
)
def test_errors_survive_pickling(error: Exception) -> None:
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error) and str(copy) == str(error)
    assert vars(copy) == vars(error)
