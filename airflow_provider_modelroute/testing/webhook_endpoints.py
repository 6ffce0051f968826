"""The local server's webhook endpoints API: register, list, change and delete delivery targets."""

from __future__ import annotations

import secrets
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from airflow_provider_modelroute.testing.spec import is_https_or_loopback
from airflow_provider_modelroute.testing.wire import ApiFailure, Reply, invalid_field, json_reply

EVENT_TYPES = ("execution.started", "execution.completed", "execution.failed", "execution.cancelled")


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


class EndpointsMixin:
    """``/v1/webhooks/endpoints``: the endpoints that :class:`WebhookSender` delivers to."""

    _lock: threading.RLock
    endpoints: dict[str, Endpoint]
    test_endpoint: Callable[[str], dict[str, Any]]  # sends, so it lives with the sending

    def api_reply(self, route: str, params: dict[str, str], body: Any) -> Reply:
        """The answer to one endpoints-API request (``route``: a route key), errors in the documented body."""
        body = body if isinstance(body, dict) else {}
        try:
            if route == "POST /v1/webhooks/endpoints":
                return json_reply(201, self.create_endpoint(body))
            if route == "GET /v1/webhooks/endpoints":
                return json_reply(200, self.list_endpoints())
            if route == "PATCH /v1/webhooks/endpoints/{id}":
                return json_reply(200, self.update_endpoint(params["id"], body))
            if route == "DELETE /v1/webhooks/endpoints/{id}":
                return json_reply(200, self.delete_endpoint(params["id"]))
            return json_reply(202, self.test_endpoint(params["id"]))
        except EndpointError as exc:
            if exc.status == 404:
                raise ApiFailure("NOT_FOUND", str(exc), status=404) from None
            raise invalid_field(exc.field, str(exc)) from None

    def create_endpoint(self, body: dict[str, Any]) -> dict[str, Any]:
        url = body.get("url")
        if not is_https_or_loopback(url):
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
            if not is_https_or_loopback(url):
                raise EndpointError("url", "must be an https:// URL")
            endpoint.url = url
        endpoint.events, endpoint.headers = list(events), {str(k): str(v) for k, v in headers.items()}
        endpoint.description = body.get("description", endpoint.description)
        if "is_active" in body:
            endpoint.is_active = bool(body["is_active"])
