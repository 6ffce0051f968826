"""``python -m airflow_provider_modelroute.webhooks``: register the webhook receiver and check it.

    python -m airflow_provider_modelroute.webhooks --conn-id modelroute_default setup \\
        --public-url https://airflow.example.com
    python -m airflow_provider_modelroute.webhooks --conn-id modelroute_default test

``setup`` registers the receiver with ModelRoute. The endpoint's secret is shown once, so setup
writes it into the connection (``webhook_secret``, with ``webhook_receiver_url``) when the connection
lives in the metadata DB: the receiver reads it on the next delivery, nothing to restart. A
connection from an environment variable or a secrets backend cannot be written: setup prints the two
extras, where to add them and what to restart. ``test`` sends the receiver a delivery signed with the
connection's secret and reports its answer, then has ModelRoute send its own test delivery.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from airflow_provider_modelroute.exceptions import ModelRouteConfigError, ModelRouteError
from airflow_provider_modelroute.webhooks.mode import (
    RECEIVER_URL_EXTRA,
    SECRET_EXTRA,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    WebhookConfig,
    receiver_url,
    sign,
)

#: What the receiver acts on; ``execution.started`` would only cost deliveries.
SETUP_EVENTS = ("execution.completed", "execution.failed", "execution.cancelled")
PROG = "python -m airflow_provider_modelroute.webhooks"
Say = Callable[[str], None]


def modelroute_hook(conn_id: str) -> Any:
    from airflow_provider_modelroute.hooks.modelroute import ModelRouteHook

    return ModelRouteHook(conn_id)


def setup_webhooks(
    conn_id: str, public_url: str, *, replace: bool = False, test: bool = True, say: Say = print
) -> dict[str, Any]:
    """Register ``public_url``'s receiver for ``conn_id``; store (or print) the secret; test the receiver.

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
    say(f"Registered {url} as ModelRoute webhook endpoint {created.get('id')}")
    extras = {SECRET_EXTRA: secret, RECEIVER_URL_EXTRA: url}
    # An environment variable shadows the metadata DB: writing there would change nothing.
    if f"AIRFLOW_CONN_{conn_id.upper()}" not in os.environ and _store_extras(conn_id, extras):
        say(
            f"Stored {SECRET_EXTRA} and {RECEIVER_URL_EXTRA} in connection {conn_id!r}: webhook mode is on. "
            "Nothing to restart: the receiver and the tasks read the connection when they use it."
        )
        if test:
            check_receiver(hook, conn_id, say)
    else:
        _say_where_to_add(conn_id, extras, say)
    return created


def _say_where_to_add(conn_id: str, extras: dict[str, str], say: Say) -> None:
    """Setup cannot write this connection: say which extras to add, where, and what to restart."""
    variable = f"AIRFLOW_CONN_{conn_id.upper()}"
    if variable in os.environ:
        where = (
            f'the environment variable {variable} (its JSON form\'s "extra", or URL-encoded query '
            "parameters of its URI form) wherever Airflow's processes get it: the api-server (the "
            "receiver), the scheduler or workers, and the triggerer"
        )
        then = (
            "restart those processes: a running process keeps the environment it started with (until the "
            "api-server restarts, the receiver answers 404)"
        )
    else:  # neither the environment nor the metadata DB: a secrets backend
        where = f"connection {conn_id!r} in your secrets backend"
        then = "nothing to restart, unless your secrets backend caches connections"
    say(f"Add these two extras to {where}. The secret is shown only this once:")
    say(json.dumps(extras))
    say(f"Then {then}. Check the receiver with:\n    {PROG} --conn-id {conn_id} test")


def check_receiver(hook: Any, conn_id: str, say: Say = print, wait: float = 30.0) -> bool:
    """Send the receiver a signed test delivery and report its answer; then have ModelRoute send one."""
    import requests

    from airflow_provider_modelroute.version_compat import AirflowNotFoundException

    try:
        config = WebhookConfig.from_extras(conn_id, hook.get_connection(conn_id).extra_dejson)
    except AirflowNotFoundException:
        raise ModelRouteConfigError(f"Airflow connection {conn_id!r} does not exist") from None
    if config is None:
        raise ModelRouteConfigError(
            f"Connection {conn_id!r} has no {SECRET_EXTRA}: run `{PROG} --conn-id {conn_id} setup` first"
        )
    url = config.receiver_url
    body = json.dumps(
        {"id": f"evt_test_{uuid.uuid4().hex}", "type": "webhook.test", "data": {"message": f"{PROG} test"}}
    ).encode()
    stamp = str(int(time.time()))
    headers = {SIGNATURE_HEADER: sign(config.secret, stamp, body), TIMESTAMP_HEADER: stamp}
    headers["Content-Type"] = "application/json"
    try:
        answer = requests.post(url, data=body, headers=headers, timeout=30)
    except requests.RequestException as exc:
        say(
            f"Could not reach the receiver at {url} from here ({type(exc).__name__}): "
            "ModelRoute must reach it there."
        )
        return False
    try:
        outcome = str(answer.json().get("outcome", ""))
    except ValueError:
        outcome = ""
    say(_explain(answer.status_code, outcome, conn_id, url))
    return answer.ok and _modelroute_test_delivery(hook, url, wait, say)


