"""How the operator and the sensor wait on ModelRouteExecutionTrigger, across deferrals and tries."""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from airflow_provider_modelroute.exceptions import (
    ModelRouteError,
    ModelRouteExecutionTimeout,
    api_error,
    raise_for_execution,
)

if TYPE_CHECKING:
    from airflow_provider_modelroute.version_compat import Context
    from airflow_provider_modelroute.webhooks.mode import WebhookWait


def resume_point(context: Context, base: str) -> tuple[int, int]:
    """The key generation to start from, and how many keys earlier tries may have sent (one new per try).
    Airflow 3.3+ keeps them in its retry-durable ``task_state_store``; before, only the try number helps."""
    store = context.get("task_state_store")
    if store is None:
        return 0, max(int(context["ti"].try_number) - 1, 0)
    state = store.get("modelroute_execution")
    if isinstance(state, dict) and state.get("base") == base:
        return int(state["generation"]), int(state["generation"]) + 1
    return 0, 0


def save_generation(context: Context, base: str, generation: int, execution_id: str) -> None:
    """Keep the task instance's key generation and execution for its next try (Airflow 3.3+)."""
    if (store := context.get("task_state_store")) is not None:
        store.set("modelroute_execution", dict(base=base, generation=generation, execution_id=execution_id))


def wait(
    task: Any,
    context: Context,
    execution_id: str,
    poll_interval: float,
    deadline: float | None,
    webhook: WebhookWait | None,
) -> dict[str, Any]:
    """Wait for the execution's one trigger event: deferred (resuming in ``execute_complete``), or here."""
    from airflow_provider_modelroute.triggers.modelroute import ModelRouteExecutionTrigger

    trigger = ModelRouteExecutionTrigger(
        execution_id=execution_id,
        modelroute_conn_id=task.modelroute_conn_id,
        deadline=deadline,
        cancel_on_kill=getattr(task, "cancel_on_kill", False),  # the sensor never cancels
        try_number=context["ti"].try_number,
        poll_interval=webhook.config.poll_interval if webhook else poll_interval,
        webhook_route=asdict(webhook.route) if webhook else None,
    )
    if task.deferrable:  # Airflow's own timeout must fire after the trigger's timeout event
        timeout = None if deadline is None else timedelta(seconds=max(deadline - time.time(), 0) + 120)
        task.defer(trigger=trigger, method_name="execute_complete", timeout=timeout)

    async def first_event() -> dict[str, Any]:
        return dict((await anext(trigger.run())).payload)

    return asyncio.run(first_event())


def is_foreign_event(context: Context, event: Any, execution_id: str | None = None) -> bool:
    """True for an event of an earlier try (Airflow 3.0 retries) or another execution (reused trigger ids)."""
    ti = context["ti"]
    if isinstance(event.get("try_number"), int) and ti.try_number > event["try_number"]:
        return True
    claimed = event.get("execution_id")
    mine = execution_id or ti.xcom_pull(task_ids=ti.task_id, key="execution_id", map_indexes=ti.map_index)
    return None not in (claimed, mine) and claimed != mine


def execution_from_event(event: Any, *, limit: str, final: bool = False) -> dict[str, Any]:
    """The COMPLETED execution's summary, or raise what the event reports (``final``: without retries)."""
    status = event.get("status")
    execution_id = str(event.get("execution_id"))
    if status == "timeout":
        raise ModelRouteExecutionTimeout(execution_id, f"it was still running when the wait reached {limit}")
    if status == "error":
        error = event.get("error") or {}
        if "http_status" in error:
            raise api_error(**error)
        detail = f"{error.get('code')}: {error.get('message')}"
        raise ModelRouteError(f"Waiting for ModelRoute execution {execution_id} failed: {detail}")
    if status != "done":
        raise ModelRouteError(f"Unexpected event from ModelRouteExecutionTrigger: {event!r}")
    summary: dict[str, Any] = event["execution"]
    raise_for_execution(summary, final=final)
    return summary
