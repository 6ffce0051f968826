"""Operators that run and cancel ModelRoute executions, the link to an execution's dashboard page, and how
the operator and the sensor wait on ModelRouteExecutionTrigger across deferrals and tries."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict
from datetime import timedelta
from decimal import Decimal, InvalidOperation
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow_provider_modelroute import api
from airflow_provider_modelroute.exceptions import (
    ModelRouteConfigError,
    ModelRouteError,
    ModelRouteExecutionError,
    ModelRouteExecutionTimeout,
    api_error,
    raise_for_execution,
)
from airflow_provider_modelroute.utils.openlineage_mixin import OpenLineageMixin
from airflow_provider_modelroute.version_compat import (
    AirflowFailException,
    BaseOperator,
    BaseOperatorLink,
    conf,
    xcom_value,
)

if TYPE_CHECKING:
    from airflow_provider_modelroute.hooks.modelroute import ModelRouteHook
    from airflow_provider_modelroute.version_compat import Context, TaskInstanceKey
    from airflow_provider_modelroute.webhooks.mode import WebhookWait


class ModelRouteExecutionLink(BaseOperatorLink):
    """Opens the task's execution in the ModelRoute dashboard."""

    name = "ModelRoute execution"

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        return str(xcom_value(ti_key, "execution_url") or "")


class ModelRouteHookMixin:
    """The ``hook`` of a task with a ``modelroute_conn_id``, built when the task first uses it."""

    modelroute_conn_id: str

    @cached_property
    def hook(self) -> ModelRouteHook:
        from airflow_provider_modelroute.hooks.modelroute import ModelRouteHook

        return ModelRouteHook(self.modelroute_conn_id)


#: The hold and estimate the POST answers: shown as sent (decimal strings), compared as ``Decimal``.
ESTIMATE_FIELDS = ("hold_amount", "estimated_cost")


def _amount(value: Any) -> Decimal | None:
    """An API amount (string or number) as a Decimal; None when absent or not a number."""
    try:
        number = Decimal(str(value).strip())
    except InvalidOperation:
        return None
    return number if number.is_finite() else None


def _costs(execution: dict[str, Any]) -> str:
    """``hold_amount 0.048, estimated_cost 0.040``: the cost fields the execution has."""
    found = [f"{n} {execution[n]}" for n in (*ESTIMATE_FIELDS, "cost") if execution.get(n) is not None]
    return ", ".join(found) or "no cost fields"


def _seconds(value: float | timedelta, name: str) -> float:
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if seconds <= 0:
        raise ModelRouteConfigError(f"{name} must be positive, got {value!r}")
    return seconds


def resume_point(context: Context, base: str) -> tuple[int, int]:
    """The key generation to start from, and how many keys earlier tries may have sent (one new per try).
    Airflow 3.3+ keeps them in its retry-durable ``task_state_store``; before, only the try number helps."""
    store = context.get("task_state_store")
    if store is None:
        return 0, max(int(context["ti"].try_number) - 1, 0)
    state: Any = store.get("modelroute_execution")
    if isinstance(state, dict) and state.get("base") == base:
        return int(state["generation"]), int(state["generation"]) + 1
    return 0, 0


def save_generation(context: Context, base: str, generation: int, execution_id: str) -> None:
    """Keep the task instance's key generation and execution for its next try (Airflow 3.3+)."""
    if (store := context.get("task_state_store")) is not None:
        store.set("modelroute_execution", dict(base=base, generation=generation, execution_id=execution_id))


def wait_for_trigger(
    task: Any,
    context: Context,
    execution_id: str,
    poll_interval: float,
    deadline: float | None,
    webhook: WebhookWait | None,
) -> dict[str, Any]:
    """Wait for the execution's one trigger event: deferred (resuming in ``execute_complete``), or here."""
    import asyncio

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
    summary: dict[str, Any] = event["execution"]
    raise_for_execution(summary, final=final)
    return summary


