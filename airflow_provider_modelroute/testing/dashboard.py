"""The local server's stand-in for the ModelRoute dashboard: ``GET /executions/{id}`` as a small page.

The connection that ``ModelRouteServer.airflow_connection()`` returns points its ``dashboard_url``
here, so the operator's "ModelRoute execution" extra link opens something offline too.
"""

from __future__ import annotations

import html
import json
from typing import Any

PATH_PREFIX = "/executions/"


def page(execution_id: str, execution: dict[str, Any] | None) -> tuple[int, bytes]:
    """The HTTP status and HTML of one execution's page (404 for an unknown id)."""
    title = html.escape(f"ModelRoute execution {execution_id}")
    if execution is None:
        body = f"<h1>{title}</h1><p>No such execution on this local server.</p>"
        return 404, _document(title, body)
    shown = {key: execution[key] for key in execution if key not in ("idempotency_key",)}
    body = (
        f"<h1>{title}</h1>"
        f'<p>Status: <strong id="status">{html.escape(str(execution.get("status")))}</strong></p>'
        f"<pre>{html.escape(json.dumps(shown, indent=2, default=str))}</pre>"
    )
    return 200, _document(title, body)


def _document(title: str, body: str) -> bytes:
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{title}</title></head>'
        f"<body>{body}<p><small>airflow-provider-modelroute local test server</small></p></body></html>"
    ).encode()
