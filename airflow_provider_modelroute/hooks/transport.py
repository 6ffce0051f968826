"""What every ModelRoute request shares: the connection's settings, TLS and proxies, the error model.

The sync hook (requests), the async hook (aiohttp) and storage transfers all take these from one
:class:`Transport`, so the paths cannot drift apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http
import json
import logging
import os
import re
import ssl
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
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
    import tenacity

    from airflow_provider_modelroute.version_compat import Connection

USER_AGENT = f"airflow-provider-modelroute/{__version__}"
CA_BUNDLE_VARIABLES = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE")
_PROXY_VARIABLES = tuple(n for b in ("https_proxy", "http_proxy", "all_proxy") for n in (b, b.upper()))
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


@contextlib.contextmanager
def read_connection(conn_id: str) -> Iterator[None]:
    """Around a connection lookup: "not found" says how to create it; any other failure names the
    connection (a retry may help, so it does not fail the task at once)."""
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
        if self.get(name) is None:
            return None
        path = os.path.expanduser(str(self.get(name)).strip())
        if not os.path.exists(path):
            raise ModelRouteConfigError(
                f"Connection {self.conn_id!r}: extra {name!r} names {path!r}, which does not exist here: "
                "install the file on every worker and triggerer, or fix the path"
            )
        return path


@dataclass(frozen=True)
class ConnectionSettings:
    """Everything the hooks need from an Airflow connection, validated once."""

    base_url: str
    api_key: str = field(repr=False)
    conn_id: str = "modelroute_default"
    timeouts: tuple[float, float] = (10.0, 30.0)  # (connect, read) in seconds
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    allow_insecure_storage_urls: bool = False
    dashboard_url: str = api.DEFAULT_DASHBOARD_URL
    ca_bundle: str | None = None
    client_cert: str | None = None
    client_key: str | None = None

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
        base_url = api.DEFAULT_BASE_URL
        if conn.host:
            url = conn.host.strip().rstrip("/")
            parts = urlsplit(url if "://" in url else f"https://{url}")
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ModelRouteConfigError(
                    f"Connection {conn.conn_id!r}: host {conn.host!r} is not a base URL: use e.g. "
                    f"{api.DEFAULT_BASE_URL} (or leave it empty)"
                )
            netloc = parts.netloc if not conn.port or parts.port else f"{parts.netloc}:{conn.port}"
            base_url = f"{parts.scheme}://{netloc}{parts.path}".removesuffix(api.API_PREFIX)
        extras = _Extras(conn)
        settings = cls(
            base_url=base_url,
            api_key=api_key,
            conn_id=conn.conn_id,
            timeouts=(extras.number("connect_timeout", 10.0, 0.001), extras.number("timeout", 30.0, 0.001)),
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


_SETTINGS: dict[tuple[Any, ...], ConnectionSettings] = {}


def connection_settings(conn: Connection) -> ConnectionSettings:
    """A connection's settings, built once per connection as it stands (a changed connection is read anew)."""
    key = (conn.conn_id, conn.host, conn.port, conn.password, conn.extra)
    settings = _SETTINGS.get(key)
    if settings is None:
        if len(_SETTINGS) >= 64:  # the UI tests connections under random ids
            _SETTINGS.clear()
        settings = _SETTINGS[key] = ConnectionSettings.from_connection(conn)
    mask_secret(settings.api_key)  # a new task process's masker must know the key too
    return settings


@dataclass(frozen=True)
class Route:
    """The CA bundle to trust, the client certificate to show, and the proxy to use for one URL."""

    ca_bundle: str
    client_cert: str | None = None
    client_key: str | None = None
    proxy: str | None = None

    def requests_options(self) -> dict[str, Any]:
        """``verify``/``cert``/``proxies`` for a requests call (whose ``trust_env`` is off)."""
        cert = (self.client_cert, self.client_key) if self.client_key else self.client_cert
        return {"verify": self.ca_bundle, "cert": cert, "proxies": {"http": self.proxy, "https": self.proxy}}

    def ssl_context(self) -> ssl.SSLContext:
        """The TLS context for aiohttp (cached: loading a CA bundle is slow)."""
        try:
            return _ssl_context(self.ca_bundle, self.client_cert, self.client_key)
        except (ssl.SSLError, OSError) as exc:
            raise ModelRouteConfigError(
                f"Cannot load the TLS files (ca_bundle {self.ca_bundle!r}, client_cert {self.client_cert!r}, "
                f"client_key {self.client_key!r}): {exc}. Fix the connection extras or the CA environment "
                "variable"
            ) from None


@functools.lru_cache(maxsize=16)
def _ssl_context(ca_bundle: str, client_cert: str | None, client_key: str | None) -> ssl.SSLContext:
    directory = os.path.isdir(ca_bundle)
    context = ssl.create_default_context(
        cafile=None if directory else ca_bundle, capath=ca_bundle if directory else None
    )
    if client_cert:
        context.load_cert_chain(client_cert, client_key)
    return context


