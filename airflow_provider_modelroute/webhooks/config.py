"""Webhook mode's settings, read from the ModelRoute connection's extras.

``webhook_secret`` (the endpoint's ``whsec_...``; a masked field) and ``webhook_receiver_url`` (the
receiver as ModelRoute reaches it) turn webhook mode on; ``webhook_poll_interval`` sets the safety
net's pace (default: one look per execution every 10 minutes). ``python -m
airflow_provider_modelroute.webhooks setup`` fills them in.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from airflow_provider_modelroute.exceptions import ModelRouteConfigError
from airflow_provider_modelroute.provider_info import CONN_TYPE

SECRET_EXTRA = "webhook_secret"
RECEIVER_URL_EXTRA = "webhook_receiver_url"
POLL_INTERVAL_EXTRA = "webhook_poll_interval"
#: The safety net: with webhooks on, each execution is still looked at this often (jittered).
DEFAULT_POLL_INTERVAL = 600.0


def extra_value(extras: Mapping[str, Any], name: str) -> Any:
    """An extra by its plain name or the ``extra__modelroute__`` form older UIs store; None if unset."""
    for key in (name, f"extra__{CONN_TYPE}__{name}"):
        if extras.get(key) not in (None, ""):
            return extras[key]
    return None


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
                f"https://airflow.example.com/modelroute/webhooks/{conn_id}, or remove {SECRET_EXTRA}"
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
