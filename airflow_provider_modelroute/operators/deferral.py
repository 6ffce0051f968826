"""How the operator and the sensor wait on ModelRouteExecutionTrigger across deferrals and tries.

Defer, or run the trigger in place; on resume, tell an earlier try's or another execution's event
from this one's; keep which execution (key generation) a task instance is on, for its next try.
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from typing import TYPE_CHECKING, Any, NoReturn

from airflow_provider_modelroute.exceptions import (
    ModelRouteError,
    ModelRouteExecutionTimeout,
    api_error,
    raise_for_execution,
)
from airflow_provider_modelroute.version_compat import task_state_store

if TYPE_CHECKING:
    from airflow_provider_modelroute.triggers.modelroute import ModelRouteExecutionTrigger
    from airflow_provider_modelroute.version_compat import BaseOperator, Context
    from airflow_provider_modelroute.webhooks.mode import WebhookWait

#: The framework's deferral timeout fires this long after the trigger's own deadline, never first.
DEFER_GRACE = timedelta(minutes=2)
#: Where the operator keeps its execution across tries (Airflow 3.3+ task state store).
STATE_KEY = "modelroute_execution"


def resume_point(context: Context, base: str) -> tuple[int, int]:
    """The key generation to start from, and how many generations' keys earlier tries may have sent.

    Airflow 3.3+ keeps the generation in the task state store. Elsewhere, ASSUMPTION: each try
    sends at most one generation's key that no try sent before (see the operator's ``submit``), so
    before try ``n`` at most ``n - 1`` keys were sent.
    """
    store = task_state_store(context)
    if store is not None:
        state = store.get(STATE_KEY)
        if isinstance(state, dict) and state.get("base") == base:
            generation = int(state.get("generation", 0))
            return generation, generation + 1
        return 0, 0
    return 0, max(int(context["ti"].try_number) - 1, 0)


def save_generation(context: Context, base: str, generation: int, execution_id: str) -> None:
    """Keep the task instance's key generation and execution for its next try (Airflow 3.3+)."""
    store = task_state_store(context)
    if store is not None:
        store.set(STATE_KEY, {"base": base, "generation": generation, "execution_id": execution_id})


def make_trigger(
    execution_id: str,
    conn_id: str,
    *,
    poll_interval: float,
    deadline: float | None,
    webhook: WebhookWait | None,
    cancel_on_kill: bool = False,
) -> ModelRouteExecutionTrigger:
    """The trigger that waits for ``execution_id``: polling every ``poll_interval``, or in webhook mode."""
    from airflow_provider_modelroute.triggers.modelroute import ModelRouteExecutionTrigger

    wait = webhook.trigger_kwargs() if webhook is not None else {"poll_interval": poll_interval}
    return ModelRouteExecutionTrigger(
        execution_id=execution_id,
        modelroute_conn_id=conn_id,
        deadline=deadline,
        cancel_on_kill=cancel_on_kill,
        **wait,
    )


def defer_to_trigger(task: BaseOperator, context: Context, trigger: ModelRouteExecutionTrigger) -> NoReturn:
    """Defer ``task`` to ``trigger``; it resumes in ``execute_complete(context, event)``."""
    trigger.try_number = context["ti"].try_number
    timeout = None
    if trigger.deadline is not None:
        timeout = timedelta(seconds=max(trigger.deadline - time.time(), 0)) + DEFER_GRACE
    task.defer(trigger=trigger, method_name="execute_complete", timeout=timeout)
    raise AssertionError("BaseOperator.defer() returned")  # it always raises TaskDeferred


def is_stale_resume(context: Context, event: Any) -> bool:
    """True when a retry was resumed with an earlier try's event: start it over instead.

    Airflow 3.0 keeps ``next_method`` and the event when a deferred task goes up for retry, so the
    retry would otherwise re-raise the failure that ended the previous try.
    """
    deferred_on = event.get("try_number") if isinstance(event, dict) else None
    return isinstance(deferred_on, int) and context["ti"].try_number > deferred_on


def is_foreign_event(context: Context, event: Any) -> bool:
    """True when the event is about another execution than the one this task pushed to XCom.

    Airflow on SQLite reuses trigger ids: a trigger that fires late (e.g. after a stalled triggerer)
    can resume a newer task that got its id. Such a task starts over and re-attaches instead.
    """
    ti = context["ti"]
    claimed = event.get("execution_id") if isinstance(event, dict) else None
    if claimed is None:
        return False
    mine = ti.xcom_pull(task_ids=ti.task_id, key="execution_id", map_indexes=getattr(ti, "map_index", -1))
    return mine is not None and claimed != mine


def execution_from_event(
    event: Any, execution_id: str | None = None, *, limit: str = "its deadline", final: bool = False
) -> dict[str, Any]:
    """Validate a trigger event: return the COMPLETED execution's summary, or raise what it reports.

    ``limit`` names what set the wait's deadline (for the timeout message); ``final``: an execution
    that ended unsuccessfully fails the task without retries (see ``raise_for_execution``).
    """
    if not isinstance(event, dict) or event.get("status") not in ("done", "timeout", "error"):
        raise ModelRouteError(f"Unexpected event from ModelRouteExecutionTrigger: {event!r}")
    event_id = str(event.get("execution_id"))
    if execution_id is not None and event_id != execution_id:
        raise ModelRouteError(f"Got an event for execution {event_id} while waiting for {execution_id}")
    if event["status"] == "timeout":
        raise ModelRouteExecutionTimeout(
            event_id, message=f"it was still running when the wait reached {limit}"
        )
    if event["status"] == "error":
        error = event.get("error") or {}
        if "http_status" in error:
            raise api_error(
                str(error.get("code")),
                str(error.get("message")),
                http_status=error.get("http_status"),
                retryable=error.get("retryable"),
                request_id=error.get("request_id"),
            )
        raise ModelRouteError(
            f"Waiting for ModelRoute execution {event_id} failed: {error.get('code')}: {error.get('message')}"
        )
    summary: dict[str, Any] = event["execution"]
    raise_for_execution(summary, final=final)
    return summary


def wait_in_worker(trigger: ModelRouteExecutionTrigger) -> dict[str, Any]:
    """Run a trigger to its one event here, in a private event loop (the non-deferrable wait)."""

    async def first_event() -> dict[str, Any]:
        async for event in trigger.run():
            return dict(event.payload)
        raise ModelRouteError("ModelRouteExecutionTrigger ended without an event")

    return asyncio.run(first_event())
