"""What every ModelRoute request shares: the connection's settings, TLS and proxies, the error model.

The sync hook (requests), the async hook (aiohttp) and storage transfers all take these from one
:class:`Transport`, so the paths cannot drift apart. TLS and proxies: ``hooks/storage.py``'s :func:`route`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import http
import json
import logging
import os
import re
import ssl
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

from airflow_provider_modelroute import __version__, api, metrics
from airflow_provider_modelroute.exceptions import (
    ModelRouteApiError,
    ModelRouteConfigError,
    ModelRouteConnectionError,
    ModelRouteError,
    api_error,
)
from airflow_provider_modelroute.get_provider_info import CONN_TYPE, extra_value
from airflow_provider_modelroute.hooks.rate_budget import (
    RateLimit,
    RetryPolicy,
    retry_after,
    shared_rate_budget,
)
from airflow_provider_modelroute.version_compat import AirflowNotFoundException, mask_secret

if TYPE_CHECKING:
    from airflow_provider_modelroute.version_compat import Connection

USER_AGENT = f"airflow-provider-modelroute/{__version__}"
_log = logging.getLogger(__name__)
#: The API's collections: how an id in each looks, and what to call it in an error.
_IDS = {
    "executions": (re.compile(r"exec_[A-Za-z0-9_-]{1,128}"), "execution_id", "exec_<uuid>"),
    "files": (api.FILE_ID_RE, "file_id", "file_<uuid>"),
    "webhooks/endpoints": (re.compile(r"wh_[A-Za-z0-9_-]{1,128}"), "endpoint_id", "wh_..."),
}


def api_path(collection: str, ident: str, suffix: str = "") -> str:
    """``/{collection}/{ident}{suffix}``, refusing an id that does not look like the API's (never a path)."""
    pattern, name, shape = _IDS[collection]
    if not isinstance(ident, str) or not pattern.fullmatch(ident):
        raise ModelRouteConfigError(f"{name} must look like {shape!r}, got {ident!r}")
    return f"/{collection}/{quote(ident)}{suffix}"


def check_execution_request(model: Any, input: Any) -> None:
    """Refuse a request the API would refuse for its shape alone: no model slug, or input not an object."""
    if not isinstance(model, str) or not model.strip():
        raise ModelRouteConfigError("model must be a non-empty model slug, e.g. model='flux-1.1-pro'")
    if not isinstance(input, dict):
        raise ModelRouteConfigError(
            f"input must be a dict (the model's input object), got {type(input).__name__}"
        )


@contextlib.contextmanager
def read_connection(conn_id: str) -> Iterator[None]:
    """Around a connection lookup: "not found" says how to create it; any other failure surfaces as
    itself, naming the connection (a retry may help, so it does not fail the task at once)."""
    try:
        yield
    except AirflowNotFoundException:
        raise ModelRouteConfigError(
            f"Airflow connection {conn_id!r} does not exist: create it (type {CONN_TYPE!r}, the API key in "
            "its API key field, `password` in JSON) or set modelroute_conn_id to an existing one. If it "
            "exists, Airflow could not read it: its log names the secrets backend's error"
        ) from None
    except ModelRouteError:
        raise
    except Exception as exc:
        raise ModelRouteError(
            f"Could not read Airflow connection {conn_id!r}: {type(exc).__name__}: {exc}"
        ) from exc


class _Extras:
    """A connection's extras, read by plain name or the ``extra__modelroute__`` form older UIs store."""

    def __init__(self, conn: Connection) -> None:
        self.conn_id = conn.conn_id
        try:  # Airflow's ``extra_dejson`` turns invalid JSON into {} silently: say so instead
            self.values = json.loads(conn.extra) if conn.extra else {}
        except ValueError as exc:
            raise ModelRouteConfigError(
                f"Connection {conn.conn_id!r} has extras that are not JSON: {exc}"
            ) from None
        if not isinstance(self.values, dict):
            raise ModelRouteConfigError(f"Connection {conn.conn_id!r} has extras that are not a JSON object")

    def get(self, name: str, default: Any = None) -> Any:
        value = extra_value(self.values, name)
        return default if value is None else value

    def number(self, name: str, default: float, minimum: float) -> float:
        value = self.get(name, default)
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = minimum - 1
        if number < minimum:
            raise ModelRouteConfigError(
                f"Connection {self.conn_id!r}: extra {name!r} must be a number of at least {minimum}, got "
                f"{value!r}; fix it in the connection's extras"
            )
        return number

    def flag(self, name: str) -> bool:
        value = self.get(name, False)
        return value.strip().lower() in {"1", "true", "yes", "on"} if isinstance(value, str) else bool(value)

    def path(self, name: str) -> str | None:
        """A file path extra; it must exist where the task or trigger runs."""
        value = self.get(name)
        if value is None:
            return None
        path = os.path.expanduser(str(value).strip())
        if not os.path.exists(path):
            raise ModelRouteConfigError(
                f"Connection {self.conn_id!r}: extra {name!r} names {path!r}, which does not exist here: "
                "install the file on every worker and triggerer, or fix the path"
            )
        return path


