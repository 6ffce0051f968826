"""What every ModelRoute request shares (sync, async and storage alike): the connection's settings,
TLS and proxies, the error model."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import re
import ssl
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
    from airflow_provider_modelroute.version_compat import Connection

CA_BUNDLE_VARIABLES = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE")
_PROXY_VARIABLES = tuple(n for b in ("https_proxy", "http_proxy", "all_proxy") for n in (b, b.upper()))
_log = logging.getLogger(__name__)
#: The API's collections: the prefix of their ids, and what to call an id in an error.
_IDS = {
    "executions": ("exec_", "execution_id"),
    "files": ("file_", "file_id"),
    "webhooks/endpoints": ("wh_", "endpoint_id"),
}


def api_path(collection: str, ident: str, suffix: str = "") -> str:
    """``/{collection}/{ident}{suffix}``, refusing an id that does not look like the API's (never a path)."""
    prefix, name = _IDS[collection]
    if not isinstance(ident, str) or not re.fullmatch(rf"{prefix}[A-Za-z0-9_-]{{1,128}}", ident):
        raise ModelRouteConfigError(f"{name} must look like '{prefix}...', got {ident!r}")
    return f"/{collection}/{quote(ident)}{suffix}"


@contextlib.contextmanager
def read_connection(conn_id: str) -> Iterator[None]:
    """Around a connection lookup: "not found" says how to create it; other failures name the connection."""
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
        if warning := api.api_key_warning(api_key):
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
        try:  # Airflow's ``extra_dejson`` turns invalid JSON into {} silently: say so instead
            values = dict(json.loads(conn.extra or "{}"))
        except (TypeError, ValueError) as exc:
            raise ModelRouteConfigError(
                f"Connection {conn.conn_id!r} has extras that are not JSON: {exc}"
            ) from None

        def number(name: str, default: float, minimum: float) -> float:
            value = default if extra_value(values, name) is None else extra_value(values, name)
            with contextlib.suppress(TypeError, ValueError):
                if float(value) >= minimum:
                    return float(value)
            raise ModelRouteConfigError(
                f"Connection {conn.conn_id!r}: extra {name!r} must be a number of at least {minimum}, got "
                f"{value!r}; fix it in the connection's extras"
            )

        def path(name: str) -> str | None:  # it must exist where the task or trigger runs
            value = extra_value(values, name)
            found = None if value is None else os.path.expanduser(str(value).strip())
            if found is not None and not os.path.exists(found):
                raise ModelRouteConfigError(
                    f"Connection {conn.conn_id!r}: extra {name!r} names {found!r}, which does not exist "
                    "here: install the file on every worker and triggerer, or fix the path"
                )
            return found

        insecure = extra_value(values, "allow_insecure_storage_urls") or False
        settings = cls(
            base_url=base_url,
            api_key=api_key,
            conn_id=conn.conn_id,
            timeouts=(number("connect_timeout", 10.0, 0.001), number("timeout", 30.0, 0.001)),
            retry=RetryPolicy(
                int(number("max_retries", RetryPolicy.max_retries, 0)),
                number("retry_base_wait", RetryPolicy.base_wait, 0),
                number("retry_max_wait", RetryPolicy.max_wait, 0),
                number("retry_deadline", RetryPolicy.deadline, 0),
            ),
            allow_insecure_storage_urls=str(insecure).strip().lower() in {"1", "true", "yes", "on"},
            dashboard_url=str(extra_value(values, "dashboard_url") or cls.dashboard_url).rstrip("/"),
            ca_bundle=path("ca_bundle"),
            client_cert=path("client_cert"),
            client_key=path("client_key"),
        )
        if settings.client_key and not settings.client_cert:
            raise ModelRouteConfigError(
                f"Connection {conn.conn_id!r}: extra 'client_key' is set without 'client_cert': set both "
                "(or client_cert alone for a PEM file that holds the certificate and its key)"
            )
        return settings


def requests_options(settings: ConnectionSettings, url: str) -> dict[str, Any]:
    """How requests (``trust_env`` off) reaches ``url``, and aiohttp the API: no redirects, the client
    certificate to the API host only, the CA bundle and proxy as docs/connections.md lists them."""
    verify = settings.ca_bundle or next(filter(None, map(os.environ.get, CA_BUNDLE_VARIABLES)), None)
    if verify is None:
        import certifi

        verify = certifi.where()
    elif not settings.ca_bundle and not os.path.exists(verify):
        name = next(n for n in CA_BUNDLE_VARIABLES if os.environ.get(n) == verify)
        raise ModelRouteConfigError(
            f"The environment variable {name} names {verify!r}, which does not exist: fix or unset it"
        )
    proxy = None
    if any(os.environ.get(name) for name in _PROXY_VARIABLES):  # requests' scan of the environment is slow
        from requests.utils import get_environ_proxies, select_proxy

        proxy = select_proxy(url, get_environ_proxies(url))
    cert: Any = settings.client_cert if urlsplit(url)[:2] == urlsplit(settings.base_url)[:2] else None
    cert = (cert, settings.client_key) if cert and settings.client_key else cert
    options = {"timeout": settings.timeouts, "allow_redirects": False, "cert": cert, "verify": verify}
    return {**options, "proxies": {"http": proxy, "https": proxy}}


