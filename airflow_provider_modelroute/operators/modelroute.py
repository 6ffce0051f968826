"""ModelRouteExecuteOperator: submit an execution, re-attach to it on retry, and wait for it.

Cheap to import (DAG files import it at every parse): the hook and trigger modules, which pull in
the HTTP clients, are imported only when a task runs.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Sequence
from datetime import timedelta
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow_provider_modelroute import api, cost
from airflow_provider_modelroute._compat import (
    AirflowFailException,
    BaseOperator,
    BaseOperatorLink,
    conf,
    task_state_store,
    xcom_value,
)
from airflow_provider_modelroute.exceptions import (
    ModelRouteConfigError,
    ModelRouteError,
    ModelRouteExecutionError,
    ModelRouteExecutionTimeout,
    raise_for_execution,
)
from airflow_provider_modelroute.utils.openlineage_mixin import OpenLineageMixin

if TYPE_CHECKING:
    from airflow_provider_modelroute._compat import Context, TaskInstanceKey
    from airflow_provider_modelroute.hooks.modelroute import ModelRouteHook
    from airflow_provider_modelroute.triggers.modelroute import ModelRouteExecutionTrigger
    from airflow_provider_modelroute.webhooks.mode import WebhookWait

#: Where the operator keeps its execution across tries (Airflow 3.3+ task state store).
STATE_KEY = "modelroute_execution"
#: How many failed executions a task may leave behind before it stops starting new ones.
MAX_GENERATIONS = 100
#: With ``execution_timeout`` set, our deadline falls this long (at most 20 % of it) before it,
#: to leave time to cancel.
TIMEOUT_MARGIN = 30.0


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

    A retry never pays twice: the ``Idempotency-Key`` derives from the task instance (dag, run,
    task, map index) and the request, not the try number, so a retry after a crash or a timed-out
    wait re-attaches to the execution the earlier try started. A COMPLETED execution is returned at
    once (also when the POST itself answers it); a FAILED, CANCELLED or EXPIRED one fails this try,
    and the next try starts at most one new execution. A failure that a new execution would repeat
    (e.g. ``CONTENT_MODERATION_REJECTED``) fails the task without Airflow retries. On Airflow 3.3+
    the execution id is also kept in the task state store.

    The execution id is pushed to XCom (key ``execution_id``) as soon as it is known; the return
    value is the execution's summary: ``id``, ``status``, ``result``, ``files``, cost fields.

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
        self.execution_id: str | None = None
        self._webhook: WebhookWait | None = None
        self.max_estimated_cost = cost.check_limit(max_estimated_cost)
        self.summary: dict[str, Any] | None = None

    @cached_property
    def hook(self) -> ModelRouteHook:
        from airflow_provider_modelroute.hooks.modelroute import ModelRouteHook

        return ModelRouteHook(self.modelroute_conn_id)

    # -- submit / re-attach ---------------------------------------------------------------------

    def _request_body(self) -> dict[str, Any]:
        if not isinstance(self.model, str) or not self.model.strip():
            raise ModelRouteConfigError("model must be a non-empty model slug, e.g. model='flux-1.1-pro'")
        if not isinstance(self.input, dict):
            raise ModelRouteConfigError(
                f"input must be a dict (the model's input object), got {type(self.input).__name__}"
            )
        return {
            "model": self.model,
            "input": self.input,
            "metadata": self.metadata,
            "webhook": self.webhook_url,
        }

    def _key_base(self, context: Context) -> str:
        """Same task instance + same request = same key base, on every try."""
        ti = context["ti"]
        identity = {
            "dag_id": ti.dag_id,
            "run_id": ti.run_id,
            "task_id": ti.task_id,
            "map_index": getattr(ti, "map_index", -1),
            "request": self._request_body(),
        }
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
        return f"airflow-{digest[:40]}"

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
        store = task_state_store(context)
        if store is not None:
            store.set(STATE_KEY, {"base": base, "generation": generation, "execution_id": execution_id})

    @staticmethod
    def _resume_point(context: Context, base: str) -> tuple[int, int]:
        """The generation to start from, and how many generations' keys earlier tries may have sent.

        Airflow 3.3+ keeps the generation in the task state store. Elsewhere, ASSUMPTION: each try
        sends at most one generation's key that no try sent before (see ``submit``), so before try
        ``n`` at most ``n - 1`` keys were sent.
        """
        store = task_state_store(context)
        if store is not None:
            state = store.get(STATE_KEY)
            if isinstance(state, dict) and state.get("base") == base:
                generation = int(state.get("generation", 0))
                return generation, generation + 1
            return 0, 0
        return 0, max(int(context["ti"].try_number) - 1, 0)

    def submit(self, context: Context) -> dict[str, Any]:
        """Start the execution, or find the one an earlier try of this task instance started.

        Keys are ``<base>-g<generation>``. A key an earlier try may have sent can replay that try's
        answer, perhaps a stale one: the execution is read again before deciding. If it has failed
        since, the next generation starts a new execution, unless it failed in a way a new one would
        repeat. The answer to a key no try sent before is this try's own execution, whatever its
        status: it is never submitted again.
        """
        self._request_body()  # validates model and input before any request
        if self.force_new_execution:
            base, first, sent_before = f"airflow-{uuid.uuid4()}", 0, 0
        else:
            base = self._key_base(context)
            first, sent_before = self._resume_point(context, base)
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

    # -- wait ------------------------------------------------------------------------------------

    def _deadline(self, context: Context) -> float | None:
        """Absolute time our wait ends: ``timeout`` from now, and before ``execution_timeout`` strikes."""
        deadline = time.time() + self.timeout if self.timeout else None
        start = getattr(context["ti"], "start_date", None)
        if self.execution_timeout and start is not None:
            budget = self.execution_timeout.total_seconds()
            limit = start.timestamp() + budget - min(TIMEOUT_MARGIN, 0.2 * budget)
            deadline = min(deadline, limit) if deadline else limit
        return deadline

    def _trigger(self, execution_id: str, deadline: float | None) -> ModelRouteExecutionTrigger:
        from airflow_provider_modelroute.triggers.modelroute import ModelRouteExecutionTrigger

        wait: dict[str, Any] = {"poll_interval": self.poll_interval}
        if self._webhook is not None:
            wait.update(self._webhook.trigger_kwargs())
        return ModelRouteExecutionTrigger(
            execution_id=execution_id,
            modelroute_conn_id=self.modelroute_conn_id,
            deadline=deadline,
            cancel_on_kill=self.cancel_on_kill,
            **wait,
        )

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
        trigger = self._trigger(execution_id, self._deadline(context))
        from airflow_provider_modelroute.operators.deferral import defer_to_trigger, wait_in_worker

        if self.deferrable:
            if self._webhook is not None:
                self._webhook.announce(context, execution_id)
            defer_to_trigger(self, context, trigger)

        try:
            event = wait_in_worker(trigger)
        except BaseException:
            # Killed or timed out by Airflow while waiting here: don't leave the execution running.
            self._cancel(execution_id, "the task was interrupted")
            raise
        return self.execute_complete(context, event)

    def execute_complete(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        """Turn the trigger's event into the task's result; cancel what no later try will wait for."""
        from airflow_provider_modelroute.operators.deferral import (
            execution_from_event,
            is_foreign_event,
            is_stale_resume,
        )

        if is_stale_resume(context, event):
            self.log.info("Ignoring the event of try %s: this try re-attaches", event["try_number"])
            return self.execute(context)
        if is_foreign_event(context, event):
            self.log.warning(
                "Ignoring an event about execution %s: this task re-attaches", event["execution_id"]
            )
            return self.execute(context)

        execution_id = str(event.get("execution_id")) if isinstance(event, dict) else None
        self.execution_id = execution_id
        ti = context["ti"]
        retry_left = ti.try_number <= ti.max_tries
        try:
            return self._result(context, execution_from_event(event, limit=self._limit()))
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
        limits = []
        if self.timeout:
            limits.append(f"timeout={self.timeout:g} s (this operator's `timeout` parameter)")
        if self.execution_timeout:
            limits.append(
                f"execution_timeout={self.execution_timeout.total_seconds():g} s (less a margin to cancel)"
            )
        return " or ".join(limits) or "its deadline"

    def _result(self, context: Context, summary: dict[str, Any]) -> dict[str, Any]:
        """The return value: the summary with its cost fields (also kept for OpenLineage)."""
        self.summary = cost.with_final_cost(self, context, summary)
        return self.summary

    def _check_estimate(self, context: Context, execution: dict[str, Any]) -> None:
        """Log the hold and estimate; over ``max_estimated_cost``: cancel at once, fail without retries."""
        cost.note_estimate(self, context, execution)
        if not cost.over_limit(execution, self.max_estimated_cost):
            return
        try:
            self.hook.cancel_execution(str(execution["id"]))
            outcome = "cancelled it"
        except ModelRouteError as exc:
            outcome = f"could not cancel it ({exc}); cancel it in the ModelRoute dashboard"
        raise cost.limit_error(execution, self.max_estimated_cost, outcome)

    def _cancel(self, execution_id: str | None, reason: str) -> None:
        """Best-effort cancel that says honestly what happened."""
        if not (self.cancel_on_kill and execution_id):
            return
        try:
            result = self.hook.cancel_execution(execution_id)
        except Exception as exc:
            self.log.warning(
                "Could not cancel ModelRoute execution %s after %s (%s): it may still be running.",
                execution_id,
                reason,
                exc,
            )
            return
        if result is None:
            self.log.info("ModelRoute execution %s had already finished when %s", execution_id, reason)
        else:
            self.log.info("Cancelled ModelRoute execution %s because %s", execution_id, reason)

    def on_kill(self) -> None:
        self._cancel(self.execution_id, "the task was killed")
