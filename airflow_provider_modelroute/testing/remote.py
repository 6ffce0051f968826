"""Control a local ModelRoute server running in another process, through its ``/_admin`` routes."""

from __future__ import annotations

import json
import urllib.request
from typing import Any


class RemoteModelRouteServer:
    """The control surface of :class:`ModelRouteServer` for a server started with ``python -m``.

    :param admin_url: the ``admin_url`` the server printed on start.
    """

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url.rstrip("/")

    def _call(self, method: str, action: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            f"{self.admin_url}/{action}",
            data=data,
            method=method,
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read() or b"null")

    def add_fault(self, endpoint: str, kind: str, count: int | None = 1, **params: Any) -> None:
        self._call("POST", "faults", {"endpoint": endpoint, "kind": kind, "count": count, "params": params})

    def clear_faults(self) -> None:
        self._call("DELETE", "faults")

    def reset(self) -> None:
        self._call("POST", "reset", {})

    def set_dialect(self, dialect: str) -> dict[str, Any]:
        """Play another dialect (a preset name with optional overrides, see ``testing.dialects``)."""
        return dict(self._call("POST", "dialect", {"dialect": dialect}))

    def stats(self) -> dict[str, Any]:
        return dict(self._call("GET", "stats"))

    def execution_ids(self) -> list[str]:
        return list(self._call("GET", "executions"))

    def execution(self, execution_id: str) -> dict[str, Any]:
        return dict(self._call("GET", f"executions/{execution_id}"))

    def file_info(self, file_id: str) -> dict[str, Any]:
        return dict(self._call("GET", f"files/{file_id}"))

    def set_execution_status(
        self, execution_id: str, status: str, error_code: str | None = None
    ) -> dict[str, Any]:
        return dict(
            self._call("POST", f"executions/{execution_id}", {"status": status, "error_code": error_code})
        )

    # -- webhooks (testing/webhooks.py) --

    def webhook_deliveries(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "webhooks/deliveries"))

    def add_webhook_fault(
        self, kind: str, count: int | None = 1, event_type: str | None = None, **params: Any
    ) -> None:
        self._call(
            "POST",
            "webhooks/faults",
            {"kind": kind, "count": count, "event_type": event_type, "params": params},
        )

    def clear_webhook_faults(self) -> None:
        self._call("DELETE", "webhooks/faults")

    def configure_webhooks(self, *, shape: str | None = None, retry_scale: float | None = None) -> None:
        self._call("POST", "webhooks/config", {"shape": shape, "retry_scale": retry_scale})