@functools.lru_cache(maxsize=16)  # loading a CA bundle is slow
def ssl_context(verify: str, cert: str | tuple[str, str] | None) -> ssl.SSLContext:
    """aiohttp's TLS context from requests' ``verify`` and ``cert`` options: both clients trust the same."""
    try:
        directory = os.path.isdir(verify)
        context = ssl.create_default_context(
            cafile=None if directory else verify, capath=verify if directory else None
        )
        if cert:
            context.load_cert_chain(*((cert,) if isinstance(cert, str) else cert))
        return context
    except (ssl.SSLError, OSError) as exc:
        raise ModelRouteConfigError(
            f"Cannot load the TLS files (CA bundle {verify!r}, client certificate {cert!r}): {exc}. Fix the "
            "connection extras 'ca_bundle', 'client_cert' and 'client_key', or the CA environment variable"
        ) from None


_SSL_DROPS = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError)  # retried like any drop
#: The server closed a kept-alive connection as we reused it: retry at once.
_STALE = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)
_STALE_NAMES = frozenset({"ServerDisconnectedError", "RemoteDisconnected"})
_USERINFO_RE = re.compile(r"(\w+://)[^/@\s'\"]+@")


def _causes(exc: BaseException) -> list[BaseException]:
    """An exception and everything it wraps (causes, contexts, and the wrapped errors of clients)."""
    found = [exc]
    for current in found:  # grows as it goes
        wrapped = (current.__cause__, current.__context__, *current.args)
        wrapped += (getattr(current, "reason", None), getattr(current, "certificate_error", None))
        found += [e for e in wrapped if isinstance(e, BaseException) and all(e is not f for f in found)]
    return found


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
        self.settings, self.log = settings, log
        self.rate_limit = RateLimit()
        self.budget = shared_rate_budget(settings.base_url, settings.api_key)
        self.retrying = settings.retry.retrying(log)
        self.async_retrying = settings.retry.retrying(log, asynchronous=True)
        self.headers = {
            "Authorization": f"Bearer {settings.api_key}",
            "Accept": "application/json",
            "User-Agent": f"airflow-provider-modelroute/{__version__}",
        }

    @cached_property
    def api_options(self) -> dict[str, Any]:
        """The options of requests calls to the API (aiohttp's TLS and proxy are derived from them)."""
        return requests_options(self.settings, self.settings.base_url)

    def url(self, path: str) -> str:
        return f"{self.settings.base_url}{api.API_PREFIX}{path}"

    @contextlib.contextmanager
    def exchange(
        self, method: str, url: str, errors: type[BaseException]
    ) -> Iterator[Callable[[Mapping[str, str]], None]]:
        """Around one granted request: ``errors`` become the error model; pass the answer's headers on."""
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
        """The API error an answer that is not 2xx means."""
        body: Any = None
        with contextlib.suppress(ValueError):
            body = json.loads(content) if content else None
        err = body.get("error") if isinstance(body, dict) else None
        if not isinstance(err, dict):
            err = {"message": "an answer without ModelRoute's error body (a proxy or load balancer?)"}
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
        """Classify a failure without an HTTP answer (never quoting a signature or proxy password): drops
        and timeouts are retried; an untrusted certificate, a failed handshake or a refusing proxy fail
        at once, naming the fix."""
        detail, query = str(exc), urlsplit(url).query
        if query:
            detail = detail.replace(url, api.redact_url(url)).replace(query, "<redacted>")
        detail = _USERINFO_RE.sub(r"\1<redacted>@", detail)
        if isinstance(exc, (TimeoutError, asyncio.TimeoutError)) and not detail:  # aiohttp's say nothing
            connect, read = self.settings.timeouts
            detail = f"no complete answer within {connect:g} s (connect) + {read:g} s (read)"
        text = f"ModelRoute {method} {api.redact_url(url)} failed: {type(exc).__name__}: {detail}"
        metrics.request(method, url, None)
        causes = _causes(exc)
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
        error.stale = any(isinstance(c, _STALE) or type(c).__name__ in _STALE_NAMES for c in causes)
        return error
