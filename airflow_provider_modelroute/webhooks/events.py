"""Webhook deliveries parsed into one record, whichever documented body shape they use.

READINGS of the body (both must work): the webhooks overview's
``{"id", "event_type", "timestamp", "version", "organization_id", "execution_id", "data": {execution}}``
and the executions page's ``{"id", "type", "timestamp", "data": {execution}}``. Pure Python.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from airflow_provider_modelroute import api

#: Deliveries larger than this are refused before parsing (an execution document is a few KiB).
MAX_BODY_BYTES = 256 * 1024

EVENT_TYPES = ("execution.started", "execution.completed", "execution.failed", "execution.cancelled")
#: The status a terminal event implies when its execution document leaves ``status`` out.
_TERMINAL_EVENT_STATUS = {
    "execution.completed": "COMPLETED",
    "execution.failed": "FAILED",
    "execution.cancelled": "CANCELLED",
}


class MalformedEvent(ValueError):
    """The body is not a webhook event in either documented shape."""


@dataclass(frozen=True)
class WebhookEvent:
    """One delivery: its event id (the deduplication key), type, execution id and execution document."""

    event_id: str
    event_type: str
    execution_id: str
    execution: dict[str, Any]

    @property
    def is_terminal(self) -> bool:
        """A final state: the wait this execution belongs to can end with this document."""
        return api.is_terminal(str(self.execution.get("status")))

    def done_event(self) -> dict[str, Any]:
        """The trigger's "done" event for this execution, so ``execute_complete`` needs no API call."""
        return {
            "status": "done",
            "execution_id": self.execution_id,
            "execution": api.execution_summary(self.execution),
            "webhook_event_id": self.event_id,
        }


def parse_event(body: bytes) -> WebhookEvent:
    """Parse a delivery body (either shape) into a :class:`WebhookEvent`."""
    if len(body) > MAX_BODY_BYTES:
        raise MalformedEvent(f"the body is larger than {MAX_BODY_BYTES} bytes")
    try:
        document = json.loads(body)
    except ValueError:
        raise MalformedEvent("the body is not JSON") from None
    if not isinstance(document, dict):
        raise MalformedEvent("the body is not a JSON object")
    event_id = document.get("id")
    event_type = document.get("event_type", document.get("type"))
    if not isinstance(event_id, str) or not event_id:
        raise MalformedEvent("the event has no 'id'")
    if not isinstance(event_type, str) or not event_type:
        raise MalformedEvent("the event has no 'event_type' (or 'type')")
    data = document.get("data")
    execution = data.get("execution", data) if isinstance(data, dict) else None
    if not isinstance(execution, dict):
        raise MalformedEvent("the event's 'data' is not an execution object")
    execution_id = document.get("execution_id") or execution.get("id") or execution.get("execution_id")
    if not isinstance(execution_id, str) or not execution_id.startswith("exec_"):
        raise MalformedEvent("the event names no execution ('execution_id' or 'data.id')")
    if execution.get("id") not in (None, execution_id):
        raise MalformedEvent("the event's 'execution_id' and 'data.id' disagree")
    execution = {**execution, "id": execution_id}
    if "status" not in execution and event_type in _TERMINAL_EVENT_STATUS:
        execution["status"] = _TERMINAL_EVENT_STATUS[event_type]
    return WebhookEvent(event_id, event_type, execution_id, execution)


class SeenEvents:
    """Event ids seen lately (bounded, expiring): the cheap first line of deduplication.

    The database is the real one (a second delivery finds the task no longer deferred); this only
    spares it repeats that reach the same process. Deliveries expire after 24 h, and so do entries.
    """

    def __init__(self, max_entries: int = 100_000, ttl: float = 24 * 3600.0) -> None:
        self.max_entries = max_entries
        self.ttl = ttl
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def __contains__(self, event_id: object) -> bool:
        with self._lock:
            seen = self._seen.get(str(event_id))
            return seen is not None and time.monotonic() - seen < self.ttl

    def add(self, event_id: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._seen[event_id] = now
            self._seen.move_to_end(event_id)
            while self._seen and (
                len(self._seen) > self.max_entries or now - next(iter(self._seen.values())) >= self.ttl
            ):
                self._seen.popitem(last=False)
