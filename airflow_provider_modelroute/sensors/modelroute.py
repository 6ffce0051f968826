"""ModelRouteExecutionSensor: wait for an execution someone else started to be COMPLETED."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow_provider_modelroute import api
from airflow_provider_modelroute.exceptions import ModelRouteExecutionTimeout, raise_for_execution
from airflow_provider_modelroute.operators.modelroute import (
    ModelRouteExecutionLink,
    ModelRouteHookMixin,
    execution_from_event,
    is_foreign_event,
    wait_for_trigger,
)
from airflow_provider_modelroute.version_compat import (
    AirflowSensorTimeout,
    AirflowSkipException,
    BaseSensorOperator,
    PokeReturnValue,
    conf,
)

if TYPE_CHECKING:
    from airflow_provider_modelroute.version_compat import Context


class ModelRouteExecutionSensor(ModelRouteHookMixin, BaseSensorOperator):
    """
    Wait until a ModelRoute execution is COMPLETED; another end or an unknown id fails without retries.

    Poke, reschedule or deferrable mode with the usual ``timeout`` and ``soft_fail``; it never cancels.

    :param execution_id: The execution to wait for, e.g. the operator's XCom ``execution_id``. (templated)
    :param modelroute_conn_id: The Airflow connection to ModelRoute.
    :param deferrable: Wait in the triggerer instead of holding a worker slot.
    :param webhook: Webhook mode for deferrable waits, as for ``ModelRouteExecuteOperator``.
    """

    template_fields: Sequence[str] = ("execution_id",)
    operator_extra_links = (ModelRouteExecutionLink(),)
    ui_color = "#e3ecfa"

    def __init__(
        self,
        *,
        execution_id: str,
        modelroute_conn_id: str = "modelroute_default",
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        webhook: bool | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.execution_id = execution_id
        self.modelroute_conn_id = modelroute_conn_id
        self.deferrable = deferrable
        self.webhook = webhook

    def poke(self, context: Context) -> PokeReturnValue:
        execution = self.hook.get_execution(self.execution_id)
        status = str(execution.get("status"))
        self.log.info("ModelRoute execution %s is %s", self.execution_id, status)
        if not api.is_terminal(status):
            return PokeReturnValue(is_done=False)
        raise_for_execution(execution, final=True)
        return PokeReturnValue(is_done=True, xcom_value=api.execution_summary(execution))

    def execute(self, context: Context) -> Any:
        context["ti"].xcom_push(key="execution_url", value=self.hook.execution_url(self.execution_id))
        if not self.deferrable:
            return super().execute(context)
        from airflow_provider_modelroute.webhooks.mode import WebhookWait

        webhook = WebhookWait.decide(self, True, context)
        if webhook is not None:  # before the first poke: a delivery after it finds this task
            webhook.announce(context, self.execution_id)
        first = self.poke(context)  # an execution that is already over needs no deferral
        if first.is_done:
            return first.xcom_value
        deadline = time.time() + float(self.timeout) if self.timeout else None
        wait_for_trigger(self, context, self.execution_id, float(self.poke_interval), deadline, webhook)

    def execute_complete(self, context: Context, event: dict[str, Any]) -> Any:
        if is_foreign_event(context, event, self.execution_id):
            self.log.info("Ignoring an event of an earlier try or another execution: poking from the start")
            return self.execute(context)
        limit = f"timeout={float(self.timeout):g} s (this sensor's `timeout` parameter)"
        try:
            return execution_from_event(event, limit=limit, final=True)
        except ModelRouteExecutionTimeout as exc:
            if self.soft_fail:
                raise AirflowSkipException(f"Skipping (soft_fail): {exc}") from exc
            raise AirflowSensorTimeout(f"Sensor timed out: {exc}") from exc