def _origin(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port or {"https": 443}.get(parts.scheme, 80)


def route(settings: ConnectionSettings, url: str) -> Route:
    """How to reach ``url``, one answer for both HTTP clients and for API and storage URLs. CA bundle:
    the extra ``ca_bundle``, else ``REQUESTS_CA_BUNDLE``, ``CURL_CA_BUNDLE`` or ``SSL_CERT_FILE``, else
    certifi's. The client certificate goes to the API host only. Proxy: ``HTTPS_PROXY``/``HTTP_PROXY``/
    ``ALL_PROXY`` by scheme, except for hosts ``NO_PROXY`` matches, as requests reads them."""
    ca_bundle = settings.ca_bundle
    for name in () if ca_bundle else CA_BUNDLE_VARIABLES:
        ca_bundle = os.environ.get(name)
        if ca_bundle and not os.path.exists(ca_bundle):
            raise ModelRouteConfigError(
                f"The environment variable {name} names {ca_bundle!r}, which does not exist: fix or unset it"
            )
        if ca_bundle:
            break
    if not ca_bundle:
        import certifi

        ca_bundle = str(certifi.where())
    proxy = None
    if any(os.environ.get(name) for name in _PROXY_VARIABLES):  # requests' scan of the environment is slow
        from requests.utils import get_environ_proxies, select_proxy

        proxy = select_proxy(url, get_environ_proxies(url))
    to_api = url == settings.base_url or _origin(url) == _origin(settings.base_url)
    cert, key = (settings.client_cert, settings.client_key) if to_api else (None, None)
    return Route(ca_bundle, cert, key, proxy)


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
        if id(current) not in seen:
            seen.add(id(current))
            yield current
            wrapped = (current.__cause__, current.__context__, *current.args)
            wrapped += (getattr(current, "reason", None), getattr(current, "certificate_error", None))
            stack.extend(e for e in wrapped if isinstance(e, BaseException))


def _proxy_refusal(exc: BaseException) -> int | None:
    """The 4xx status with which a proxy refused a tunnel, if ``exc`` says so."""
    status = getattr(exc, "status", None)
    if type(exc).__name__ == "ClientHttpProxyError" and isinstance(status, int) and 400 <= status < 500:
        return status
    match = re.search(r"Tunnel connection failed: (4\d\d)", str(exc))
    return int(match[1]) if match else None


class Transport:
    """One connection's way to the API: URLs, headers, pacing, response parsing and the retry policy."""

    def __init__(self, settings: ConnectionSettings, log: logging.Logger | Any) -> None:
        self.settings = settings
        self.log = log
        self.rate_limit = RateLimit()
        self.budget = shared_rate_budget(settings.base_url, settings.api_key)
        self.retry = settings.retry
        self.headers = {"Authorization": f"Bearer {settings.api_key}", "Accept": "application/json"}
        self.headers["User-Agent"] = USER_AGENT

    @cached_property
    def retrying(self) -> tenacity.Retrying:
        return self.retry.retrying(self.log)  # type: ignore[return-value]

    @cached_property
    def async_retrying(self) -> tenacity.AsyncRetrying:
        return self.retry.retrying(self.log, asynchronous=True)  # type: ignore[return-value]

    @cached_property
    def api_route(self) -> Route:
        return route(self.settings, self.settings.base_url)

    def url(self, path: str) -> str:
        return f"{self.settings.base_url}{api.API_PREFIX}{path}"

    @contextlib.contextmanager
    def exchange(
        self, method: str, url: str, errors: type[BaseException]
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
            phrase = http.HTTPStatus(status).phrase if status in http.HTTPStatus._value2member_map_ else None
            err = {"message": phrase or "unexpected response"}
        code, message = str(err.get("code") or f"HTTP_{status}"), str(err.get("message") or "")
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
        """Classify a failure without an HTTP answer; the text never carries a presigned signature or
        a proxy password. Drops, resets and timeouts are retried (a stale kept-alive connection at
        once); an untrusted certificate, a failed handshake, a refusing proxy or a corrupt compressed
        body fail at once, naming the fix."""
        detail, query = str(exc), urlsplit(url).query
        if query:
            detail = detail.replace(url, api.redact_url(url)).replace(query, "<redacted>")
        detail = _USERINFO_RE.sub(r"\1<redacted>@", detail)
        if isinstance(exc, (TimeoutError, asyncio.TimeoutError)) and not detail:  # aiohttp's say nothing
            detail = "no complete answer within {:g} s (connect) + {:g} s (read)".format(
                *self.settings.timeouts
            )
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
        if any(isinstance(c, zlib.error) or type(c).__name__ in _DECODING_ERRORS for c in causes):
            error = ModelRouteConnectionError(
                f"{text}. The response's compressed body is corrupt (a proxy rewriting responses?); "
                "not retried"
            )
            error.retryable = False
            return error
        error = ModelRouteConnectionError(text)
        error.stale = any(isinstance(c, _STALE) or type(c).__name__ in _STALE_NAMES for c in causes)
        return error
