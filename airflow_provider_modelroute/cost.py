"""What an execution costs: the hold and estimate at submit, the final cost, and ``max_estimated_cost``.

Amounts stay as the API sends them (decimal strings such as ``"0.040"``) in logs and XCom; they are
compared as ``Decimal``, never as floats.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

from airflow_provider_modelroute._compat import AirflowFailException
from airflow_provider_modelroute.exceptions import ModelRouteConfigError, ModelRouteError

if TYPE_CHECKING:
    from airflow_provider_modelroute._compat import Context

#: The execution's cost fields, as the API names them.
COST_FIELDS = ("hold_amount", "estimated_cost", "cost")
#: XCom key of the hold and estimate the POST answered (a deferred task resumes without that answer).
ESTIMATE_XCOM_KEY = "cost_estimate"


class ModelRouteCostLimitError(ModelRouteError, AirflowFailException):
    """The ``estimated_cost`` is above the task's ``max_estimated_cost`` (a retry would be too)."""


def amount(value: Any) -> Decimal | None:
    """An API amount (string or number) as a Decimal; None when absent or not a number."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = Decimal(str(value).strip())
    except InvalidOperation:
        return None
    return number if number.is_finite() else None


def check_limit(value: Any) -> Any:
    """Validate ``max_estimated_cost`` (None, or a non-negative number or decimal string)."""
    number = amount(value)
    if value is not None and (number is None or number < 0):
        raise ModelRouteConfigError(
            f"max_estimated_cost must be a non-negative amount in the account's currency (e.g. 0.5 or "
            f"'0.50'), got {value!r}"
        )
    return value


def describe(execution: dict[str, Any]) -> str:
    """``hold_amount 0.048, estimated_cost 0.040`` (the fields the execution has)."""
    shown = [f"{name} {execution[name]}" for name in COST_FIELDS if execution.get(name) is not None]
    return ", ".join(shown) or "no cost fields"


def note_estimate(task: Any, context: Context, execution: dict[str, Any]) -> None:
    """Log the POST answer's hold and estimate, and keep them for the task's return value."""
    estimate = {name: execution[name] for name in COST_FIELDS[:2] if execution.get(name) is not None}
    task.log.info("ModelRoute execution %s: %s", execution.get("id"), describe(estimate))
    if estimate:
        context["ti"].xcom_push(key=ESTIMATE_XCOM_KEY, value=estimate)


def over_limit(execution: dict[str, Any], limit: Any) -> bool:
    """Whether the execution's ``estimated_cost`` is above ``limit`` (never, without either)."""
    estimate, maximum = amount(execution.get("estimated_cost")), amount(limit)
    return maximum is not None and estimate is not None and estimate > maximum


def limit_error(execution: dict[str, Any], limit: Any, cancelled: str) -> ModelRouteCostLimitError:
    """The error of an execution over ``max_estimated_cost``; ``cancelled`` says what became of it."""
    return ModelRouteCostLimitError(
        f"ModelRoute execution {execution.get('id')} has estimated_cost {execution['estimated_cost']}, "
        f"above max_estimated_cost {limit}: {cancelled}. Raise max_estimated_cost or choose a cheaper "
        "model or input."
    )


def with_final_cost(task: Any, context: Context, summary: dict[str, Any]) -> dict[str, Any]:
    """Fill in the estimate from submit time if the last answer lacked it; log the final cost."""
    missing = [name for name in COST_FIELDS[:2] if summary.get(name) is None]
    if missing:
        ti = context["ti"]
        saved = ti.xcom_pull(task_ids=ti.task_id, key=ESTIMATE_XCOM_KEY, map_indexes=ti.map_index)
        if isinstance(saved, dict):
            summary = {**summary, **{name: saved[name] for name in missing if name in saved}}
    task.log.info(
        "ModelRoute execution %s is %s: %s", summary.get("id"), summary.get("status"), describe(summary)
    )
    return summary
