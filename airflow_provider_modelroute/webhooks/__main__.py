"""Register the ModelRoute webhook receiver for a connection (``setup``) and check it (``test``).

``setup`` writes the endpoint's one-time secret into a connection stored in the metadata DB; for one
from an environment variable or a secrets backend it prints the extras to add there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from typing import Any

from airflow_provider_modelroute.exceptions import ModelRouteConfigError, ModelRouteError
from airflow_provider_modelroute.webhooks import mode
from airflow_provider_modelroute.webhooks.receiver import SECRET_CACHE_SECONDS

PROG = "python -m airflow_provider_modelroute.webhooks"
#: What the receiver acts on; ``execution.started`` would only cost deliveries.
SETUP_EVENTS = ("execution.completed", "execution.failed", "execution.cancelled")


def _endpoints_at(hook: Any, url: str) -> list[dict[str, Any]]:
    return [e for e in hook.list_webhook_endpoints() if e.get("url") == url]


def setup(hook: Any, public_url: str, replace: bool, test: bool) -> None:
    """Register the receiver for the hook's connection; store its secret there or say where to add it."""
    from airflow.models.connection import Connection
    from airflow.utils.session import create_session
    from sqlalchemy import select

    conn_id = hook.modelroute_conn_id
    url = mode.receiver_url(public_url, conn_id)
    existing = _endpoints_at(hook, url)
    if existing and not replace:
        raise ModelRouteConfigError(
            f"{url} is already registered as {existing[0].get('id')}; its secret was shown only once. "
            "Pass --replace to delete it and register the receiver again (a new secret)."
        )
    for endpoint in existing:
        hook.delete_webhook_endpoint(str(endpoint["id"]))
        print(f"Deleted the previous endpoint {endpoint['id']}")
    created = hook.create_webhook_endpoint(
        url, description=f"Airflow receiver for connection {conn_id}", events=SETUP_EVENTS
    )
    print(f"Registered {url} as ModelRoute webhook endpoint {created.get('id')}")
    extras = {mode.SECRET_EXTRA: str(created["secret"]), mode.RECEIVER_URL_EXTRA: url}
    variable = f"AIRFLOW_CONN_{conn_id.upper()}"
    conn = None
    if variable not in os.environ:  # an environment variable shadows the metadata DB: no write there
        with create_session() as session:
            conn = session.scalar(select(Connection).filter_by(conn_id=conn_id))
            if conn is not None:
                conn.set_extra(json.dumps({**conn.extra_dejson, **extras}))
    if conn is not None:
        print(
            f"Stored webhook_secret and webhook_receiver_url in connection {conn_id!r}. Nothing to restart."
        )
        if test:
            check_receiver(hook)
        return
    print(
        f'Add these two extras to connection {conn_id!r} where it is defined ({variable}\'s JSON "extra" or '
        f"URI query, or your secrets backend). The secret is shown only this once:\n{json.dumps(extras)}\n"
        f"After changing {variable}, restart the api-server (its receiver answers 404 until then), the "
        f"triggerer and the workers. Then check the receiver: {PROG} --conn-id {conn_id} test"
    )


def check_receiver(hook: Any) -> bool:
    """Send the receiver a delivery signed with the connection's secret and explain its answer; then have
    ModelRoute send its own test delivery and report, by the endpoint's counters, how it went."""
    import requests

    conn_id = hook.modelroute_conn_id
    config = mode.WebhookConfig.from_extras(conn_id, hook.get_connection(conn_id).extra_dejson)
    if config is None:
        raise ModelRouteConfigError(f"Connection {conn_id!r} has no webhook_secret: run `{PROG} setup` first")
    url, stamp = config.receiver_url, str(int(time.time()))
    body = json.dumps({"id": f"evt_test_{uuid.uuid4().hex}", "type": "webhook.test", "data": {}}).encode()
    headers = {mode.SIGNATURE_HEADER: mode.sign(config.secret, stamp, body), mode.TIMESTAMP_HEADER: stamp}
    headers["Content-Type"] = "application/json"
    try:
        answer = requests.post(url, data=body, headers=headers, timeout=30)
        outcome = str(answer.json().get("outcome", "")) if answer.content.startswith(b"{") else ""
    except requests.RequestException as exc:
        print(f"Could not reach the receiver at {url} ({type(exc).__name__}): check the URL.")
        return False
    code = answer.status_code
    if answer.ok:
        advice = f"it verified a delivery signed with connection {conn_id!r}'s webhook_secret."
    elif code == 401 or (code == 404 and outcome):
        advice = (
            f"the api-server {'holds another' if code == 401 else 'does not see a'} webhook_secret in "
            f"connection {conn_id!r} (it reads it again after {SECRET_CACHE_SECONDS:.0f} s): give every "
            "Airflow process the same extras; after changing an environment variable, restart the api-server."
        )
    elif code == 404:
        advice = "not as the receiver: check the URL and that the api-server has the provider (Airflow 3.1+)."
    else:
        advice = "see the api-server's log."
    print(f"The receiver at {url} answered {code}{f' ({outcome})' if outcome else ''}: {advice}")
    [before] = _endpoints_at(hook, url)[:1] or [{}]
    if not answer.ok or not before:
        return False
    hook.test_webhook_endpoint(str(before["id"]))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        [now] = _endpoints_at(hook, url)[:1] or [{}]
        if now.get("last_success") not in (None, "", before.get("last_success")):
            print(f"ModelRoute's test delivery to {before['id']} got a 2xx from the receiver.")
            return True
        if (now.get("failure_count") or 0) > (before.get("failure_count") or 0):
            break
        time.sleep(1.0)
    print(
        f"ModelRoute's test delivery to {before['id']} did not get a 2xx: check that ModelRoute can reach "
        f"{url} (DNS, TLS, firewalls). Deferred waits still end by polling meanwhile."
    )
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__)
    parser.add_argument("--conn-id", default="modelroute_default", help="the ModelRoute connection")
    commands = parser.add_subparsers(dest="command", required=True)
    setup_command = commands.add_parser("setup", help="register the receiver and store its secret")
    setup_command.add_argument("--public-url", required=True, help="where ModelRoute reaches the api-server")
    setup_command.add_argument("--replace", action="store_true", help="re-register it (a new secret)")
    setup_command.add_argument("--no-test", action="store_true", help="skip the test deliveries")
    commands.add_parser("test", help="send the receiver test deliveries and report its answers")
    args = parser.parse_args(argv)
    from airflow_provider_modelroute.hooks.modelroute import ModelRouteHook
    from airflow_provider_modelroute.version_compat import AirflowNotFoundException

    # Read connections from the metadata DB too, as Airflow's own `airflow connections` commands do.
    context = os.environ.get("_AIRFLOW_PROCESS_CONTEXT")
    os.environ["_AIRFLOW_PROCESS_CONTEXT"] = "server"
    try:
        hook = ModelRouteHook(args.conn_id)
        if args.command == "test":
            return 0 if check_receiver(hook) else 1
        setup(hook, args.public_url, args.replace, test=not args.no_test)
        return 0
    except (ModelRouteError, AirflowNotFoundException) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        os.environ.pop("_AIRFLOW_PROCESS_CONTEXT")
        if context is not None:
            os.environ["_AIRFLOW_PROCESS_CONTEXT"] = context


if __name__ == "__main__":
    sys.exit(main())
