"""The webhook endpoints API (``/v1/webhooks/endpoints``): a mixin of :class:`ModelRouteHook`.

An endpoint's ``secret`` (``whsec_...``) is shown once, in the answer to its creation: store it in
the connection's ``webhook_secret`` (``python -m airflow_provider_modelroute.webhooks setup`` does).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote

from airflow_provider_modelroute._compat import mask_secret
from airflow_provider_modelroute.exceptions import ModelRouteConfigError, ModelRouteError
from airflow_provider_modelroute.webhooks.mode import is_loopback_url

ENDPOINTS_PATH = "/webhooks/endpoints"
_ENDPOINT_ID_RE = re.compile(r"wh_[A-Za-z0-9_-]{1,128}")
_UPDATABLE = frozenset({"url", "description", "events", "headers", "is_active"})


def endpoint_path(endpoint_id: str, suffix: str = "") -> str:
    if not isinstance(endpoint_id, str) or not _ENDPOINT_ID_RE.fullmatch(endpoint_id):
        raise ModelRouteConfigError(f"endpoint_id must look like 'wh_...', got {endpoint_id!r}")
    return f"{ENDPOINTS_PATH}/{quote(endpoint_id)}{suffix}"


def _listed(document: Any) -> list[dict[str, Any]]:
    """The endpoints of a list answer: a bare list or one wrapped in an object (the docs show neither)."""
    if isinstance(document, list):
        return [item for item in document if isinstance(item, dict)]
    if isinstance(document, dict):
        for key in ("data", "endpoints", "items", "webhooks"):
            if isinstance(document.get(key), list):
                return _listed(document[key])
    raise ModelRouteError(f"Unexpected answer listing webhook endpoints: {str(document)[:200]}")


class WebhookEndpointsMixin:
    """Create, list, update, delete and test webhook endpoints (needs ``_request``, ``_exchange``)."""

    _request: Any
    _exchange: Any

    def create_webhook_endpoint(
        self,
        url: str,
        *,
        description: str | None = None,
        events: Sequence[str] = (),
        headers: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """Register ``url`` (https) for ``events`` (empty: all); the answer holds the one-time ``secret``."""
        if not isinstance(url, str) or not (url.startswith("https://") or is_loopback_url(url)):
            raise ModelRouteConfigError(f"A webhook endpoint url must be https://..., got {url!r}")
        body: dict[str, Any] = {"url": url, "events": list(events)}
        if description is not None:
            body["description"] = description
        if headers:
            body["headers"] = dict(headers)
        # The same key on every HTTP retry: a retried create must not register the receiver twice.
        key = {"Idempotency-Key": f"airflow-webhook-{uuid.uuid4()}"}
        endpoint: dict[str, Any] = self._exchange("POST", ENDPOINTS_PATH, json_body=body, headers=key)[0]
        if endpoint.get("secret"):
            mask_secret(str(endpoint["secret"]))
        return endpoint

    def list_webhook_endpoints(self) -> list[dict[str, Any]]:
        """Every endpoint, with ``is_active``, ``failure_count`` and ``last_success``."""
        return _listed(self._request("GET", ENDPOINTS_PATH))

    def update_webhook_endpoint(self, endpoint_id: str, **changes: Any) -> dict[str, Any]:
        """Change ``url``, ``description``, ``events``, ``headers`` or ``is_active`` (re-activate it)."""
        unknown = set(changes) - _UPDATABLE
        if unknown:
            raise ModelRouteConfigError(f"Cannot update {sorted(unknown)}; updatable: {sorted(_UPDATABLE)}")
        return dict(self._request("PATCH", endpoint_path(endpoint_id), json_body=changes))

    def delete_webhook_endpoint(self, endpoint_id: str) -> None:
        self._request("DELETE", endpoint_path(endpoint_id))

    def test_webhook_endpoint(self, endpoint_id: str) -> dict[str, Any]:
        """Ask ModelRoute to send the endpoint a test delivery; returns its answer."""
        return dict(self._request("POST", endpoint_path(endpoint_id, "/test"), json_body={}) or {})
