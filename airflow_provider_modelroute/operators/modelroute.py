"""Operators that run and cancel ModelRoute executions, and the link to an execution's dashboard page.

Cheap to import (DAG files import it at every parse): the HTTP clients load only when a task runs.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from datetime import timedelta
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow_provider_modelroute import api
from airflow_provider_modelroute.exceptions import (
    ModelRouteConfigError,
    ModelRouteError,
    ModelRouteExecutionError,
    ModelRouteExecutionTimeout,
    raise_for_execution,
)
from airflow_provider_modelroute.operators import deferral
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

#: How many failed executions a task may leave behind before it stops starting new ones.
MAX_GENERATIONS = 100
#: With ``execution_timeout`` set, our deadline falls this long (at most 20 % of it) before it.
TIMEOUT_MARGIN = 30.0
#: XCom key of the hold and estimate the POST answered (a deferred task resumes without that answer).
ESTIMATE_XCOM_KEY = "cost_estimate"


class ModelRouteExecutionLink(BaseOperatorLink):
    """Opens the task's execution in the ModelRoute dashboard."""

    name = "ModelRoute execution"

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        return str(xcom_value(ti_key, "execution_url") or "")


def _seconds(value: float | timedelta | None, name: str) -> float | None:
    if value is None:
        return None
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if seconds <= 0:
        raise ModelRouteConfigError(f"{name} must be positive, got {value!r}")
    return seconds


