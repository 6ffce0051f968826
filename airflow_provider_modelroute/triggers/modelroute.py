"""ModelRouteExecutionTrigger: wait for an execution without holding a worker slot.

The same trigger also serves non-deferrable waits (run in a private event loop on the worker), so
there is exactly one polling loop in the provider.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from airflow_provider_modelroute import api, metrics
from airflow_provider_modelroute._compat import BaseTrigger, TriggerEvent
from airflow_provider_modelroute.exceptions import (
    ModelRouteApiError,
    ModelRouteError,
)
from airflow_provider_modelroute.hooks.modelroute import ModelRouteAsyncHook

if TYPE_CHECKING:
    pass

#: How long the trigger's on_kill may spend cancelling the execution.
CANCEL_TIMEOUT = 15.0
#: The polls of one event loop (one triggerer) fall on a grid of the loop's clock, so that the
#: triggers due at about the same time share one wake-up of the loop: at low concurrency, waking a
#: mostly idle triggerer costs more CPU than the poll itself. The grid is at most this many seconds
#: and a tenth of the poll interval, and narrow enough that a point of it holds about
#: ``POLLS_PER_GRID_POINT`` of the loop's polls (no bursts at high concurrency, where wake-ups are
#: shared anyway). A pause ends on the nearest point: a poll moves by at most half the grid, and polls
#: come no later on average.
POLL_GRID = 0.5
POLLS_PER_GRID_POINT = 10
#: A narrower grid is not used: polls that frequent already share the loop's wake-ups.
MIN_POLL_GRID = 0.05


def poll_grid(poll_interval: float, pollers: int) -> float:
    """The width of the loop's poll grid for ``pollers`` triggers polling every ``poll_interval`` s."""
    return min(POLL_GRID, poll_interval / 10, POLLS_PER_GRID_POINT * poll_interval / max(1, pollers))


