"""The Airflow plugin that mounts the webhook receiver in the api-server (entry point ``airflow.plugins``).

Every Airflow process loads plugins, so this module stays cheap: the receiver (FastAPI, the DB
models) is imported on its first request. Airflow 3.1+ mounts ``fastapi_apps``; older versions get
none, and webhook mode stays off there (polling only).
"""

from __future__ import annotations

from typing import Any

from airflow_provider_modelroute._compat import WEBHOOK_RECEIVER_SUPPORTED, airflow_plugin_base
from airflow_provider_modelroute.webhooks.routing import URL_PREFIX


class LazyReceiver:
    """An ASGI app that imports the receiver on its first request."""

    def __init__(self) -> None:
        self._app: Any = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if self._app is None:
            from airflow_provider_modelroute.webhooks.receiver import app

            self._app = app
        await self._app(scope, receive, send)


class ModelRouteWebhooksPlugin(airflow_plugin_base()):  # type: ignore[misc]
    """Serves ``POST /modelroute/webhooks/{conn_id}``: ModelRoute's deliveries resume deferred waits."""

    name = "modelroute_webhooks"
    fastapi_apps = (
        [{"app": LazyReceiver(), "url_prefix": URL_PREFIX, "name": "ModelRoute webhook receiver"}]
        if WEBHOOK_RECEIVER_SUPPORTED
        else []
    )
