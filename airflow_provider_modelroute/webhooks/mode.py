"""Webhook mode: settings, task routes (each ``webhook_url`` names its task instance, with an HMAC token),
delivery signatures, and the wait (the trigger reads what the receiver recorded, polling as a safety net)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode, urlsplit

from airflow_provider_modelroute.exceptions import ModelRouteConfigError
from airflow_provider_modelroute.get_provider_info import extra_value

if TYPE_CHECKING:
    from airflow_provider_modelroute.version_compat import Context

SECRET_EXTRA = "webhook_secret"
RECEIVER_URL_EXTRA = "webhook_receiver_url"
POLL_INTERVAL_EXTRA = "webhook_poll_interval"
#: The safety net: with webhooks on, each execution is still looked at this often (jittered).
DEFAULT_POLL_INTERVAL = 600.0
#: Where the api-server mounts the receiver, and its route under that prefix.
URL_PREFIX = "/modelroute"
WEBHOOK_PATH = "/webhooks/{conn_id}"
#: The XCom where the receiver leaves a final event for the task's trigger.
EVENT_XCOM_KEY = "modelroute_webhook_event"
SIGNATURE_HEADER, TIMESTAMP_HEADER = "X-Signature", "X-Signature-Timestamp"
#: Deliveries whose ``X-Signature-Timestamp`` is further than this from our clock are refused.
MAX_CLOCK_SKEW = 300.0


def waiting_xcom_key(execution_id: str) -> str:
    """The XCom a waiting task pushes, so that a delivery with no route finds it by execution id."""
    return f"modelroute_waiting.{execution_id}"


def receiver_url(public_base_url: str, conn_id: str) -> str:
    """The receiver's URL for a connection, given the URL where the Airflow api-server is reachable."""
    base = public_base_url.strip().rstrip("/")
    if urlsplit(base).scheme not in ("http", "https") or not urlsplit(base).hostname:
        raise ModelRouteConfigError(
            f"The public URL {public_base_url!r} is not an http(s) URL, e.g. https://airflow.example.com"
        )
    return f"{base}{URL_PREFIX}{WEBHOOK_PATH.format(conn_id=quote(conn_id, safe=''))}"


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
            seconds = float(DEFAULT_POLL_INTERVAL if interval is None else interval)
        except (TypeError, ValueError):
            seconds = 0.0
        if not seconds > 0:
            raise ModelRouteConfigError(
                f"Connection extra {POLL_INTERVAL_EXTRA!r} must be a positive number of seconds, "
                f"got {interval!r}"
            )
        return cls(str(secret), url.rstrip("/"), seconds)


@dataclass(frozen=True)
class TaskRoute:
    """The task instance a per-execution webhook belongs to (the same on every try)."""

    dag_id: str
    run_id: str
    task_id: str
    map_index: int = -1

    @classmethod
    def of(cls, ti: Any) -> TaskRoute:
        return cls(ti.dag_id, ti.run_id, ti.task_id, -1 if ti.map_index is None else int(ti.map_index))

    def encode(self) -> str:
        raw = json.dumps(list(asdict(self).values()), separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> TaskRoute:
        """The route ``encode`` wrote (check its token first: only this provider's routes decode)."""
        return cls(*json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))))

    def webhook_url(self, receiver: str, secret: str) -> str:
        route = self.encode()
        return f"{receiver}?{urlencode({'route': route, 'token': route_token(secret, route)})}"


def route_token(secret: str, route: str) -> str:
    """Proof that the secret's holder wrote a route: signed as a delivery stamped ``route`` (none can be)."""
    return sign(secret, "route", route.encode())


def token_matches(secret: str, route: str, token: str | None) -> bool:
    return bool(token) and hmac.compare_digest(route_token(secret, route).encode(), str(token).encode())


class SignatureRejected(Exception):
    """A delivery failed verification; the message never holds the secret or the signature."""


def sign(secret: str, timestamp: int | str, body: bytes) -> str:
    """A delivery's ``X-Signature``: hex HMAC-SHA256 of ``"{timestamp}.{raw body}"`` under the secret."""
    return hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()