def _base_url(conn: Connection) -> str:
    """The connection's host as ``scheme://host[:port]`` (a trailing ``/v1`` is dropped)."""
    if not conn.host:
        return api.DEFAULT_BASE_URL
    url = conn.host.strip().rstrip("/")
    parts = urlsplit(url if "://" in url else f"https://{url}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ModelRouteConfigError(
            f"Connection {conn.conn_id!r}: host {conn.host!r} is not a base URL: use e.g. "
            f"{api.DEFAULT_BASE_URL} (or leave it empty)"
        )
    netloc = parts.netloc if not conn.port or parts.port else f"{parts.netloc}:{conn.port}"
    return f"{parts.scheme}://{netloc}{parts.path}".removesuffix(api.API_PREFIX)


@dataclass(frozen=True)
class ConnectionSettings:
    """Everything the hooks need from an Airflow connection, validated once."""

    base_url: str
    api_key: str = field(repr=False)
    conn_id: str = "modelroute_default"
    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    allow_insecure_storage_urls: bool = False
    dashboard_url: str = api.DEFAULT_DASHBOARD_URL
    ca_bundle: str | None = None
    client_cert: str | None = None
    client_key: str | None = None

    @property
    def timeouts(self) -> tuple[float, float]:
        """(connect, read) in seconds."""
        return self.connect_timeout, self.read_timeout

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
            _log.warning(
                "The API key in connection %r (password field): %s. Sending it anyway; if ModelRoute "
                "answers UNAUTHORIZED, copy the whole key again.",
                conn.conn_id,
                warning,
            )
        extras = _Extras(conn)
        settings = cls(
            base_url=_base_url(conn),
            api_key=api_key,
            conn_id=conn.conn_id,
            connect_timeout=extras.number("connect_timeout", cls.connect_timeout, 0.001),
            read_timeout=extras.number("timeout", cls.read_timeout, 0.001),
            retry=RetryPolicy(
                int(extras.number("max_retries", RetryPolicy.max_retries, 0)),
                extras.number("retry_base_wait", RetryPolicy.base_wait, 0),
                extras.number("retry_max_wait", RetryPolicy.max_wait, 0),
                extras.number("retry_deadline", RetryPolicy.deadline, 0),
            ),
            allow_insecure_storage_urls=extras.flag("allow_insecure_storage_urls"),
            dashboard_url=str(extras.get("dashboard_url", cls.dashboard_url)).rstrip("/"),
            ca_bundle=extras.path("ca_bundle"),
            client_cert=extras.path("client_cert"),
            client_key=extras.path("client_key"),
        )
        if settings.client_key and not settings.client_cert:
            raise ModelRouteConfigError(
                f"Connection {conn.conn_id!r}: extra 'client_key' is set without 'client_cert': set both "
                "(or client_cert alone for a PEM file that holds the certificate and its key)"
            )
        return settings


# -- errors ----------------------------------------------------------------------------------------

#: SSL errors that are only a dropped connection (retried like any other drop).
_SSL_DROPS = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError)
#: The server closed a kept-alive connection as we reused it: retry at once.
_STALE = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)
_STALE_NAMES = frozenset({"ServerDisconnectedError", "RemoteDisconnected"})
#: The clients' names for a body that does not decompress (aiohttp, requests, urllib3).
_DECODING_ERRORS = frozenset({"ContentEncodingError", "ContentDecodingError", "DecodeError"})
_USERINFO_RE = re.compile(r"(\w+://)[^/@\s'\"]+@")


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """An exception and everything it wraps (causes, contexts, and the wrapped errors of clients)."""
    seen: set[int] = set()
    stack = [exc]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        wrapped = (
            current.__cause__,
            current.__context__,
            getattr(current, "reason", None),
            getattr(current, "certificate_error", None),
            *current.args,
        )
        stack.extend(e for e in wrapped if isinstance(e, BaseException))


def _proxy_refusal(exc: BaseException) -> int | None:
    """The 4xx status with which a proxy refused a tunnel, if ``exc`` says so."""
    status = getattr(exc, "status", None)
    if type(exc).__name__ == "ClientHttpProxyError" and isinstance(status, int) and 400 <= status < 500:
        return status
    match = re.search(r"Tunnel connection failed: (4\d\d)", str(exc))
    return int(match[1]) if match else None


def _scrub(text: str, url: str) -> str:
    """An error text without the URL's query (a presigned signature) or a proxy URL's password."""
    query = urlsplit(url).query
    if query:
        text = text.replace(url, api.redact_url(url)).replace(query, "<redacted>")
    return _USERINFO_RE.sub(r"\1<redacted>@", text)


