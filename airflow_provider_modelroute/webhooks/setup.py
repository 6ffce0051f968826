"""One-time setup: register the Airflow receiver with ModelRoute and store its secret in the connection.

The endpoint's secret is shown once, in the answer to its creation, so setup writes it straight into
the connection's ``webhook_secret`` (with ``webhook_receiver_url``) when the connection lives in the
metadata DB. A connection from an environment variable or a secrets backend cannot be written: then
the two extras are printed for you to add, and that is the only place the secret appears.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from airflow_provider_modelroute._compat import update_connection_extras
from airflow_provider_modelroute.exceptions import ModelRouteConfigError
from airflow_provider_modelroute.webhooks.config import RECEIVER_URL_EXTRA, SECRET_EXTRA
from airflow_provider_modelroute.webhooks.routing import receiver_url

#: What the receiver acts on; ``execution.started`` would only cost deliveries.
SETUP_EVENTS = ("execution.completed", "execution.failed", "execution.cancelled")


def modelroute_hook(conn_id: str) -> Any:
    from airflow_provider_modelroute.hooks.modelroute import ModelRouteHook

    return ModelRouteHook(conn_id)


def setup_webhooks(
    conn_id: str,
    public_url: str,
    *,
    replace: bool = False,
    wait_for_test: float = 30.0,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Register ``public_url``'s receiver for ``conn_id``; store (or print) the secret; send a test delivery.

    Returns the endpoint (without its secret). ``replace`` deletes an endpoint already registered
    for the same receiver URL (its secret cannot be shown again) and registers a new one.
    """
    try:
        url = receiver_url(public_url, conn_id)
    except ValueError as exc:
        raise ModelRouteConfigError(f"--public-url: {exc}") from None
    hook = modelroute_hook(conn_id)
    existing = [e for e in hook.list_webhook_endpoints() if e.get("url") == url]
    if existing and not replace:
        raise ModelRouteConfigError(
            f"{url} is already registered as {existing[0].get('id')}; its secret was shown only once. "
            "Pass --replace to delete it and register the receiver again (a new secret)."
        )
    for endpoint in existing:
        hook.delete_webhook_endpoint(str(endpoint["id"]))
        say(f"Deleted the previous endpoint {endpoint['id']}")
    created = hook.create_webhook_endpoint(
        url, description=f"Airflow receiver for connection {conn_id}", events=SETUP_EVENTS
    )
    secret = str(created.pop("secret", "") or "")
    if not secret:
        raise ModelRouteConfigError(f"ModelRoute registered {created.get('id')} but returned no secret")
    extras = {SECRET_EXTRA: secret, RECEIVER_URL_EXTRA: url}
    say(f"Registered {url} as ModelRoute webhook endpoint {created.get('id')}")
    if update_connection_extras(conn_id, extras):
        say(f"Stored {SECRET_EXTRA} and {RECEIVER_URL_EXTRA} in connection {conn_id!r}: webhook mode is on")
    else:
        say(
            f"Connection {conn_id!r} is not in Airflow's metadata DB (an environment variable or a secrets "
            "backend?), so add these extras to it yourself. The secret is shown only this once:\n"
            + json.dumps(extras)
        )
    if wait_for_test > 0:
        say(_test_delivery(hook, str(created["id"]), wait_for_test))
    return created


def _test_delivery(hook: Any, endpoint_id: str, wait: float) -> str:
    """Send a test delivery and report whether the receiver took it (by the endpoint's counters)."""
    hook.test_webhook_endpoint(endpoint_id)
    deadline = time.monotonic() + wait
    while True:
        endpoint: dict[str, Any] = next(
            (e for e in hook.list_webhook_endpoints() if e.get("id") == endpoint_id), {}
        )
        if endpoint.get("last_success"):
            return "The receiver answered ModelRoute's test delivery"
        if endpoint.get("failure_count") or time.monotonic() > deadline:
            return (
                "ModelRoute's test delivery did not get a 2xx yet: check that the api-server is reachable at "
                "the public URL and runs Airflow 3.1+ with this provider installed. Deferred waits still end "
                "by polling meanwhile."
            )
        time.sleep(1.0)
