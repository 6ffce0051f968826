"""ApiCore: what the sync and async clients share (URLs, headers, error model, retry policy)."""

from __future__ import annotations

import contextlib
import http
import json
import logging
import random
import re
import ssl
import time
import zlib
from collections.abc import Iterator, Mapping
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote, urlsplit

import tenacity

from airflow_provider_modelroute import api, metrics
from airflow_provider_modelroute.exceptions import (
    ModelRouteApiError,
    ModelRouteConfigError,
    ModelRouteConnectionError,
    ModelRouteError,
    api_error,
)
from airflow_provider_modelroute.hooks.rate_budget import RateLimit, shared_rate_budget
from airflow_provider_modelroute.hooks.settings import USER_AGENT, ConnectionSettings

_EXECUTION_ID_RE = re.compile(r"exec_[A-Za-z0-9_-]{1,128}")
_FILE_ID_RE = re.compile(r"file_[A-Za-z0-9_-]{1,128}")
_USERINFO_RE = re.compile(r"(\w+://)[^/@\s'\"]+@")


def execution_path(execution_id: str, suffix: str = "") -> str:
    if not isinstance(execution_id, str) or not _EXECUTION_ID_RE.fullmatch(execution_id):
        raise ModelRouteConfigError(f"execution_id must look like 'exec_<uuid>', got {execution_id!r}")
    return f"/executions/{quote(execution_id)}{suffix}"


def file_path(file_id: str, suffix: str = "") -> str:
    if not isinstance(file_id, str) or not _FILE_ID_RE.fullmatch(file_id):
        raise ModelRouteConfigError(f"file_id must look like 'file_<uuid>', got {file_id!r}")
    return f"/files/{quote(file_id)}{suffix}"


#: SSL errors that are only a dropped connection (retried like any other drop).
_SSL_DROPS = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError)
#: The server closed a kept-alive connection as we reused it: retry at once.
_STALE = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)
_STALE_NAMES = frozenset({"ServerDisconnectedError", "RemoteDisconnected"})
#: The clients' names for a body that does not decompress (aiohttp, requests, urllib3).
_DECODING_ERRORS = frozenset({"ContentEncodingError", "ContentDecodingError", "DecodeError"})


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
    """Remove a URL's query (a presigned signature) from an error text that may quote it."""
    parts = urlsplit(url)
    if not parts.query:
        return text
    return text.replace(url, api.redact_url(url)).replace(parts.query, "<redacted>")