class ModelRouteExecuteOperator(OpenLineageMixin, BaseOperator):
    """
    Submit a ModelRoute execution and (by default) wait for it, deferrably if asked.

    A retry never pays twice: the ``Idempotency-Key`` derives from the task instance and the
    request, not the try number, so a retry re-attaches to the execution an earlier try started
    (kept in the task state store too, on Airflow 3.3+). A FAILED, CANCELLED or EXPIRED execution
    fails this try, and the next try starts at most one new one; a failure a new execution would
    repeat (e.g. ``CONTENT_MODERATION_REJECTED``) fails the task without retries. The id goes to
    XCom (``execution_id``) at once; the return value is the execution's summary.

    :param model: The model slug, e.g. ``flux-1.1-pro``. (templated)
    :param input: The model's input object; file inputs are ``file_...`` references. (templated)
    :param metadata: Key-value metadata stored with the execution. (templated)
    :param webhook_url: Optional URL ModelRoute calls when the execution ends. (templated)
    :param modelroute_conn_id: The Airflow connection to ModelRoute.
    :param wait_for_completion: Wait for the execution to end (default) or return once submitted.
    :param deferrable: Wait in the triggerer instead of holding a worker slot.
    :param poll_interval: Seconds between status polls while waiting.
    :param timeout: Longest wait of one try (seconds or timedelta); then the try fails. With retries
        left, the execution is left running and the next try re-attaches to it (see
        ``restart_on_timeout``); on the last try it is cancelled. Default: no limit of our own
        (ModelRoute expires executions that never end). With ``execution_timeout`` set, the wait
        also ends in time to cancel before it.
    :param restart_on_timeout: Cancel the execution whenever a try's wait times out, so that the
        next try starts a new one (paid again) instead of re-attaching.
    :param cancel_on_kill: Cancel the execution when the task is killed, times out or gives up.
    :param force_new_execution: Start a new execution even if an earlier try started one.
    :param webhook: Webhook mode (Airflow 3.1+, deferrable waits): ModelRoute's delivery ends the wait
        and polling slows to a safety net. None (default): on when the connection has a
        ``webhook_secret`` and ``webhook_receiver_url``; True: required; False: off.
    :param max_estimated_cost: Cancel the execution at once and fail the task (no retries) when the
        submit answer's ``estimated_cost`` is above this amount. Default: no limit.
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
        self.poll_interval = _seconds(poll_interval, "poll_interval") or 5.0
        self.timeout = _seconds(timeout, "timeout")
        self.restart_on_timeout = restart_on_timeout
        self.cancel_on_kill = cancel_on_kill
        self.force_new_execution = force_new_execution
        self.webhook = webhook
        limit = api.amount(max_estimated_cost)
        if max_estimated_cost is not None and (limit is None or limit < 0):
            raise ModelRouteConfigError(
                "max_estimated_cost must be a non-negative amount in the account's currency (e.g. 0.5 or "
                f"'0.50'), got {max_estimated_cost!r}"
            )
        self.max_estimated_cost = max_estimated_cost
        self.execution_id: str | None = None
        self.summary: dict[str, Any] | None = None
        self._webhook: WebhookWait | None = None

    @cached_property
    def hook(self) -> ModelRouteHook:
        from airflow_provider_modelroute.hooks.modelroute import ModelRouteHook

        return ModelRouteHook(self.modelroute_conn_id)

    def _remember(self, context: Context, execution: dict[str, Any], base: str, generation: int) -> None:
        """Make the execution id known at once: log, XCom, extra link, and the durable task store."""
        self.execution_id = execution_id = str(execution["id"])
        url = self.hook.execution_url(execution_id)
        # The URL ends the line: the UI's log viewer would make a ")" after it part of the link.
        self.log.info(
            "ModelRoute execution %s is %s; dashboard: %s", execution_id, execution.get("status"), url
        )
        context["ti"].xcom_push(key="execution_id", value=execution_id)
        context["ti"].xcom_push(key="execution_url", value=url)
        deferral.save_generation(context, base, generation, execution_id)

    def submit(self, context: Context) -> dict[str, Any]:
        """Start the execution, or find the one an earlier try of this task instance started.

        Keys are ``<base>-g<generation>``. A key an earlier try may have sent can replay that try's
        answer, perhaps a stale one: the execution is read again before deciding. If it has failed
        since, the next generation starts a new execution, unless it failed in a way a new one would
        repeat. The answer to a key no try sent before is this try's own execution, whatever its
        status: it is never submitted again. The hook checks ``model`` and ``input`` before sending.
        """
        if self.force_new_execution:
            base, first, sent_before = f"airflow-{uuid.uuid4()}", 0, 0
        else:
            base = self._key_base(context["ti"])
            first, sent_before = deferral.resume_point(context, base)
        for generation in range(first, MAX_GENERATIONS):
            answer, replayed = self.hook.submit_execution(
                self.model,
                self.input,
                idempotency_key=f"{base}-g{generation}",
                metadata=self.metadata,
                webhook_url=self.webhook_url or (self._webhook.webhook_url if self._webhook else None),
            )
            earlier = generation < sent_before
            execution = self.hook.get_execution(str(answer["id"])) if replayed or earlier else answer
            self._remember(context, execution, base, generation)
            status = str(execution.get("status"))
            if not earlier or status not in api.FAILED_STATUSES:
                return execution
            if status == "FAILED" and api.is_final_failure(execution.get("error")):
                raise_for_execution(execution)  # a new execution would fail alike: start none
            self.log.warning(
                "Execution %s from an earlier try ended %s; starting a new one", execution["id"], status
            )
        raise ModelRouteError(
            f"This task instance already has {MAX_GENERATIONS} failed executions; not starting another. "
            "Fix the cause, then clear the task or set force_new_execution=True."
        )

    def _check_estimate(self, context: Context, execution: dict[str, Any]) -> None:
        """Log and keep the hold and estimate; over ``max_estimated_cost``: cancel, fail without retries."""
        estimate = {name: execution[name] for name in api.ESTIMATE_FIELDS if execution.get(name) is not None}
        self.log.info("ModelRoute execution %s: %s", execution.get("id"), api.describe_costs(estimate))
        if estimate:
            context["ti"].xcom_push(key=ESTIMATE_XCOM_KEY, value=estimate)
        cost, limit = api.amount(execution.get("estimated_cost")), api.amount(self.max_estimated_cost)
        if cost is None or limit is None or cost <= limit:
            return
        outcome = self._cancel(str(execution["id"]), "its estimate is above max_estimated_cost", force=True)
        raise ModelRouteConfigError(
            f"ModelRoute execution {execution.get('id')} has estimated_cost {execution['estimated_cost']}, "
            f"above max_estimated_cost {self.max_estimated_cost}: {outcome}. Raise max_estimated_cost or "
            "choose a cheaper model or input."
        )

    def _deadline(self, context: Context) -> float | None:
        """Absolute time our wait ends: ``timeout`` from now, and before ``execution_timeout`` strikes."""
        deadline = time.time() + self.timeout if self.timeout else None
        start = getattr(context["ti"], "start_date", None)
        if self.execution_timeout and start is not None:
            budget = self.execution_timeout.total_seconds()
            limit = start.timestamp() + budget - min(TIMEOUT_MARGIN, 0.2 * budget)
            deadline = min(deadline, limit) if deadline else limit
        return deadline

    def execute(self, context: Context) -> dict[str, Any]:
        from airflow_provider_modelroute.webhooks.mode import WebhookWait

        waits = self.deferrable and self.wait_for_completion
        self._webhook = WebhookWait.decide(
            hook=self.hook, requested=self.webhook, deferrable=waits, context=context
        )
        execution = self.submit(context)
        execution_id = str(execution["id"])
        self._check_estimate(context, execution)
        if not self.wait_for_completion or api.is_terminal(str(execution.get("status"))):
            raise_for_execution(execution)
            return self._result(context, api.execution_summary(execution))
        trigger = deferral.make_trigger(
            execution_id,
            self.modelroute_conn_id,
            poll_interval=self.poll_interval,
            deadline=self._deadline(context),
            webhook=self._webhook,
            cancel_on_kill=self.cancel_on_kill,
        )
        if self._webhook is not None:  # webhook mode is deferrable only
            self._webhook.announce(context, execution_id)
        if self.deferrable:
            deferral.defer_to_trigger(self, context, trigger)
        try:
            event = deferral.wait_in_worker(trigger)
        except BaseException:
            # Killed or timed out by Airflow while waiting here: don't leave the execution running.
            self._cancel(execution_id, "the task was interrupted")
            raise
        return self.execute_complete(context, event)

    def execute_complete(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        """Turn the trigger's event into the task's result; cancel what no later try will wait for."""
        if deferral.is_stale_resume(context, event) or deferral.is_foreign_event(context, event):
            self.log.warning(
                "Ignoring the event of try %s about execution %s: this try re-attaches",
                event.get("try_number"),
                event.get("execution_id"),
            )
            return self.execute(context)

        self.execution_id = execution_id = str(event.get("execution_id")) if isinstance(event, dict) else None
        retry_left = context["ti"].try_number <= context["ti"].max_tries
        try:
            return self._result(context, deferral.execution_from_event(event, limit=self._limit()))
        except ModelRouteExecutionTimeout:
            if self.restart_on_timeout or not retry_left:
                self._cancel(execution_id, "the wait timed out")
            else:
                self.log.warning(
                    "Execution %s is left running: the next try re-attaches to it (restart_on_timeout=True "
                    "cancels it instead)",
                    execution_id,
                )
            raise
        except ModelRouteExecutionError:
            raise  # it ended: nothing to cancel
        except ModelRouteError as exc:
            if retry_left and not isinstance(exc, AirflowFailException):
                self.log.warning(
                    "Waiting failed; execution %s is left running for the retry to re-attach to", execution_id
                )
            else:
                self._cancel(execution_id, "the wait failed and no retry will re-attach")
            raise

    def _limit(self) -> str:
        """Which limit a timed-out wait reached, named as the parameter that sets it."""
        limits = [f"timeout={self.timeout:g} s (this operator's `timeout` parameter)"] if self.timeout else []
        if self.execution_timeout:
            budget = self.execution_timeout.total_seconds()
            limits.append(f"execution_timeout={budget:g} s (less a margin to cancel)")
        return " or ".join(limits) or "its deadline"

    def _result(self, context: Context, summary: dict[str, Any]) -> dict[str, Any]:
        """The return value, with the estimate from submit time if the last answer lacked it."""
        missing = [name for name in api.ESTIMATE_FIELDS if summary.get(name) is None]
        if missing:
            ti = context["ti"]
            saved = ti.xcom_pull(task_ids=ti.task_id, key=ESTIMATE_XCOM_KEY, map_indexes=ti.map_index)
            if isinstance(saved, dict):
                summary = {**summary, **{name: saved[name] for name in missing if name in saved}}
        self.log.info(
            "ModelRoute execution %s is %s: %s",
            summary.get("id"),
            summary.get("status"),
            api.describe_costs(summary),
        )
        self.summary = summary  # also read by OpenLineage
        return summary

    def _cancel(self, execution_id: str | None, reason: str, *, force: bool = False) -> str:
        """Best-effort cancel (if ``cancel_on_kill`` or ``force``) that says honestly what happened."""
        if not ((self.cancel_on_kill or force) and execution_id):
            return "left it running"
        try:
            result = self.hook.cancel_execution(execution_id)
        except Exception as exc:
            self.log.warning(
                "Could not cancel ModelRoute execution %s after %s (%s): it may still be running.",
                execution_id,
                reason,
                exc,
            )
            return f"could not cancel it ({exc}); cancel it in the ModelRoute dashboard"
        if result is None:
            self.log.info("ModelRoute execution %s had already finished when %s", execution_id, reason)
            return "it had already finished"
        self.log.info("Cancelled ModelRoute execution %s because %s", execution_id, reason)
        return "cancelled it"

    def _key_base(self, ti: Any) -> str:
        """This task instance's idempotency key base: the same on every try of the same request."""
        request = {
            "model": self.model,
            "input": self.input,
            "metadata": self.metadata,
            "webhook": self.webhook_url,
        }
        return api.idempotency_key_base(
            ti.dag_id, ti.run_id, ti.task_id, getattr(ti, "map_index", -1), request=request
        )

    def on_kill(self) -> None:
        self._cancel(self.execution_id, "the task was killed")