class ModelRouteExecutionTrigger(BaseTrigger):
    """
    Poll a ModelRoute execution until it ends, its deadline passes, or polling keeps failing.

    Yields exactly one event: ``{"status": "done", "execution": <summary>}`` once the execution is
    terminal (COMPLETED or not), ``{"status": "timeout"}`` at the deadline, or
    ``{"status": "error", "error": {...}}``. Every event carries ``execution_id`` (and
    ``try_number``, when given). All requests of one API key in one process share one rate budget
    (see ``RateBudget``), and the triggers of one event loop share one HTTP session per API origin.

    :param execution_id: The execution to wait for (``exec_...``).
    :param modelroute_conn_id: The Airflow connection to ModelRoute.
    :param poll_interval: Seconds between polls (each jittered by ±10 % to spread the load, then
        moved by at most 0.25 s so that the polls of one triggerer share wake-ups: ``POLL_GRID``).
    :param deadline: Absolute unix time of the timeout event; None waits until the execution ends
        (ModelRoute itself expires executions that never finish).
    :param cancel_on_kill: Cancel the execution when a user kills the deferred task (Airflow 3.3+).
    :param max_consecutive_failures: Polls that may fail in a row, each after its own HTTP retries,
        before the wait gives up: one failed poll never ends a long wait.
    :param try_number: The deferring task's try, echoed in the event so that a later try can tell
        that an event is not its own (see ``is_stale_resume``).
    :param webhook_route: Webhook mode (``webhooks/mode.py``): the waiting task instance. The event
        the receiver recorded for it is read first (an Airflow call); polling is the slow safety net.
    """

    def __init__(
        self,
        execution_id: str,
        modelroute_conn_id: str = ModelRouteAsyncHook.default_conn_name,
        poll_interval: float = 5.0,
        deadline: float | None = None,
        cancel_on_kill: bool = False,
        max_consecutive_failures: int = 5,
        try_number: int | None = None,
        webhook_route: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.execution_id = execution_id
        self.modelroute_conn_id = modelroute_conn_id
        self.poll_interval = float(poll_interval)
        self.deadline = float(deadline) if deadline is not None else None
        self.cancel_on_kill = bool(cancel_on_kill)
        self.max_consecutive_failures = int(max_consecutive_failures)
        self.try_number = try_number
        self.webhook_route = webhook_route

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "execution_id": self.execution_id,
                "modelroute_conn_id": self.modelroute_conn_id,
                "poll_interval": self.poll_interval,
                "deadline": self.deadline,
                "cancel_on_kill": self.cancel_on_kill,
                "max_consecutive_failures": self.max_consecutive_failures,
                "try_number": self.try_number,
                "webhook_route": self.webhook_route,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        try:
            event = await self._wait()
        except ModelRouteApiError as exc:
            event = self._error_event(exc)
        except Exception as exc:
            event = {"status": "error", "error": {"code": type(exc).__name__, "message": str(exc)}}
        event["execution_id"] = self.execution_id
        if self.try_number is not None:
            event["try_number"] = self.try_number
        yield TriggerEvent(event)

    @staticmethod
    def _error_event(exc: ModelRouteApiError) -> dict[str, Any]:
        error = {
            "code": exc.code,
            "message": exc.message,
            "http_status": exc.http_status,
            "retryable": exc.retryable,
            "request_id": exc.request_id,
        }
        return {"status": "error", "error": error}

    def _seconds_left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.time()

    async def _sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, min(seconds, self._seconds_left())))

    def _next_poll(self, pollers: int = 1) -> float:
        """The pause before the next poll: jittered (widely in webhook mode, to spread the safety net),
        then ending on the nearest point of the loop's poll grid (``pollers``: the triggers polling
        the same API from this loop, this one included)."""
        spread = 0.25 if self.webhook_route is not None else 0.1
        pause = self.poll_interval * random.uniform(1 - spread, 1 + spread)
        grid = poll_grid(self.poll_interval, pollers)
        if grid < MIN_POLL_GRID:
            return pause
        now = asyncio.get_running_loop().time()
        return max(0.0, round((now + pause) / grid) * grid - now)

    async def _wait(self) -> dict[str, Any]:
        if self.webhook_route is not None:  # webhook mode: the event may already be here
            from airflow_provider_modelroute.webhooks.mode import delivered_event

            try:
                delivered = await delivered_event(self.webhook_route, self.execution_id)
            except Exception as exc:  # the safety net still ends the wait
                self.log.warning("Could not read the recorded webhook event (%s); polling slowly", exc)
                delivered = None
            if delivered is not None:
                self.log.info(
                    "ModelRoute execution %s ended before the task deferred (webhook)", self.execution_id
                )
                return delivered
            await self._sleep(self._next_poll())
        failures = 0
        reported_unknown: set[str] = set()
        first_poll = time.monotonic()
        async with ModelRouteAsyncHook(self.modelroute_conn_id) as client:
            while self._seconds_left() > 0:
                try:
                    execution = await client.get_execution(self.execution_id)
                except ModelRouteError as exc:
                    if not getattr(exc, "retryable", False):
                        raise
                    failures += 1
                    if failures >= self.max_consecutive_failures:
                        raise
                    self.log.warning(
                        "Polling ModelRoute execution %s failed (%d of %d in a row): %s",
                        self.execution_id,
                        failures,
                        self.max_consecutive_failures,
                        exc,
                    )
                    await self._sleep(max(client.transport.retry.backoff(failures), self.poll_interval))
                    continue
                failures = 0
                status = str(execution.get("status"))
                if api.is_terminal(status):
                    self.log.info("ModelRoute execution %s is %s", self.execution_id, status)
                    metrics.poll_to_terminal(time.monotonic() - first_poll, status)
                    return {"status": "done", "execution": api.execution_summary(execution)}
                if not api.is_known_status(status) and status not in reported_unknown:
                    reported_unknown.add(status)
                    self.log.warning(
                        "ModelRoute execution %s has unknown status %r; waiting", self.execution_id, status
                    )
                await self._sleep(self._next_poll(client.sharing))
        return {"status": "timeout"}

    async def on_kill(self) -> None:
        """Cancel the execution when a user kills the deferred task (called by Airflow 3.3+)."""
        if not self.cancel_on_kill or await self._ended_by_webhook():
            return
        try:
            async with ModelRouteAsyncHook(self.modelroute_conn_id) as client:
                result = await asyncio.wait_for(client.cancel_execution(self.execution_id), CANCEL_TIMEOUT)
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

    async def _ended_by_webhook(self) -> bool:
        """True when a webhook delivered this execution's end (a resume by the receiver also cancels us)."""
        if self.webhook_route is None:
            return False
        from airflow_provider_modelroute.webhooks.mode import delivered_event

        try:
            return await delivered_event(self.webhook_route, self.execution_id) is not None
        except Exception:
            return False
        else:
            self.log.info("The task was killed; cancelled ModelRoute execution %s", self.execution_id)