def verify(
    secret: str, signature: str | None, timestamp: str | None, body: bytes, *, now: float | None = None
) -> int:
    """Check a delivery's signature (constant time) and timestamp (5 minutes); return the timestamp."""
    try:
        sent = int(timestamp or "")
    except ValueError:
        raise SignatureRejected(f"{TIMESTAMP_HEADER} is missing or not unix seconds") from None
    # Computed before the time check, so that a wrong signature and a stale one cost the same.
    expected = sign(secret, str(timestamp).strip(), body).encode()
    valid = hmac.compare_digest(expected, (signature or "").strip().lower().encode())
    if abs((time.time() if now is None else now) - sent) > MAX_CLOCK_SKEW:
        raise SignatureRejected(f"{TIMESTAMP_HEADER} is more than {MAX_CLOCK_SKEW:.0f} s away from our clock")
    if not valid:
        raise SignatureRejected(f"{SIGNATURE_HEADER} is missing or does not match the connection's secret")
    return sent


@dataclass(frozen=True)
class WebhookWait:
    """One task's webhook-mode wait: the connection's settings and the task instance's route."""

    config: WebhookConfig
    route: TaskRoute

    @classmethod
    def decide(cls, task: Any, deferrable: bool, context: Context) -> WebhookWait | None:
        """The webhook wait of a task (its ``hook`` and ``webhook``) before its submit, or None to poll;
        ``webhook=True`` fails when it cannot be."""
        from airflow_provider_modelroute.version_compat import AIRFLOW_V_3_1_PLUS, AirflowNotFoundException

        if task.webhook is False:
            return None
        conn_id, config = task.modelroute_conn_id, None
        if not deferrable:
            problem = "webhook mode needs deferrable=True (the receiver resumes deferred tasks)"
        elif not AIRFLOW_V_3_1_PLUS:
            problem = "webhook mode needs Airflow 3.1+ (the receiver is an api-server plugin app)"
        else:
            try:
                config = WebhookConfig.from_extras(conn_id, task.hook.get_connection(conn_id).extra_dejson)
            except AirflowNotFoundException:  # the submit reports it, naming the fix
                return None
            problem = (
                f"connection {conn_id!r} has no {SECRET_EXTRA}: run `python -m "
                f"airflow_provider_modelroute.webhooks --conn-id {conn_id} setup --public-url ...`"
            )
        if config is None:
            if task.webhook:
                raise ModelRouteConfigError(f"webhook=True, but {problem}")
            return None
        # Pushed before the submit, so that the trigger's read finds a row (Airflow logs a missing one).
        context["ti"].xcom_push(key=EVENT_XCOM_KEY, value=None)
        return cls(config, TaskRoute.of(context["ti"]))

    @property
    def webhook_url(self) -> str:
        return self.route.webhook_url(self.config.receiver_url, self.config.secret)

    def announce(self, context: Context, execution_id: str) -> None:
        """Mark this task as waiting for ``execution_id``, so organisation-wide deliveries find it."""
        context["ti"].xcom_push(key=waiting_xcom_key(execution_id), value=execution_id)


async def delivered_event(route: dict[str, Any], execution_id: str) -> dict[str, Any] | None:
    """The final event the receiver recorded for this task and execution, if any (one XCom read)."""
    from airflow.providers.common.compat.sdk import XCom
    from airflow.sdk.execution_time import task_runner

    ids = {"key": EVENT_XCOM_KEY, **route}
    if hasattr(XCom, "aget_one") and hasattr(getattr(task_runner, "SUPERVISOR_COMMS", None), "asend"):
        value = await XCom.aget_one(**ids)
    else:
        from asgiref.sync import sync_to_async

        value = await sync_to_async(XCom.get_one, thread_sensitive=False)(**ids)
    if isinstance(value, dict) and (value.get("execution_id"), value.get("status")) == (execution_id, "done"):
        return {k: v for k, v in value.items() if k != "try_number"}
    return None
