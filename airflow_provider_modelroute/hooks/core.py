"""ApiCore: what the sync and async clients share (URLs, headers, error model, retry policy)."""

from __future__ import annotations

import contextlib
import http
import json
import logging
import random
import re
import time
from collections.abc import Mapping
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote, urlsplit

import tenacity

from airflow_provider_modelroute import api, metrics
from airflow_provider_modelroute.exceptions import (
    ModelRouteApiError,
    ModelRouteConfigError,
    ModelRouteConnectionError,
    api_error,
)
from airflow_provider_modelroute.hooks.rate_budget import RateLimit
from airflow_provider_modelroute.hooks.settings import USER_AGENT, ConnectionSettings

_EXECUTION_ID_RE = re.compile(r"exec_[A-Za-z0-9_-]{1,128}")
_FILE_ID_RE = re.compile(r"file_[A-Za-z0-9_-]{1,128}")


def execution_path(execution_id: str, suffix: str = "") -> str:
    if not isinstance(execution_id, str) or not _EXECUTION_ID_RE.fullmatch(execution_id):
        raise ModelRouteConfigError(f"execution_id must look like 'exec_<uuid>', got {execution_id!r}")
    return f"/executions/{quote(execution_id)}{suffix}"


def file_path(file_id: str, suffix: str = "") -> str:
    if not isinstance(file_id, str) or not _FILE_ID_RE.fullmatch(file_id):
        raise ModelRouteConfigError(f"file_id must look like 'file_<uuid>', got {file_id!r}")
    return f"/files/{quote(file_id)}{suffix}"


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

    def delay_before_request(self) -> float:
        """Seconds to wait before the next request when the last response said the window is spent."""
        rl = self.rate_limit
        if rl.remaining is None or rl.remaining > 0 or rl.reset is None:
            return 0.0
        return max(0.0, min(rl.reset - time.time(), self.settings.retry_deadline))

    # -- responses --------------------------------------------------------------------------

    def _note_rate_limit(self, headers: Mapping[str, str]) -> None:
        def as_int(name: str) -> int | None:
            value = headers.get(name)
            try:
                return int(float(value)) if value is not None else None
            except ValueError:
                return None

        limit, remaining, reset = (
            as_int("X-RateLimit-Limit"),
            as_int("X-RateLimit-Remaining"),
            as_int("X-RateLimit-Reset"),
        )
        if limit is not None or remaining is not None:
            self.rate_limit = RateLimit(limit, remaining, float(reset) if reset is not None else None)

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
        tolerate: frozenset[str] = frozenset(),
    ) -> Any:
        """Return a 2xx response's JSON, None for a tolerated error code, else raise the API error."""
        metrics.request(method, path, status)
        self._note_rate_limit(headers)
        if 200 <= status < 300:
            if not content:
                return {}
            try:
                return json.loads(content)
            except ValueError:
                raise ModelRouteConnectionError(
                    f"ModelRoute {method} {path} answered HTTP {status} with a body that is not JSON"
                ) from None
        error = self.error_from_response(status, headers, content)
        if error.code in tolerate:
            return None
        raise error

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

    def transport_error(self, exc: Exception, method: str, url: str) -> ModelRouteConnectionError:
        """Wrap a client exception; the text never carries a presigned URL's signature."""
        shown = api.redact_url(url)
        metrics.request(method, url, None)
        return ModelRouteConnectionError(
            f"ModelRoute {method} {shown} failed: {type(exc).__name__}: {_scrub(str(exc), url)}"
        )

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
