"""ModelRouteExecutionTrigger: wait for an execution without holding a worker slot (non-deferrable
waits run it on the worker: the provider has one poll loop)."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow_provider_modelroute import api, metrics
from airflow_provider_modelroute.exceptions import ModelRouteApiError, ModelRouteError
from airflow_provider_modelroute.hooks.modelroute import ModelRouteAsyncHook
from airflow_provider_modelroute.version_compat import BaseTrigger, TriggerEvent

#: Polls that may fail in a row, each after its own HTTP retries, before the wait gives up.
MAX_CONSECUTIVE_FAILURES = 5
#: How long ``on_kill`` may spend cancelling the execution.
CANCEL_TIMEOUT = 15.0


def poll_grid(poll_interval: float, pollers: int) -> float:
    """The grid of the loop's clock that pauses end on, so that due polls share a wake-up (0: none)."""
    grid = min(0.5, poll_interval / 10, 10 * poll_interval / max(1, pollers))
    return grid if grid >= 0.05 else 0.0


class ModelRouteExecutionTrigger(BaseTrigger):
    """
    Poll a ModelRoute execution until it ends, its deadline passes, or polling keeps failing.

    Yields one event, ``{"status": "done", "execution": <summary>}`` (terminal, COMPLETED or not),
    ``{"status": "timeout"}`` or ``{"status": "error", "error": {...}}``, with ``execution_id`` (and
    ``try_number``, when given).

    :param execution_id: The execution to wait for (``exec_...``).
    :param modelroute_conn_id: The Airflow connection to ModelRoute.
    :param poll_interval: Seconds between polls (jittered by ±10 %).
    :param deadline: Unix time of the timeout event; None waits until the execution ends.
    :param cancel_on_kill: Cancel the execution when a user kills the deferred task (Airflow 3.3+).
    :param try_number: The deferring task's try, echoed in the event (a later try can tell it apart).
    :param webhook_route: Webhook mode: the waiting task instance, whose recorded event is read first;
        polling is the slow safety net.
    """

    def __init__(
        self,
        execution_id: str,
        modelroute_conn_id: str = ModelRouteAsyncHook.default_conn_name,
        poll_interval: float = 5.0,
        deadline: float | None = None,
        cancel_on_kill: bool = False,
        try_number: int | None = None,
        webhook_route: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.execution_id = execution_id
        self.modelroute_conn_id = modelroute_conn_id
        self.poll_interval = float(poll_interval)
        self.deadline = float(deadline) if deadline is not None else None
        self.cancel_on_kill = bool(cancel_on_kill)
        self.try_number = try_number
        self.webhook_route = webhook_route

    def serialize(self) -> tuple[str, dict[str, Any]]:
        names = ("execution_id", "modelroute_conn_id", "poll_interval", "deadline", "cancel_on_kill")
        kwargs = {name: getattr(self, name) for name in (*names, "try_number", "webhook_route")}
        return f"{type(self).__module__}.{type(self).__qualname__}", kwargs

    async def run(self) -> AsyncIterator[TriggerEvent]:
        try:
            event = await self._delivered()
            if event is not None:
                self.log.info(
                    "ModelRoute execution %s ended before the task deferred (webhook)", self.execution_id
                )
            else:
                event = await self._poll()
        except ModelRouteApiError as exc:
            fields = ("code", "message", "http_status", "retryable", "request_id")
            event = {"status": "error", "error": {name: getattr(exc, name) for name in fields}}
        except Exception as exc:
            event = {"status": "error", "error": {"code": type(exc).__name__, "message": str(exc)}}
        event["execution_id"] = self.execution_id
        if self.try_number is not None:
            event["try_number"] = self.try_number
        yield TriggerEvent(event)

    def _next_poll(self, pollers: int = 1) -> float:
        """The pause before the next poll: jittered (widely in webhook mode), ending on the poll grid."""
        spread = 0.25 if self.webhook_route is not None else 0.1
        pause = self.poll_interval * random.uniform(1 - spread, 1 + spread)
        grid, now = poll_grid(self.poll_interval, pollers), asyncio.get_running_loop().time()
        return max(0.0, round((now + pause) / grid) * grid - now) if grid else pause

    async def _delivered(self) -> dict[str, Any] | None:
        """Webhook mode: the event the receiver recorded for this task, if any (None otherwise)."""
        if self.webhook_route is None:
            return None
        from airflow_provider_modelroute.webhooks.mode import delivered_event

        try:
            return await delivered_event(self.webhook_route, self.execution_id)
        except Exception as exc:  # the safety net still ends the wait
            self.log.warning("Could not read the recorded webhook event (%s)", exc)
            return None

    async def _poll(self) -> dict[str, Any]:
        # In webhook mode the first delivery is likelier than a poll to end the wait: pause first.
        pause = self._next_poll() if self.webhook_route is not None else 0.0
        failures, unknown, started = 0, set[str](), time.monotonic()
        async with ModelRouteAsyncHook(self.modelroute_conn_id) as client:
            while True:
                left = float("inf") if self.deadline is None else self.deadline - time.time()
                await asyncio.sleep(max(0.0, min(pause, left)))
                if left <= pause:
                    return {"status": "timeout"}
                try:
                    execution = await client.get_execution(self.execution_id)
                except ModelRouteError as exc:
                    failures += 1
                    if not getattr(exc, "retryable", False) or failures >= MAX_CONSECUTIVE_FAILURES:
                        raise
                    self.log.warning(
                        "Polling ModelRoute execution %s failed (%d of %d in a row): %s",
                        self.execution_id,
                        failures,
                        MAX_CONSECUTIVE_FAILURES,
                        exc,
                    )
                    pause = max(client.transport.settings.retry.backoff(failures), self.poll_interval)
                    continue
                failures, status = 0, str(execution.get("status"))
                if api.is_terminal(status):
                    self.log.info("ModelRoute execution %s is %s", self.execution_id, status)
                    metrics.poll_to_terminal(time.monotonic() - started, status)
                    return {"status": "done", "execution": api.execution_summary(execution)}
                if not api.is_known_status(status) and status not in unknown:
                    unknown.add(status)
                    self.log.warning(
                        "ModelRoute execution %s has unknown status %r; waiting", self.execution_id, status
                    )
                pause = self._next_poll(client.sharing)

    async def on_kill(self) -> None:
        """Cancel the execution when a user kills the deferred task (Airflow 3.3+); not when a webhook
        delivered its end (the receiver resumed the task, and Airflow stops this trigger through here)."""
        delivered = await self._delivered()
        if delivered is not None:
            self.log.info(
                "ModelRoute execution %s ended (%s) and the task resumed from its webhook (event %s): "
                "this wait is over, nothing was cancelled",
                self.execution_id,
                delivered.get("execution", {}).get("status"),
                delivered.get("webhook_event_id"),
            )
        elif self.cancel_on_kill:
            try:
                async with ModelRouteAsyncHook(self.modelroute_conn_id) as client:
                    result = await asyncio.wait_for(
                        client.cancel_execution(self.execution_id), CANCEL_TIMEOUT
                    )
            except Exception as exc:
                self.log.warning(
                    "The task was killed but cancelling ModelRoute execution %s failed (%s): it may still be "
                    "running and billing; cancel it in the ModelRoute dashboard.",
                    self.execution_id,
                    exc,
                )
                return
            if result is None:
                self.log.info(
                    "The task was killed; ModelRoute execution %s had already finished", self.execution_id
                )
            else:
                self.log.info("The task was killed; cancelled ModelRoute execution %s", self.execution_id)