class ModelRouteCancelExecutionOperator(BaseOperator):
    """
    Cancel a ModelRoute execution (its hold is released). One that has already finished is not an error.

    Returns (XCom) the execution's summary after the cancel request, as the execute operator does.

    :param execution_id: The ``exec_...`` id, e.g.
        ``{{ ti.xcom_pull(task_ids='generate', key='execution_id') }}``. (templated)
    :param modelroute_conn_id: The Airflow connection to ModelRoute.
    """

    template_fields: Sequence[str] = ("execution_id",)
    ui_color = "#e3ecfa"

    def __init__(self, *, execution_id: str, modelroute_conn_id: str = "modelroute_default", **kwargs: Any):
        super().__init__(**kwargs)
        self.execution_id = execution_id
        self.modelroute_conn_id = modelroute_conn_id

    @cached_property
    def hook(self) -> ModelRouteHook:
        from airflow_provider_modelroute.hooks.modelroute import ModelRouteHook

        return ModelRouteHook(self.modelroute_conn_id)

    def execute(self, context: Context) -> dict[str, Any]:
        execution_id = str(self.execution_id)
        answer = self.hook.cancel_execution(execution_id)  # None: it had already finished
        if isinstance(answer, dict) and answer.get("status"):
            execution = answer
        else:
            execution = self.hook.get_execution(execution_id)
        status = execution.get("status")
        if answer is None:
            self.log.info("ModelRoute execution %s had already finished: it is %s", execution_id, status)
        else:
            self.log.info("Cancelled ModelRoute execution %s: it is now %s", execution_id, status)
        return api.execution_summary(execution)
