"""The connection, read once: base URL, API key, timeouts, retry policy and storage switches."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from airflow_provider_modelroute import __version__, api
from airflow_provider_modelroute._compat import (
    mask_secret,
)
from airflow_provider_modelroute.exceptions import (
    ModelRouteConfigError,
)
from airflow_provider_modelroute.provider_info import CONN_TYPE

if TYPE_CHECKING:
    from airflow_provider_modelroute._compat import Connection

USER_AGENT = f"airflow-provider-modelroute/{__version__}"
log = logging.getLogger(__name__)


def _extra(extras: Mapping[str, Any], name: str, default: Any) -> Any:
    """Read an extra by its plain name or the ``extra__modelroute__`` form older UIs store."""
    for key in (name, f"extra__{CONN_TYPE}__{name}"):
        value = extras.get(key)
        if value not in (None, ""):
            return value
    return default


def _number(extras: Mapping[str, Any], name: str, default: float, minimum: float) -> float:
    value = _extra(extras, name, default)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ModelRouteConfigError(
            f"Connection extra {name!r} must be a number, got {value!r}: fix it in the connection's extras"
        ) from None
    if number < minimum:
        raise ModelRouteConfigError(f"Connection extra {name!r} must be at least {minimum}, got {number}")
    return number


def _flag(extras: Mapping[str, Any], name: str) -> bool:
    value = _extra(extras, name, False)
    if isinstance(value, str):
        return value.strip().lower() in {"1", "true", "yes", "on"}
    return bool(value)


def _path(extras: Mapping[str, Any], name: str) -> str | None:
    """A file path extra; it must exist where the task or trigger runs."""
    value = _extra(extras, name, None)
    if value is None:
        return None
    path = os.path.expanduser(str(value).strip())
    if not os.path.exists(path):
        raise ModelRouteConfigError(
            f"Connection extra {name!r} names {path!r}, which does not exist on this machine: install the "
            "file on every worker and triggerer, or fix the path"
        )
    return path


def _base_url(host: str | None, port: int | None) -> str:
    """Normalise the connection's host into ``scheme://host[:port]`` (a trailing ``/v1`` is dropped)."""
    if not host:
        return api.DEFAULT_BASE_URL
    url = host.strip().rstrip("/")
    if "://" not in url:
        url = f"https://{url}"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ModelRouteConfigError(
            f"Connection host {host!r} is not a base URL: use e.g. {api.DEFAULT_BASE_URL} (or leave it empty)"
        )
    if port and parts.port is None:
        url = f"{parts.scheme}://{parts.netloc}:{port}{parts.path}"
    return url.removesuffix(api.API_PREFIX)


@dataclass(frozen=True)
class ConnectionSettings:
    """Everything the clients need from an Airflow connection, validated once."""

    base_url: str
    api_key: str = field(repr=False)
    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    max_retries: int = 5
    retry_base_wait: float = 0.5
    retry_max_wait: float = 30.0
    retry_deadline: float = 120.0
    allow_insecure_storage_urls: bool = False
    dashboard_url: str = api.DEFAULT_DASHBOARD_URL
    #: TLS: a CA bundle (PEM file or directory) to trust, and a client certificate for the API host.
    ca_bundle: str | None = None
    client_cert: str | None = None
    client_key: str | None = None

    @staticmethod
    def missing(conn_id: str) -> ModelRouteConfigError:
        """The error for a connection id Airflow does not know (a retry would not create it)."""
        return ModelRouteConfigError(
            f"Airflow connection {conn_id!r} does not exist: create it (type {CONN_TYPE!r}, the API key in "
            "its API key field, `password` in JSON) or set modelroute_conn_id to an existing one"
        )

    @classmethod
    def from_connection(cls, conn: Connection) -> ConnectionSettings:
        """Validate a connection. An unusual API key only gets a warning: the server judges keys."""
        api_key = (conn.password or "").strip()
        if not api_key:
            raise ModelRouteConfigError(
                f"Connection {conn.conn_id!r} has no ModelRoute API key: put it in the password field "
                "(app.modelroute.ai > Settings > API Keys)."
            )
        mask_secret(api_key)
        warning = api.api_key_warning(api_key)
        if warning:
            log.warning(
                "The API key in connection %r (password field): %s. Sending it anyway; if ModelRoute "
                "answers UNAUTHORIZED, copy the whole key again.",
                conn.conn_id,
                warning,
            )
        extras = conn.extra_dejson
        return cls(
            base_url=_base_url(conn.host, conn.port),
            api_key=api_key,
            connect_timeout=_number(extras, "connect_timeout", cls.connect_timeout, 0.001),
            read_timeout=_number(extras, "timeout", cls.read_timeout, 0.001),
            max_retries=int(_number(extras, "max_retries", cls.max_retries, 0)),
            retry_base_wait=_number(extras, "retry_base_wait", cls.retry_base_wait, 0),
            retry_max_wait=_number(extras, "retry_max_wait", cls.retry_max_wait, 0),
            retry_deadline=_number(extras, "retry_deadline", cls.retry_deadline, 0),
            allow_insecure_storage_urls=_flag(extras, "allow_insecure_storage_urls"),
            dashboard_url=str(_extra(extras, "dashboard_url", cls.dashboard_url)).rstrip("/"),
            ca_bundle=_path(extras, "ca_bundle"),
            client_cert=_path(extras, "client_cert"),
            client_key=_path(extras, "client_key"),
        )