class ModelRouteExecuteOperator(ModelRouteHookMixin, OpenLineageMixin, BaseOperator):
    """
    Submit a ModelRoute execution and (by default) wait for it, deferrably if asked.

    A retry re-attaches to the execution an earlier try started (the ``Idempotency-Key`` derives from
    the task instance and the request); a failure a new execution would repeat fails without retries.

    :param model: The model slug, e.g. ``flux-1.1-pro``. (templated)
    :param input: The model's input object; file inputs are ``file_...`` references. (templated)
    :param metadata: Key-value metadata stored with the execution. (templated)
    :param webhook_url: Optional URL ModelRoute calls when the execution ends. (templated)
    :param modelroute_conn_id: The Airflow connection to ModelRoute.
    :param wait_for_completion: Wait for the execution to end (default) or return once submitted.
    :param deferrable: Wait in the triggerer instead of holding a worker slot.
    :param poll_interval: Seconds between status polls while waiting.
    :param timeout: Longest wait of one try (s or timedelta); the last try cancels the execution then.
    :param restart_on_timeout: Cancel the execution at every timed-out wait: the next try starts anew.
    :param cancel_on_kill: Cancel the execution when the task is killed, times out or gives up.
    :param force_new_execution: Start a new execution even if an earlier try started one.
    :param webhook: Webhook mode for deferrable waits: None if the connection has it, True: required.
    :param max_estimated_cost: Above this ``estimated_cost``, cancel at once and fail without retries.
    """

    template_fields: Sequence[str] = ("model", "input", "metadata", "webhook_url")
    template_fields_renderers = {"input": "json", "metadata": "json"}
    openlineage_builder = "execute_lineage"
    operator_extra_links = (ModelRouteExecutionLink(),)
    ui_color = "#e3ecfa"

    def __init__(
        self,
        *,
        model: str,
        input: dict[str, Any],
        metadata: dict[str, Any] | None = None,
        webhook_url: str | None = None,
        modelroute_conn_id: str = "modelroute_default",
        wait_for_completion: bool = True,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        poll_interval: float = 5.0,
        timeout: float | timedelta | None = None,
        restart_on_timeout: bool = False,
        cancel_on_kill: bool = True,
        force_new_execution: bool = False,
        webhook: bool | None = None,
        max_estimated_cost: float | str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.model = model
        self.input = input
        self.metadata = metadata
        self.webhook_url = webhook_url
        self.modelroute_conn_id = modelroute_conn_id
        self.wait_for_completion = wait_for_completion
        self.deferrable = deferrable
        self.poll_interval = _seconds(poll_interval, "poll_interval")
        self.timeout = _seconds(timeout, "timeout") if timeout is not None else None
        self.restart_on_timeout = restart_on_timeout
        self.cancel_on_kill = cancel_on_kill
        self.force_new_execution = force_new_execution
        self.webhook = webhook
        limit = _amount(max_estimated_cost)
        if max_estimated_cost is not None and (limit is None or limit < 0):
            raise ModelRouteConfigError(
                "max_estimated_cost must be a non-negative amount in the account's currency (e.g. 0.5 or "
                f"'0.50'), got {max_estimated_cost!r}"
            )
        self.max_estimated_cost = max_estimated_cost
        self.execution_id: str | None = None
        self.summary: dict[str, Any] | None = None
        self._webhook: WebhookWait | None = None

    def submit(self, context: Context) -> dict[str, Any]:
        """Start the execution, or find the one an earlier try of this task instance started (a new key
        generation after it failed, unless the failure would repeat)."""
        ti = context["ti"]
        if self.force_new_execution:
            base, generation, sent_before = f"airflow-{uuid.uuid4()}", 0, 0
        else:
            request = dict(
                model=self.model, input=self.input, metadata=self.metadata, webhook=self.webhook_url
            )
            base = api.idempotency_key_base(ti, request)
            generation, sent_before = resume_point(context, base)
        webhook_url = self.webhook_url or (self._webhook.webhook_url if self._webhook else None)
        while True:
            answer, replayed = self.hook.submit_execution(
                self.model,
                self.input,
                idempotency_key=f"{base}-g{generation}",
                metadata=self.metadata,
                webhook_url=webhook_url,
            )
            earlier = generation < sent_before
            execution = self.hook.get_execution(str(answer["id"])) if replayed or earlier else answer
            self.execution_id = execution_id = str(execution["id"])
            status, url = str(execution.get("status")), self.hook.execution_url(execution_id)
            # The URL ends the line: the UI's log viewer would make a ")" after it part of the link.
            self.log.info("ModelRoute execution %s is %s; dashboard: %s", execution_id, status, url)
            ti.xcom_push(key="execution_id", value=execution_id)
            ti.xcom_push(key="execution_url", value=url)
            save_generation(context, base, generation, execution_id)
            if not earlier or status not in api.FAILED_STATUSES:
                return execution
            if status == "FAILED" and api.is_final_failure(execution.get("error")):
                raise_for_execution(execution)  # a new execution would fail alike: start none
            self.log.warning("Execution %s of an earlier try ended %s; starting anew", execution_id, status)
            generation += 1

    def execute(self, context: Context) -> dict[str, Any]:
        from airflow_provider_modelroute.webhooks.mode import WebhookWait

        self._webhook = WebhookWait.decide(self, self.deferrable and self.wait_for_completion, context)
        execution = self.submit(context)
        execution_id = str(execution["id"])
        # The cost guard: log and keep the hold and estimate; over max_estimated_cost: cancel, no retries.
        estimate = {name: execution[name] for name in ESTIMATE_FIELDS if execution.get(name) is not None}
        self.log.info("ModelRoute execution %s: %s", execution_id, _costs(estimate))
        if estimate:
            context["ti"].xcom_push(key="cost_estimate", value=estimate)
        cost, limit = _amount(execution.get("estimated_cost")), _amount(self.max_estimated_cost)
        if cost is not None and limit is not None and cost > limit:
            outcome = self._cancel(execution_id, "the estimate is too high", force=True)
            raise ModelRouteConfigError(
                f"ModelRoute execution {execution_id} has estimated_cost {execution['estimated_cost']}, "
                f"above max_estimated_cost {self.max_estimated_cost}: {outcome}. Raise max_estimated_cost "
                "or choose a cheaper model or input."
            )
        if not self.wait_for_completion or api.is_terminal(str(execution.get("status"))):
            raise_for_execution(execution)
            return self._result(context, api.execution_summary(execution))
        deadline = time.time() + self.timeout if self.timeout else None
        start = getattr(context["ti"], "start_date", None)
        if self.execution_timeout and start is not None:  # end in time to cancel before Airflow's timeout
            budget = self.execution_timeout.total_seconds()
            limit = start.timestamp() + budget - min(30.0, 0.2 * budget)
            deadline = min(deadline or limit, limit)
        if self._webhook is not None:  # webhook mode is deferrable only
            self._webhook.announce(context, execution_id)
        try:
            event = wait_for_trigger(self, context, execution_id, self.poll_interval, deadline, self._webhook)
        except BaseException:
            if not self.deferrable:  # killed or timed out by Airflow while waiting here
                self._cancel(execution_id, "the task was interrupted")
            raise
        return self.execute_complete(context, event)

    def execute_complete(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        """Turn the trigger's event into the task's result; cancel what no later try will wait for."""
        if is_foreign_event(context, event):
            self.log.warning("Ignoring an event of an earlier try or another execution: this try re-attaches")
            return self.execute(context)
        self.execution_id = execution_id = event.get("execution_id")
        limits = [f"timeout={self.timeout:g} s (this operator's `timeout` parameter)"] if self.timeout else []
        if self.execution_timeout:
            limits.append(f"execution_timeout={self.execution_timeout.total_seconds():g} s less a margin")
        try:
            return self._result(context, execution_from_event(event, limit=" or ".join(limits)))
        except ModelRouteError as exc:
            timed_out = isinstance(exc, ModelRouteExecutionTimeout)
            if isinstance(exc, ModelRouteExecutionError) and not timed_out:
                raise  # it ended: nothing to cancel
            ti = context["ti"]
            retried = ti.try_number <= ti.max_tries and not isinstance(exc, AirflowFailException)
            if retried and not (timed_out and self.restart_on_timeout):
                self.log.warning("Execution %s keeps running: the next try re-attaches to it", execution_id)
            else:
                self._cancel(execution_id, "no later try will wait for it")
            raise

    def _result(self, context: Context, summary: dict[str, Any]) -> dict[str, Any]:
        """The return value, with the estimate from submit time where the last answer lacks it."""
        missing = [name for name in ESTIMATE_FIELDS if summary.get(name) is None]
        if missing:
            ti = context["ti"]
            saved = ti.xcom_pull(task_ids=ti.task_id, key="cost_estimate", map_indexes=ti.map_index) or {}
            summary = {**summary, **{name: saved[name] for name in missing if name in saved}}
        self.log.info(
            "ModelRoute execution %s is %s: %s", summary.get("id"), summary.get("status"), _costs(summary)
        )
        self.summary = summary  # also read by OpenLineage
        return summary

    def _cancel(self, execution_id: str | None, reason: str, *, force: bool = False) -> str:
        """Best-effort cancel (if ``cancel_on_kill`` or ``force``); says what happened."""
        if not ((self.cancel_on_kill or force) and execution_id):
            return "left it running"
        try:
            cancelled = self.hook.cancel_execution(execution_id) is not None
            outcome = "cancelled it" if cancelled else "it had already finished"
        except Exception as exc:
            outcome = f"could not cancel it ({exc}); cancel it in the ModelRoute dashboard"
        self.log.warning("ModelRoute execution %s: %s; %s", execution_id, reason, outcome)
        return outcome

    def on_kill(self) -> None:
        self._cancel(self.execution_id, "the task was killed")


class ModelRouteCancelExecutionOperator(ModelRouteHookMixin, BaseOperator):
    """
    Cancel a ModelRoute execution (its hold is released); one already finished is not an error.

    :param execution_id: The ``exec_...`` id, e.g. the execute operator's XCom ``execution_id``. (templated)
    :param modelroute_conn_id: The Airflow connection to ModelRoute.
    """

    template_fields: Sequence[str] = ("execution_id",)
    ui_color = "#e3ecfa"

    def __init__(self, *, execution_id: str, modelroute_conn_id: str = "modelroute_default", **kwargs: Any):
        super().__init__(**kwargs)
        self.execution_id = execution_id
        self.modelroute_conn_id = modelroute_conn_id

    def execute(self, context: Context) -> dict[str, Any]:
        execution_id = str(self.execution_id)
        answer = self.hook.cancel_execution(execution_id)  # None: it had already finished
        execution = answer if answer and answer.get("status") else self.hook.get_execution(execution_id)
        done = "had already finished" if answer is None else "was cancelled"
        self.log.info("ModelRoute execution %s %s: it is %s", execution_id, done, execution.get("status"))
        return api.execution_summary(execution)
