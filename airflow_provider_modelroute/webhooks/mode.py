"""Webhook mode for the operator and the sensor: decide it, route the execution, configure the trigger.

Off by default; on when the connection names a webhook secret and the receiver's URL, the wait is
deferrable, and Airflow mounts the receiver (3.1+). The trigger then reads the event the receiver
may already have recorded (an Airflow call, not a ModelRoute one) and polls only as a safety net.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from airflow_provider_modelroute._compat import (
    WEBHOOK_RECEIVER_SUPPORTED,
    AirflowNotFoundException,
    aget_xcom,
)
from airflow_provider_modelroute.exceptions import ModelRouteConfigError
from airflow_provider_modelroute.webhooks.config import WebhookConfig
from airflow_provider_modelroute.webhooks.routing import (
    EVENT_XCOM_KEY,
    TaskRoute,
    execution_webhook_url,
    waiting_xcom_key,
)

if TYPE_CHECKING:
    from airflow_provider_modelroute._compat import Context


@dataclass(frozen=True)
class WebhookWait:
    """One task's webhook-mode wait: the connection's settings and the task instance's route."""

    config: WebhookConfig
    route: TaskRoute

    @classmethod
    def decide(
        cls, *, hook: Any, requested: bool | None, deferrable: bool, context: Context
    ) -> WebhookWait | None:
        """The webhook wait for this task, or None to poll; ``requested=True`` fails when it cannot be.

        Call it before submitting: it prepares the XCom the receiver records an early event in.
        """
        if requested is False:
            return None
        problem = None
        if not deferrable:
            problem = "webhook mode needs deferrable=True (the receiver resumes deferred tasks)"
        elif not WEBHOOK_RECEIVER_SUPPORTED:
            problem = "webhook mode needs Airflow 3.1+ (the receiver is an api-server plugin app)"
        config = None
        if problem is None:
            conn_id = hook.modelroute_conn_id
            try:
                extras = hook.get_connection(conn_id).extra_dejson
            except AirflowNotFoundException:  # the submit reports it, naming the fix
                return None
            config = WebhookConfig.from_extras(conn_id, extras)
            if config is None:
                problem = (
                    f"connection {conn_id!r} has no webhook_secret: run `python -m "
                    f"airflow_provider_modelroute.webhooks --conn-id {conn_id} setup --public-url ...`"
                )
        if config is None:
            if requested:
                raise ModelRouteConfigError(f"webhook=True, but {problem}")
            return None
        # An empty slot for the receiver to fill, pushed before anything is submitted: the trigger's
        # read then finds a row (a missing one is logged as an error by Airflow's API client).
        context["ti"].xcom_push(key=EVENT_XCOM_KEY, value=None)
        return cls(config, TaskRoute.of(context["ti"]))

    @property
    def webhook_url(self) -> str:
        """The per-execution ``webhook_url``: the receiver, this task instance's route and its token."""
        return execution_webhook_url(self.config.receiver_url, self.config.secret, self.route)

    def announce(self, context: Context, execution_id: str) -> None:
        """Mark this task as waiting for ``execution_id``, so organisation-wide deliveries find it."""
        context["ti"].xcom_push(key=waiting_xcom_key(execution_id), value=execution_id)

    def trigger_kwargs(self) -> dict[str, Any]:
        return {"poll_interval": self.config.poll_interval, "webhook_route": dataclasses.asdict(self.route)}


async def delivered_event(route: dict[str, Any], execution_id: str) -> dict[str, Any] | None:
    """The final event the receiver recorded for this task and execution, if any (one XCom read)."""
    value = await aget_xcom(key=EVENT_XCOM_KEY, **route)
    if (
        isinstance(value, dict)
        and value.get("execution_id") == execution_id
        and value.get("status") == "done"
    ):
        return {k: v for k, v in value.items() if k != "try_number"}
    return None
