"""The local server's webhooks: the endpoints API and real, signed deliveries, with faults.

Deliveries go to every active registered endpoint (filtered by its ``events``) and to the
execution's own ``webhook_url``, signed as the docs say (hex HMAC-SHA256 over
``"{timestamp}.{raw body}"``). ASSUMPTION (the docs are silent): a per-execution ``webhook_url`` is
signed with the secret of the oldest active endpoint, else with the organisation secret
``org_secret``. A failed delivery (no 2xx within ``timeout``) is retried after 2, 4, 8, 16 and 30
minutes times ``retry_scale``; an endpoint is deactivated after 10 failures in a row. ``shape``
picks the body: ``overview`` or ``executions-page`` (the docs' two readings). Faults, each for the
next ``count`` deliveries (optionally of one ``event_type``): ``delay`` (``seconds``),
``duplicate`` (``copies``), ``drop``, ``reorder`` (held until the next delivery has gone) and
``wrong_secret``. Everything runs on the server's event loop.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from airflow_provider_modelroute.webhooks.mode import is_loopback_url, sign

SHAPES = ("overview", "executions-page")
EVENT_TYPES = ("execution.started", "execution.completed", "execution.failed", "execution.cancelled")
FAULT_KINDS = frozenset({"delay", "duplicate", "drop", "reorder", "wrong_secret"})
#: The documented retry schedule (seconds), before ``retry_scale``.
RETRY_SCHEDULE = (120.0, 240.0, 480.0, 960.0, 1800.0)
DEACTIVATE_AFTER = 10
_TERMINAL_EVENTS = {"COMPLETED": "execution.completed", "FAILED": "execution.failed"}


def event_type_for(status: str) -> str | None:
    """The documented event a terminal status sends (EXPIRED sends none: the docs list no event for it)."""
    return _TERMINAL_EVENTS.get(status) or ("execution.cancelled" if status == "CANCELLED" else None)


class EndpointError(ValueError):
    """A bad endpoints-API request: ``field`` names what to fix (the server answers 400 or 404)."""

    def __init__(self, field_name: str, message: str, status: int = 400) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field, self.status = field_name, status


@dataclass
class Endpoint:
    id: str
    url: str
    secret: str
    description: str | None = None
    events: list[str] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)
    is_active: bool = True
    failure_count: int = 0
    last_success: str | None = None
    created: float = field(default_factory=time.time)

    def document(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "url": self.url,
            "description": self.description,
            "events": list(self.events),
            "headers": dict(self.headers),
            "is_active": self.is_active,
            "failure_count": self.failure_count,
            "last_success": self.last_success,
        }


@dataclass
class WebhookFault:
    kind: str
    remaining: int | None
    event_type: str | None
    params: dict[str, Any]


@dataclass
class Delivery:
    """One event to one target; ``attempt`` counts from 1."""

    event_id: str
    event_type: str
    execution_id: str | None
    url: str
    body: bytes
    secret: str
    headers: dict[str, str]
    endpoint: Endpoint | None = None
    attempt: int = 1
    first_sent: float = field(default_factory=time.time)
    generation: int = 0


class WebhookSender:
    """Endpoints API and deliveries for :class:`~airflow_provider_modelroute.testing.ModelRouteServer`."""

    def __init__(
        self,
        *,
        shape: str = "overview",
        retry_scale: float = 1.0,
        timeout: float = 30.0,
        organization_id: str = "org_local",
    ) -> None:
        self.shape = shape
        self.retry_scale = retry_scale
        self.timeout = timeout
        self.organization_id = organization_id
        self.org_secret = f"whsec_{secrets.token_hex(24)}"
        self.loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.RLock()
        self._client: Any = None
        self._tasks: set[asyncio.Future[Any]] = set()
        self._generation = 0
        self.endpoints: dict[str, Endpoint] = {}
        self.reset()

    def reset(self) -> None:
        """Forget faults, the delivery log and what was sent (endpoints, shape and scale stay, as keys do)."""
        with self._lock:
            self._generation += 1  # what is still scheduled from before is dropped
            for endpoint in self.endpoints.values():
                endpoint.failure_count, endpoint.is_active = 0, True
            self.faults: list[WebhookFault] = []
            self.log: list[dict[str, Any]] = []
            self.counters: Counter[str] = Counter()
            self._sent: set[tuple[str, str]] = set()
            self._held: list[Delivery] = []

    # -- configuration and inspection -------------------------------------------------------------

    def configure(self, *, shape: str | None = None, retry_scale: float | None = None) -> None:
        if shape is not None:
            if shape not in SHAPES:
                raise ValueError(f"shape must be one of {SHAPES}")
            self.shape = shape
        if retry_scale is not None:
            self.retry_scale = float(retry_scale)

    def add_fault(
        self, kind: str, count: int | None = 1, event_type: str | None = None, **params: Any
    ) -> None:
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown webhook fault {kind!r}; use one of {sorted(FAULT_KINDS)}")
        with self._lock:
            self.faults.append(WebhookFault(kind, count, event_type, params))

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {**self.counters, "endpoints": len(self.endpoints)}

    def deliveries(self) -> list[dict[str, Any]]:
        """Every attempt so far: event id and type, execution, target URL, attempt, answer (``status``,
        None when dropped or unanswered; ``answer``, the start of its body), fault, and when it was sent
        and answered (``sent_at``, ``at``)."""
        with self._lock:
            return [dict(entry) for entry in self.log]

    def admin(self, method: str, action: str, body: dict[str, Any]) -> Any:
        """The ``/_admin/webhooks/...`` routes: ``deliveries``, ``faults`` (POST/DELETE), ``config``."""
        if action == "deliveries":
            return self.deliveries()
        if action == "faults" and method == "POST":
            self.add_fault(
                body["kind"], body.get("count", 1), body.get("event_type"), **body.get("params", {})
            )
            return {}
        if action == "faults" and method == "DELETE":
            with self._lock:
                self.faults = []
            return {}
        if action == "config" and method == "POST":
            self.configure(shape=body.get("shape"), retry_scale=body.get("retry_scale"))
            return {"shape": self.shape, "retry_scale": self.retry_scale}
        raise KeyError(f"webhooks/{action}")

    # -- the endpoints API ------------------------------------------------------------------------

    def create_endpoint(self, body: dict[str, Any]) -> dict[str, Any]:
        url = body.get("url")
        if not isinstance(url, str) or not (url.startswith("https://") or is_loopback_url(url)):
            raise EndpointError("url", "must be an https:// URL")
        endpoint = Endpoint(
            id=f"wh_{uuid.uuid4().hex[:24]}", url=url, secret=f"whsec_{secrets.token_hex(24)}"
        )
        self._apply_changes(endpoint, body)
        with self._lock:
            self.endpoints[endpoint.id] = endpoint
        return {**endpoint.document(), "secret": endpoint.secret}

    def list_endpoints(self) -> dict[str, Any]:
        with self._lock:
            return {"data": [e.document() for e in self.endpoints.values()]}

    def update_endpoint(self, endpoint_id: str, body: dict[str, Any]) -> dict[str, Any]:
        endpoint = self._endpoint(endpoint_id)
        self._apply_changes(endpoint, body)
        if body.get("is_active"):
            endpoint.failure_count = 0
        return endpoint.document()

    def delete_endpoint(self, endpoint_id: str) -> dict[str, Any]:
        with self._lock:
            self._endpoint(endpoint_id)
            del self.endpoints[endpoint_id]
        return {"id": endpoint_id, "deleted": True}

    def test_endpoint(self, endpoint_id: str) -> dict[str, Any]:
        endpoint = self._endpoint(endpoint_id)
        event_id = f"evt_{uuid.uuid4().hex}"
        body = self._body(event_id, "webhook.test", {"message": "This is a test delivery"}, None)
        self._send_soon(
            Delivery(
                event_id,
                "webhook.test",
                None,
                endpoint.url,
                body,
                endpoint.secret,
                dict(endpoint.headers),
                endpoint,
            )
        )
        return {"id": event_id, "status": "queued"}

    def _endpoint(self, endpoint_id: str) -> Endpoint:
        with self._lock:
            endpoint = self.endpoints.get(endpoint_id)
        if endpoint is None:
            raise EndpointError("id", f"no webhook endpoint {endpoint_id}", status=404)
        return endpoint

    @staticmethod
    def _apply_changes(endpoint: Endpoint, body: dict[str, Any]) -> None:
        events = body.get("events", endpoint.events)
        if not isinstance(events, list) or any(e not in EVENT_TYPES for e in events):
            raise EndpointError("events", f"must be a list of {list(EVENT_TYPES)} (empty: all)")
        headers = body.get("headers", endpoint.headers) or {}
        if not isinstance(headers, dict):
            raise EndpointError("headers", "must be an object of header names and values")
        if "url" in body and endpoint.url != body["url"]:
            url = body["url"]
            if not isinstance(url, str) or not (url.startswith("https://") or is_loopback_url(url)):
                raise EndpointError("url", "must be an https:// URL")
            endpoint.url = url
        endpoint.events, endpoint.headers = list(events), {str(k): str(v) for k, v in headers.items()}
        endpoint.description = body.get("description", endpoint.description)
        if "is_active" in body:
            endpoint.is_active = bool(body["is_active"])

    # -- events -------------------------------------------------------------------------------------

    def watch(self, server: Any, execution: Any) -> None:
        """Look at a new execution when it starts and when it is due to end (statuses change lazily)."""
        generation = self._generation
        self.call_soon(lambda: self._look(server, execution, generation, True), server.pending_seconds)
        end = server.pending_seconds + execution.run_seconds + server.awaiting_webhook_seconds
        self.call_soon(lambda: self._look(server, execution, generation), min(end, server.execution_ttl))

    def _look(self, server: Any, execution: Any, generation: int, started: bool = False) -> None:
        if generation != self._generation:  # the server was reset since: the execution is gone
            return
        with server._lock:
            status = server._status(execution)  # an execution that ends here sends its event (finished)
            document = server._execution_document(execution)
        if started and status not in ("PENDING", "COMPLETED", "FAILED", "CANCELLED", "EXPIRED"):
            self.execution_event(document, "execution.started", execution.webhook_url)

    def finished(self, server: Any, execution: Any, status: str) -> None:
        """An execution reached ``status``: send its terminal event (called under the server's lock)."""
        event_type = event_type_for(status)
        if event_type is not None:
            self.execution_event(server._execution_document(execution), event_type, execution.webhook_url)

    def execution_event(self, document: dict[str, Any], event_type: str, webhook_url: str | None) -> None:
        """Send ``event_type`` for an execution (its document as the API shows it), once per type."""
        execution_id = str(document["id"])
        with self._lock:
            if (execution_id, event_type) in self._sent:
                return
            self._sent.add((execution_id, event_type))
            targets = [
                e for e in self.endpoints.values() if e.is_active and (not e.events or event_type in e.events)
            ]
            signing = min(
                (e for e in self.endpoints.values() if e.is_active), key=lambda e: e.created, default=None
            )
        event_id = f"evt_{uuid.uuid4().hex}"
        body = self._body(event_id, event_type, document, execution_id)
        for endpoint in targets:
            self._send_soon(
                Delivery(
                    event_id,
                    event_type,
                    execution_id,
                    endpoint.url,
                    body,
                    endpoint.secret,
                    dict(endpoint.headers),
                    endpoint,
                )
            )
        if webhook_url:
            secret = signing.secret if signing is not None else self.org_secret
            self._send_soon(Delivery(event_id, event_type, execution_id, webhook_url, body, secret, {}))

    def _body(self, event_id: str, event_type: str, data: dict[str, Any], execution_id: str | None) -> bytes:
        now = time.time()
        if self.shape == "overview":
            document: dict[str, Any] = {
                "id": event_id,
                "event_type": event_type,
                "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
                "version": "1.0",
                "organization_id": self.organization_id,
                "execution_id": execution_id,
                "data": data,
            }
        else:
            document = {"id": event_id, "type": event_type, "timestamp": int(now), "data": data}
        return json.dumps(document).encode()

    # -- sending ------------------------------------------------------------------------------------

    def call_soon(self, callback: Callable[[], Any], delay: float = 0.0) -> None:
        """Run ``callback`` on the server's loop after ``delay`` seconds (from any thread)."""
        loop = self.loop
        if loop is None or loop.is_closed():
            return
        loop.call_soon_threadsafe(lambda: loop.call_later(max(0.0, delay), callback))

    def _spawn(self, coroutine: Any) -> None:
        """Run a coroutine on the loop, keeping a reference until it is done."""
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _send_soon(self, delivery: Delivery, delay: float = 0.0) -> None:
        if delivery.attempt == 1:
            delivery.generation = self._generation

        def send() -> None:
            if delivery.generation == self._generation:
                self._spawn(self._dispatch(delivery))

        self.call_soon(send, delay)

    def _take_fault(self, delivery: Delivery) -> WebhookFault | None:
        if delivery.attempt > 1:  # faults shape first attempts; retries follow the schedule
            return None
        with self._lock:
            for fault in self.faults:
                if fault.event_type in (None, delivery.event_type):
                    if fault.remaining is not None:
                        fault.remaining -= 1
                        if fault.remaining <= 0:
                            self.faults.remove(fault)
                    self.counters[f"fault_{fault.kind}"] += 1
                    return fault
        return None

    async def _dispatch(self, delivery: Delivery) -> None:
        fault = self._take_fault(delivery)
        if fault is not None and fault.kind == "reorder":  # parked until the next delivery has gone
            with self._lock:
                self._held.append(delivery)
            self.call_soon(lambda: self._release(delivery), float(fault.params.get("seconds", 5.0)))
            return
        if fault is not None and fault.kind == "drop":
            self._record(delivery, None, "drop")
        elif fault is not None and fault.kind == "delay":
            seconds = float(fault.params.get("seconds", 1.0))
            self.call_soon(lambda: self._spawn(self._post(delivery, fault)), seconds)
        else:
            copies = (
                int(fault.params.get("copies", 2)) if fault is not None and fault.kind == "duplicate" else 1
            )
            for _ in range(copies):
                await self._post(delivery, fault)
        with self._lock:
            held, self._held = self._held, []
        for waiting in held:
            await self._post(waiting, None)

    def _release(self, delivery: Delivery) -> None:
        """Send a parked delivery that no later delivery overtook in time."""
        with self._lock:
            if delivery not in self._held:
                return
            self._held.remove(delivery)
        self._spawn(self._post(delivery, None))

    async def _post(self, delivery: Delivery, fault: WebhookFault | None) -> None:
        import httpx

        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.timeout)
        stamp = str(int(time.time()))
        secret = (
            f"whsec_{secrets.token_hex(24)}"
            if fault is not None and fault.kind == "wrong_secret"
            else delivery.secret
        )
        headers = {
            **delivery.headers,
            "Content-Type": "application/json",
            "User-Agent": "ModelRoute-Webhooks/1.0",
            "X-Signature": sign(secret, stamp, delivery.body),
            "X-Signature-Timestamp": stamp,
        }
        status: int | None
        sent_at, answer = time.time(), ""
        try:
            response = await self._client.post(delivery.url, content=delivery.body, headers=headers)
            status, answer = response.status_code, response.text[:200]
        except httpx.HTTPError as exc:
            status, answer = None, type(exc).__name__
        self._record(delivery, status, fault.kind if fault is not None else None, sent_at, answer)
        ok = status is not None and 200 <= status < 300
        self._after_attempt(delivery, ok)

    def _after_attempt(self, delivery: Delivery, ok: bool) -> None:
        endpoint = delivery.endpoint
        with self._lock:
            self.counters["delivered" if ok else "failed_attempts"] += 1
            if endpoint is not None and ok:
                endpoint.failure_count = 0
                endpoint.last_success = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            elif endpoint is not None:
                endpoint.failure_count += 1
                if endpoint.failure_count >= DEACTIVATE_AFTER:
                    endpoint.is_active = False
        expired = time.time() - delivery.first_sent > 24 * 3600 * self.retry_scale
        if ok or delivery.attempt > len(RETRY_SCHEDULE) or expired:
            return
        wait = RETRY_SCHEDULE[delivery.attempt - 1] * self.retry_scale
        delivery.attempt += 1
        self._send_soon(delivery, wait)

    def _record(
        self,
        delivery: Delivery,
        status: int | None,
        fault: str | None,
        sent_at: float | None = None,
        answer: str = "",
    ) -> None:
        with self._lock:
            self.log.append(
                {
                    "event_id": delivery.event_id,
                    "event_type": delivery.event_type,
                    "execution_id": delivery.execution_id,
                    "url": delivery.url,
                    "endpoint_id": delivery.endpoint.id if delivery.endpoint else None,
                    "attempt": delivery.attempt,
                    "status": status,
                    "fault": fault,
                    "sent_at": sent_at,
                    "answer": answer,
                    "at": time.time(),
                }
            )

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
