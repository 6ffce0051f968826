"""Webhook mode: the connection's webhook settings, routes and signatures, and the wait they configure.

Off by default; on when the connection names a ``webhook_secret`` (the endpoint's ``whsec_...``) and
a ``webhook_receiver_url``, the wait is deferrable, and Airflow mounts the receiver (3.1+). Each
execution's ``webhook_url`` then names its task instance (dag, run, task, map index: the same on
every try, so a retry re-attaches) and a token, an HMAC of that route under the secret: the receiver
routes on it without a search and refuses made-up routes. The trigger reads the event the receiver
may already have recorded, and polls only as a safety net (``webhook_poll_interval``). Deliveries
are signed as the docs say: hex HMAC-SHA256 of ``"{X-Signature-Timestamp}.{raw body}"``.

The operator, the sensor and the trigger import this module: it imports nothing above ``version_compat``.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode, urlsplit

from airflow_provider_modelroute.exceptions import ModelRouteConfigError
from airflow_provider_modelroute.get_provider_info import CONN_TYPE

if TYPE_CHECKING:
    from airflow_provider_modelroute.version_compat import Context

SECRET_EXTRA = "webhook_secret"
RECEIVER_URL_EXTRA = "webhook_receiver_url"
POLL_INTERVAL_EXTRA = "webhook_poll_interval"
#: The safety net: with webhooks on, each execution is still looked at this often (jittered).
DEFAULT_POLL_INTERVAL = 600.0
#: Where the receiver is mounted in the Airflow api-server (the plugin's ``url_prefix``).
URL_PREFIX = "/modelroute"
#: The receiver's route under that prefix; ``{conn_id}`` names the connection holding the secret.
WEBHOOK_PATH = "/webhooks/{conn_id}"
#: The XCom where the receiver leaves a terminal event for the task's trigger: one that arrived
#: before the task deferred, or the one that resumed it.
EVENT_XCOM_KEY = "modelroute_webhook_event"
_WAITING_XCOM_PREFIX = "modelroute_waiting."
_TOKEN_CONTEXT = b"modelroute-webhook-route.v1."
SIGNATURE_HEADER = "X-Signature"
TIMESTAMP_HEADER = "X-Signature-Timestamp"
#: Deliveries whose ``X-Signature-Timestamp`` is further than this from our clock are refused.
MAX_CLOCK_SKEW = 300.0


def waiting_xcom_key(execution_id: str) -> str:
    """The XCom a waiting task pushes, so that an organisation-wide delivery (no route in its URL)
    finds the task by execution id with one indexed lookup."""
    return f"{_WAITING_XCOM_PREFIX}{execution_id}"


def extra_value(extras: Mapping[str, Any], name: str) -> Any:
    """An extra by its plain name or the ``extra__modelroute__`` form older UIs store; None if unset."""
    for key in (name, f"extra__{CONN_TYPE}__{name}"):
        if extras.get(key) not in (None, ""):
            return extras[key]
    return None


def receiver_url(public_base_url: str, conn_id: str) -> str:
    """The receiver's URL for a connection, given the URL where the Airflow api-server is reachable."""
    parts = urlsplit(public_base_url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{public_base_url!r} is not an http(s) URL, e.g. https://airflow.example.com")
    base = public_base_url.strip().rstrip("/")
    return f"{base}{URL_PREFIX}{WEBHOOK_PATH.format(conn_id=quote(conn_id, safe=''))}"


def is_loopback_url(url: str) -> bool:
    """A URL on the local host (a webhook endpoint may be plain http:// only there, for local tests)."""
    import ipaddress

    host = urlsplit(url).hostname or ""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class WebhookConfig:
    """What webhook mode needs: the secret, the receiver's public URL, the safety net's interval."""

    secret: str = field(repr=False)
    receiver_url: str
    poll_interval: float = DEFAULT_POLL_INTERVAL

    @classmethod
    def from_extras(cls, conn_id: str, extras: Mapping[str, Any]) -> WebhookConfig | None:
        """The connection's webhook settings, or None when it names no webhook secret."""
        secret = extra_value(extras, SECRET_EXTRA)
        if secret is None:
            return None
        url = extra_value(extras, RECEIVER_URL_EXTRA)
        if not isinstance(url, str) or not url.startswith(("https://", "http://")):
            raise ModelRouteConfigError(
                f"Connection {conn_id!r} has a {SECRET_EXTRA} but no usable {RECEIVER_URL_EXTRA} "
                f"(got {url!r}): set it to the receiver's public URL, e.g. "
                f"https://airflow.example.com{URL_PREFIX}/webhooks/{conn_id}, or remove {SECRET_EXTRA}"
            )
        interval = extra_value(extras, POLL_INTERVAL_EXTRA)
        try:
            seconds = DEFAULT_POLL_INTERVAL if interval is None else float(interval)
        except (TypeError, ValueError):
            seconds = -1.0
        if seconds <= 0:
            raise ModelRouteConfigError(
                f"Connection extra {POLL_INTERVAL_EXTRA!r} must be a positive number of seconds, "
                f"got {interval!r}"
            )
        return cls(str(secret), url.rstrip("/"), seconds)


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

    def webhook_url(self, receiver: str, secret: str) -> str:
        """This task instance's per-execution ``webhook_url``: the receiver, the route and its token."""
        encoded = self.encode()
        return f"{receiver}?{urlencode({'route': encoded, 'token': route_token(secret, encoded)})}"


def route_token(secret: str, route: str) -> str:
    """The token that proves a route was written by someone holding the webhook secret."""
    return hmac.new(secret.encode(), _TOKEN_CONTEXT + route.encode(), hashlib.sha256).hexdigest()


def token_matches(secret: str, route: str, token: str | None) -> bool:
    """Constant-time check of a route's token."""
    return bool(token) and hmac.compare_digest(route_token(secret, route).encode(), str(token).encode())


class SignatureRejected(Exception):
    """A delivery failed verification; the message says why and never holds the secret or signature."""


def sign(secret: str, timestamp: int | str, body: bytes) -> str:
    """``body``'s ``X-Signature`` when sent at ``timestamp``: hex HMAC-SHA256 of ``"{timestamp}.{body}"``."""
    return hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()


def verify(
    secret: str, signature: str | None, timestamp: str | None, body: bytes, *, now: float | None = None
) -> int:
    """Check a delivery's signature (constant time) and its timestamp; return the timestamp.

    :raises SignatureRejected: missing headers, a timestamp over 5 minutes away, or a wrong signature.
    """
    if not signature or not timestamp:
        raise SignatureRejected(f"missing {SIGNATURE_HEADER} or {TIMESTAMP_HEADER} header")
    timestamp = timestamp.strip()
    try:
        sent = int(timestamp)
    except ValueError:
        raise SignatureRejected(f"{TIMESTAMP_HEADER} is not unix seconds") from None
    # Computed before the time check, so that a wrong signature and a stale one cost the same.
    valid = hmac.compare_digest(sign(secret, timestamp, body).encode(), signature.strip().lower().encode())
    if abs((time.time() if now is None else now) - sent) > MAX_CLOCK_SKEW:
        raise SignatureRejected(f"{TIMESTAMP_HEADER} is more than {MAX_CLOCK_SKEW:.0f} s away from our clock")
    if not valid:
        raise SignatureRejected("the signature does not match this connection's webhook secret")
    return sent


@dataclass(frozen=True)
class WebhookWait:
    """One task's webhook-mode wait: the connection's settings and the task instance's route."""

    config: WebhookConfig
    route: TaskRoute

    @classmethod
    def decide(
        cls, *, hook: Any, requested: bool | None, deferrable: bool, context: Context
    ) -> WebhookWait | None:
        """The webhook wait for this task, or None to poll; ``requested=True`` fails when it cannot be.

        Call it before submitting: it prepares the XCom the receiver records an early event in.
        """
        from airflow_provider_modelroute.version_compat import AIRFLOW_V_3_1_PLUS, AirflowNotFoundException

        if requested is False:
            return None
        problem = None
        if not deferrable:
            problem = "webhook mode needs deferrable=True (the receiver resumes deferred tasks)"
        elif not AIRFLOW_V_3_1_PLUS:
            problem = "webhook mode needs Airflow 3.1+ (the receiver is an api-server plugin app)"
        config = None
        if problem is None:
            conn_id = hook.modelroute_conn_id
            try:
                extras = hook.get_connection(conn_id).extra_dejson
            except AirflowNotFoundException:  # the submit reports it, naming the fix
                return None
            config = WebhookConfig.from_extras(conn_id, extras)
            if config is None:
                problem = (
                    f"connection {conn_id!r} has no {SECRET_EXTRA}: run `python -m "
                    f"airflow_provider_modelroute.webhooks --conn-id {conn_id} setup --public-url ...`"
                )
        if config is None:
            if requested:
                raise ModelRouteConfigError(f"webhook=True, but {problem}")
            return None
        # An empty slot for the receiver to fill, pushed before anything is submitted: the trigger's
        # read then finds a row (a missing one is logged as an error by Airflow's API client).
        context["ti"].xcom_push(key=EVENT_XCOM_KEY, value=None)
        return cls(config, TaskRoute.of(context["ti"]))

    @property
    def webhook_url(self) -> str:
        """The per-execution ``webhook_url`` to submit with."""
        return self.route.webhook_url(self.config.receiver_url, self.config.secret)

    def announce(self, context: Context, execution_id: str) -> None:
        """Mark this task as waiting for ``execution_id``, so organisation-wide deliveries find it."""
        context["ti"].xcom_push(key=waiting_xcom_key(execution_id), value=execution_id)

    def trigger_kwargs(self) -> dict[str, Any]:
        return {"poll_interval": self.config.poll_interval, "webhook_route": dataclasses.asdict(self.route)}


async def delivered_event(route: dict[str, Any], execution_id: str) -> dict[str, Any] | None:
    """The final event the receiver recorded for this task and execution, if any (one XCom read).

    The triggerer's supervisor channel is async (``XCom.aget_one``, Airflow 3.3); ``dag.test()``'s
    in-process one is sync only: there the read runs in a worker thread, off the event loop.
    """
    from airflow.providers.common.compat.sdk import XCom

    ids = {"key": EVENT_XCOM_KEY, **route}
    try:
        from airflow.sdk.execution_time import task_runner

        comms = getattr(task_runner, "SUPERVISOR_COMMS", None)
    except ImportError:
        comms = None
    if hasattr(XCom, "aget_one") and hasattr(comms, "asend"):
        value = await XCom.aget_one(**ids)
    else:
        from asgiref.sync import sync_to_async

        value = await sync_to_async(XCom.get_one, thread_sensitive=False)(**ids)
    if (
        isinstance(value, dict)
        and value.get("execution_id") == execution_id
        and value.get("status") == "done"
    ):
        return {k: v for k, v in value.items() if k != "try_number"}
    return None