def _explain(status: int, outcome: str, conn_id: str, url: str) -> str:
    """The receiver's answer to a test delivery, and what to do about it."""
    answered = f"The receiver at {url} answered {status}" + (f" ({outcome})" if outcome else "")
    if 200 <= status < 300:
        return f"{answered}: it verified a delivery signed with connection {conn_id!r}'s {SECRET_EXTRA}."
    if status == 404 and outcome:
        from airflow_provider_modelroute.webhooks.receiver import SECRET_CACHE_SECONDS

        return (
            f"{answered}: the api-server does not see a {SECRET_EXTRA} in connection {conn_id!r} (it reads "
            f"the connection again after {SECRET_CACHE_SECONDS:.0f} s). Add the extras where the api-server "
            "gets the connection; after changing an environment variable, restart the api-server."
        )
    if status == 404:
        return (
            f"{answered}, not as the receiver: check the URL, and that the api-server runs Airflow 3.1+ with "
            "this provider installed (restart it after installing the provider)."
        )
    if status == 401:
        return (
            f"{answered}: the api-server's connection {conn_id!r} holds another {SECRET_EXTRA} than this "
            "one. Give every Airflow process the same extras; after changing an environment variable, "
            "restart the api-server."
        )
    return answered


def _modelroute_test_delivery(hook: Any, url: str, wait: float, say: Say) -> bool:
    """Have ModelRoute send its test delivery to the endpoint registered for ``url``; report how the
    receiver answered it, by the endpoint's ``last_success`` and ``failure_count``."""

    def endpoint() -> dict[str, Any]:
        return next((e for e in hook.list_webhook_endpoints() if e.get("url") == url), {})

    before = endpoint()
    if not before:
        say(f"No ModelRoute webhook endpoint is registered for {url}: run `{PROG} setup`.")
        return False
    hook.test_webhook_endpoint(str(before["id"]))
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        now = endpoint()
        if now.get("last_success") and now.get("last_success") != before.get("last_success"):
            say(f"ModelRoute's test delivery to {before['id']} got a 2xx from the receiver.")
            return True
        if (now.get("failure_count") or 0) > (before.get("failure_count") or 0):
            break
        time.sleep(1.0)
    say(
        f"ModelRoute's test delivery to {before['id']} did not get a 2xx: check that ModelRoute can reach "
        f"{url} (DNS, TLS, firewalls). Deferred waits still end by polling meanwhile."
    )
    return False


# -- the connection in the metadata DB ------------------------------------------------------------------


@contextmanager
def _metadata_db_connections() -> Iterator[None]:
    """Let hooks in this admin process read connections from the metadata DB, as Airflow's own
    ``airflow connections`` commands do on Airflow 3 (a plain process sees only env/secrets backends)."""
    old = os.environ.get("_AIRFLOW_PROCESS_CONTEXT")
    os.environ["_AIRFLOW_PROCESS_CONTEXT"] = "server"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("_AIRFLOW_PROCESS_CONTEXT", None)
        else:
            os.environ["_AIRFLOW_PROCESS_CONTEXT"] = old


def _store_extras(conn_id: str, extras: dict[str, Any]) -> bool:
    """Merge ``extras`` into a connection stored in the metadata DB; False if it is not stored there."""
    from airflow.models.connection import Connection
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        conn = session.scalar(select(Connection).where(Connection.conn_id == conn_id))
        if conn is None:
            return False
        conn.set_extra(json.dumps({**conn.extra_dejson, **extras}))
    return True


def run(args: argparse.Namespace) -> int:
    hook = modelroute_hook(args.conn_id)
    if args.command == "setup":
        setup_webhooks(args.conn_id, args.public_url, replace=args.replace, test=not args.no_test)
    elif args.command == "test":
        return 0 if check_receiver(hook, args.conn_id) else 1
    elif args.command == "list":
        print(json.dumps(hook.list_webhook_endpoints(), indent=2))
    else:
        hook.delete_webhook_endpoint(args.endpoint_id)
        print(f"Deleted {args.endpoint_id}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--conn-id", default="modelroute_default", help="the ModelRoute connection")
    commands = parser.add_subparsers(dest="command", required=True)
    setup = commands.add_parser("setup", help="register the receiver and store its secret in the connection")
    setup.add_argument("--public-url", required=True, help="where ModelRoute reaches Airflow's api-server")
    setup.add_argument("--replace", action="store_true", help="re-register an already registered receiver")
    setup.add_argument("--no-test", action="store_true", help="skip the test deliveries")
    commands.add_parser("test", help="send the receiver test deliveries and report its answers")
    commands.add_parser("list", help="list the account's webhook endpoints")
    commands.add_parser("delete", help="delete a webhook endpoint").add_argument("endpoint_id")
    args = parser.parse_args(argv)
    try:
        with _metadata_db_connections():
            return run(args)
    except ModelRouteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