class Transport:
    """One connection's way to the API: URLs, headers, pacing, response parsing and the retry policy."""

    def __init__(self, settings: ConnectionSettings, log: logging.Logger | Any) -> None:
        self.settings = settings
        self.log = log
        self.rate_limit = RateLimit()
        self.budget = shared_rate_budget(settings.base_url, settings.api_key)
        self.retry = dataclasses.replace(settings.retry, log=log)
        self.headers = {
            "Authorization": f"Bearer {settings.api_key}",
            "Accept": "application/json",
            "User-Agent": USER_AGENT,
        }

    def url(self, path: str) -> str:
        return f"{self.settings.base_url}{api.API_PREFIX}{path}"

    @contextlib.contextmanager
    def exchange(
        self, method: str, url: str, errors: type[BaseException] | tuple[type[BaseException], ...]
    ) -> Iterator[Callable[[Mapping[str, str]], None]]:
        """Around one request the budget granted: the client's ``errors`` become the error model, and
        the budget learns from the answer's headers (pass them to the yielded function)."""
        seen: list[RateLimit] = []

        def answered(headers: Mapping[str, str]) -> None:
            self.rate_limit = RateLimit.read(headers) or self.rate_limit
            seen.append(self.rate_limit)

        try:
            yield answered
        except errors as exc:
            if isinstance(exc, ModelRouteError):
                raise
            raise self.transport_error(exc, method, url) from None
        finally:
            self.budget.observe(seen[0] if seen else None)

    def parse(self, method: str, path: str, status: int, headers: Mapping[str, str], content: bytes) -> Any:
        """Return a 2xx response's JSON, else raise the API error."""
        metrics.request(method, path, status)
        if not 200 <= status < 300:
            raise self.error_from_response(status, headers, content)
        try:
            return json.loads(content) if content else {}
        except ValueError:
            raise ModelRouteConnectionError(
                f"ModelRoute {method} {path} answered HTTP {status} with a body that is not JSON"
            ) from None

    def error_from_response(
        self, status: int, headers: Mapping[str, str], content: bytes
    ) -> ModelRouteApiError:
        body: Any = None
        with contextlib.suppress(ValueError):
            body = json.loads(content) if content else None
        err = body.get("error") if isinstance(body, dict) else None
        if not isinstance(err, dict):
            try:
                err = {"message": http.HTTPStatus(status).phrase}
            except ValueError:
                err = {"message": "unexpected response"}
        code = str(err.get("code") or f"HTTP_{status}")
        message = str(err.get("message") or "")
        if code == "UNAUTHORIZED" or status in (401, 403):
            message += f" (the API key of connection {self.settings.conn_id!r})"
        retryable, details = err.get("retryable"), err.get("details")
        return api_error(
            code,
            message,
            http_status=status,
            retryable=retryable if isinstance(retryable, bool) else None,
            details=details if isinstance(details, list) else None,
            request_id=err.get("request_id") or headers.get("X-Request-Id"),
            retry_after=retry_after(status, headers, self.rate_limit),
        )

    def transport_error(self, exc: BaseException, method: str, url: str) -> ModelRouteError:
        """Classify a failure without an HTTP answer; the text never carries a presigned signature.

        Resets, timeouts and dropped or stale connections are retried (a connection the server
        closed while idle at once). What a retry cannot fix fails at once, naming the fix: an
        untrusted certificate or failed handshake, a proxy refusing us, a body that does not
        decompress.
        """
        detail = _scrub(str(exc), url)
        if (
            isinstance(exc, (TimeoutError, asyncio.TimeoutError)) and not detail
        ):  # aiohttp's timeouts say nothing
            connect, read = self.settings.timeouts
            detail = f"no complete answer within {connect:g} s (connect) + {read:g} s (read)"
        text = f"ModelRoute {method} {api.redact_url(url)} failed: {type(exc).__name__}: {detail}"
        metrics.request(method, url, None)
        causes = list(_causes(exc))
        conn = f"connection {self.settings.conn_id!r}"
        if any(isinstance(c, ssl.SSLCertVerificationError) for c in causes):
            return ModelRouteConfigError(
                f"{text}. The server's TLS certificate is not trusted here: if a private or corporate CA "
                f"issued it, set the {conn} extra 'ca_bundle' (or SSL_CERT_FILE / REQUESTS_CA_BUNDLE) to "
                "that CA's PEM file"
            )
        if any(isinstance(c, ssl.SSLError) and not isinstance(c, _SSL_DROPS) for c in causes):
            return ModelRouteConfigError(
                f"{text}. The TLS handshake failed: check the {conn} extras 'client_cert' and "
                "'client_key' (if the server asks for a client certificate) and 'ca_bundle'"
            )
        proxy_status = next(filter(None, map(_proxy_refusal, causes)), None)
        if proxy_status:
            return ModelRouteConfigError(
                f"{text}. The proxy refused the request (HTTP {proxy_status}): check the proxy URL and "
                "its credentials in HTTPS_PROXY, or add the host to NO_PROXY"
            )
        error = ModelRouteConnectionError(text)
        if any(isinstance(c, zlib.error) or type(c).__name__ in _DECODING_ERRORS for c in causes):
            error = ModelRouteConnectionError(
                f"{text}. The response's compressed body is corrupt (a proxy rewriting responses?); "
                "not retried"
            )
            error.retryable = False
        elif any(isinstance(c, _STALE) or type(c).__name__ in _STALE_NAMES for c in causes):
            error.stale = True
        return error