class ApiCore:
    """What the sync and async clients share: URLs, headers, response parsing and the retry policy."""

    def __init__(self, settings: ConnectionSettings, log: logging.Logger | Any) -> None:
        self.settings = settings
        self.log = log
        self.rate_limit = RateLimit()
        self.budget = shared_rate_budget(settings.base_url, settings.api_key)

    # -- requests ---------------------------------------------------------------------------

    def url(self, path: str) -> str:
        return f"{self.settings.base_url}{api.API_PREFIX}{path}"

    @property
    def headers(self) -> dict[str, str]:
        return {
            "Authorization": f"Bearer {self.settings.api_key}",
            "Accept": "application/json",
            "User-Agent": USER_AGENT,
        }

    # -- responses --------------------------------------------------------------------------

    def note_rate_limit(self, headers: Mapping[str, str]) -> None:
        """Remember the window the ``X-RateLimit-*`` headers describe, its reset as a unix time.

        ``Reset`` may be a unix time, a delta in seconds, or absent. Without it the window's end is
        unknown, so ``Remaining`` cannot pace anything: only ``Retry-After`` (then backoff) on a 429.
        """

        def as_int(name: str) -> int | None:
            value = headers.get(name)
            try:
                return int(float(value)) if value is not None else None
            except ValueError:
                return None

        limit, remaining = as_int("X-RateLimit-Limit"), as_int("X-RateLimit-Remaining")
        reset = api.rate_limit_reset(headers.get("X-RateLimit-Reset"), time.time())
        if limit is not None or remaining is not None:
            self.rate_limit = RateLimit(limit, remaining if reset is not None else None, reset)

    def _retry_after(self, status: int, headers: Mapping[str, str]) -> float | None:
        value = headers.get("Retry-After")
        if value:
            try:
                return max(0.0, float(value))
            except ValueError:
                try:
                    return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
                except (TypeError, ValueError):
                    pass
        if status == 429 and self.rate_limit.reset is not None:
            return max(0.0, self.rate_limit.reset - time.time())
        return None

    def parse(
        self,
        method: str,
        path: str,
        status: int,
        headers: Mapping[str, str],
        content: bytes,
    ) -> Any:
        """Return a 2xx response's JSON, else raise the API error."""
        metrics.request(method, path, status)
        if 200 <= status < 300:
            if not content:
                return {}
            try:
                return json.loads(content)
            except ValueError:
                raise ModelRouteConnectionError(
                    f"ModelRoute {method} {path} answered HTTP {status} with a body that is not JSON"
                ) from None
        raise self.error_from_response(status, headers, content)

    def error_from_response(
        self, status: int, headers: Mapping[str, str], content: bytes
    ) -> ModelRouteApiError:
        body: Any = None
        with contextlib.suppress(ValueError):
            body = json.loads(content) if content else None
        err = body.get("error") if isinstance(body, dict) else None
        if not isinstance(err, dict):
            try:
                phrase = http.HTTPStatus(status).phrase
            except ValueError:
                phrase = "unexpected response"
            err = {"code": f"HTTP_{status}", "message": phrase}
        retryable = err.get("retryable")
        return api_error(
            str(err.get("code") or f"HTTP_{status}"),
            str(err.get("message") or ""),
            http_status=status,
            retryable=retryable if isinstance(retryable, bool) else None,
            details=err.get("details") if isinstance(err.get("details"), list) else None,
            request_id=err.get("request_id") or headers.get("X-Request-Id"),
            retry_after=self._retry_after(status, headers),
        )

    def transport_error(self, exc: BaseException, method: str, url: str) -> ModelRouteError:
        """Classify a failure without an HTTP answer, for both clients; the text never carries a
        presigned URL's signature.

        Resets, timeouts and dropped or stale connections are retried (a connection the server
        closed while idle at once). What a retry cannot fix fails at once, naming the fix: an
        untrusted certificate or failed handshake, a proxy refusing us, a body that does not
        decompress.
        """
        detail = _USERINFO_RE.sub(r"\1<redacted>@", _scrub(str(exc), url))  # a proxy URL's password
        text = f"ModelRoute {method} {api.redact_url(url)} failed: {type(exc).__name__}: {detail}"
        metrics.request(method, url, None)
        causes = list(_causes(exc))
        if any(isinstance(c, ssl.SSLCertVerificationError) for c in causes):
            return ModelRouteConfigError(
                f"{text}. The server's TLS certificate is not trusted here: if a private or corporate CA "
                "issued it, set the connection extra 'ca_bundle' (or SSL_CERT_FILE / REQUESTS_CA_BUNDLE) to "
                "that CA's PEM file"
            )
        if any(isinstance(c, ssl.SSLError) and not isinstance(c, _SSL_DROPS) for c in causes):
            return ModelRouteConfigError(
                f"{text}. The TLS handshake failed: check the connection extras 'client_cert' and "
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
                f"{text}. The response's compressed body is corrupt (a proxy rewriting "
                "responses?); not retried"
            )
            error.retryable = False
        elif any(isinstance(c, _STALE) or type(c).__name__ in _STALE_NAMES for c in causes):
            error.stale = True
        return error

    # -- retry policy -----------------------------------------------------------------------

    def backoff(self, attempt: int) -> float:
        """Capped exponential backoff with full jitter for the ``attempt``-th retry (1-based)."""
        cap = min(self.settings.retry_max_wait, self.settings.retry_base_wait * 2 ** (attempt - 1))
        return random.uniform(0, cap)

    @staticmethod
    def is_retryable(exc: BaseException) -> bool:
        return isinstance(exc, (ModelRouteConnectionError, ModelRouteApiError)) and bool(
            getattr(exc, "retryable", False)
        )

    def _wait(self, state: tenacity.RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if getattr(exc, "stale", False) and state.attempt_number == 1:
            return 0.0
        hinted = getattr(exc, "retry_after", None)
        if hinted is not None:
            # Honour the server's hint, plus a little jitter so many clients do not return at once.
            return float(hinted) + random.uniform(0, min(1.0, 0.1 * float(hinted) + 0.05))
        return self.backoff(state.attempt_number)

    def _stop(self, state: tenacity.RetryCallState) -> bool:
        if state.attempt_number > self.settings.max_retries:
            return True
        upcoming = getattr(state, "upcoming_sleep", 0.0) or 0.0
        return (state.seconds_since_start or 0.0) + upcoming > self.settings.retry_deadline

    def _before_sleep(self, state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        metrics.retry()
        self.log.warning(
            "ModelRoute request failed (%s); retry %d of %d in %.1f s",
            exc,
            state.attempt_number,
            self.settings.max_retries,
            getattr(state, "upcoming_sleep", 0.0) or 0.0,
        )

    def retry_kwargs(self) -> dict[str, Any]:
        """The tenacity policy, identical for ``Retrying`` and ``AsyncRetrying``."""
        return {
            "retry": tenacity.retry_if_exception(self.is_retryable),
            "wait": self._wait,
            "stop": self._stop,
            "before_sleep": self._before_sleep,
            "reraise": True,
        }
