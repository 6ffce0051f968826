"""Routing a delivery to its task: the receiver's URL, and per-execution URLs that name a task instance.

A per-execution ``webhook_url`` carries the task instance's key (dag, run, task, map index) and a token,
an HMAC of that key under the connection's webhook secret: the receiver routes on it without a
database search, and refuses made-up routes before touching the database. The key, not the task
instance's per-try id, is what the URL names: a retry sends the same request body (and so the same
``Idempotency-Key``) and re-attaches to the execution the first try started. Pure Python.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

#: Where the receiver is mounted in the Airflow api-server (the plugin's ``url_prefix``).
URL_PREFIX = "/modelroute"
#: The receiver's route under that prefix; ``{conn_id}`` names the connection holding the secret.
WEBHOOK_PATH = "/webhooks/{conn_id}"
_TOKEN_CONTEXT = b"modelroute-webhook-route.v1."
#: The XCom where the receiver leaves a delivered terminal event for the task's trigger to find: an
#: event that arrived before the task deferred, or the one that resumed it.
EVENT_XCOM_KEY = "modelroute_webhook_event"
#: Prefix of the XCom key a waiting task pushes so that an organisation-wide delivery (no route in
#: its URL) can be routed by execution id with one indexed lookup.
WAITING_XCOM_PREFIX = "modelroute_waiting."


def waiting_xcom_key(execution_id: str) -> str:
    return f"{WAITING_XCOM_PREFIX}{execution_id}"


class MalformedRoute(ValueError):
    """A ``route`` query parameter that is not one this provider wrote."""


@dataclass(frozen=True)
class TaskRoute:
    """The task instance a per-execution webhook belongs to (the same on every try)."""

    dag_id: str
    run_id: str
    task_id: str
    map_index: int = -1

    @classmethod
    def of(cls, ti: Any) -> TaskRoute:
        """The route of a running task instance (``context["ti"]``)."""
        map_index = getattr(ti, "map_index", -1)
        return cls(
            str(ti.dag_id), str(ti.run_id), str(ti.task_id), -1 if map_index is None else int(map_index)
        )

    def encode(self) -> str:
        raw = json.dumps([self.dag_id, self.run_id, self.task_id, self.map_index], separators=(",", ":"))
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> TaskRoute:
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
            dag_id, run_id, task_id, map_index = json.loads(raw)
        except (binascii.Error, ValueError, TypeError):
            raise MalformedRoute("the route is not one this provider wrote") from None
        if not all(isinstance(part, str) and part for part in (dag_id, run_id, task_id)) or not isinstance(
            map_index, int
        ):
            raise MalformedRoute("the route is not one this provider wrote")
        return cls(dag_id, run_id, task_id, map_index)


def route_token(secret: str, route: str) -> str:
    """The token that proves a route was written by someone holding the webhook secret."""
    return hmac.new(secret.encode(), _TOKEN_CONTEXT + route.encode(), hashlib.sha256).hexdigest()


def token_matches(secret: str, route: str, token: str | None) -> bool:
    """Constant-time check of a route's token."""
    return bool(token) and hmac.compare_digest(route_token(secret, route).encode(), str(token).encode())


def is_loopback_url(url: str) -> bool:
    """A URL on this machine (the local test server accepts http:// endpoints only there)."""
    import ipaddress

    host = urlsplit(url).hostname or ""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def receiver_url(public_base_url: str, conn_id: str) -> str:
    """The receiver's URL for a connection, given the URL where the Airflow api-server is reachable."""
    parts = urlsplit(public_base_url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{public_base_url!r} is not an http(s) URL, e.g. https://airflow.example.com")
    base = public_base_url.strip().rstrip("/")
    return f"{base}{URL_PREFIX}{WEBHOOK_PATH.format(conn_id=quote(conn_id, safe=''))}"


def execution_webhook_url(receiver: str, secret: str, route: TaskRoute) -> str:
    """The per-execution ``webhook_url`` for a task instance: the receiver, its route and token."""
    encoded = route.encode()
    return f"{receiver}?{urlencode({'route': encoded, 'token': route_token(secret, encoded)})}"
