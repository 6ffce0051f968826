"""ModelRouteHook: auth, HTTP, retries and the error model for the ModelRoute API.

The sync paths use one ``requests.Session`` per hook; the async read paths used by triggers use
:class:`ModelRouteAsyncClient`, whose keep-alive connections are shared by all its instances in one
event loop (see ``_ConnectionPool``). Both go through one :class:`ApiCore` that
builds URLs and headers, parses responses into the provider's error model and decides what to
retry and how long to wait, so the two clients cannot drift apart.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import http
import ipaddress
import json
import logging
import random
import re
import select
import socket
import ssl
import sys
import time
import urllib.request
import uuid
import weakref
import zlib
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from functools import cached_property
from typing import IO, TYPE_CHECKING, Any, cast
from urllib.parse import quote, urljoin, urlsplit

import h11
import httpx
import requests
import tenacity

from airflow_provider_modelroute import __version__, api
from airflow_provider_modelroute._compat import (
    AirflowNotFoundException,
    BaseHook,
    aget_connection,
    mask_secret,
)
from airflow_provider_modelroute.exceptions import (
    ModelRouteApiError,
    ModelRouteConfigError,
    ModelRouteConnectionError,
    ModelRouteError,
    ModelRouteTransferError,
    api_error,
)
from airflow_provider_modelroute.provider_info import CONN_TYPE, connection_form_widgets, ui_field_behaviour

if TYPE_CHECKING:
    from airflow_provider_modelroute._compat import Connection

_EXECUTION_ID_RE = re.compile(r"exec_[A-Za-z0-9_-]{1,128}")
_FILE_ID_RE = re.compile(r"file_[A-Za-z0-9_-]{1,128}")
_PROBE_EXECUTION_ID = "exec_00000000-0000-0000-0000-000000000000"
_USER_AGENT = f"airflow-provider-modelroute/{__version__}"
_NETWORK_READ = 1024 * 1024


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

    @staticmethod
    def missing(conn_id: str) -> ModelRouteConfigError:
        """The error for a connection id Airflow does not know (a retry would not create it)."""
        return ModelRouteConfigError(
            f"Airflow connection {conn_id!r} does not exist: create it (type {CONN_TYPE!r}, the API key "
            "in its password field) or set modelroute_conn_id to an existing one"
        )

    @classmethod
    def from_connection(cls, conn: Connection) -> ConnectionSettings:
        """Validate a connection: a malformed API key fails here, before any request is made."""
        api_key = (conn.password or "").strip()
        problem = api.api_key_problem(api_key)
        if problem:
            raise ModelRouteConfigError(
                f"Connection {conn.conn_id!r} has an unusable ModelRoute API key: {problem}. "
                "Copy the whole key from app.modelroute.ai > Settings > API Keys into the password field."
            )
        mask_secret(api_key)
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
        )


@dataclass
class RateLimit:
    """The last ``X-RateLimit-*`` headers seen (reset in unix seconds)."""

    limit: int | None = None
    remaining: int | None = None
    reset: float | None = None


class RateBudget:
    """Paces the async requests of all clients of one connection in one event loop (one triggerer).

    It learns the window from the ``X-RateLimit-*`` headers: it hands out the requests that remain,
    then holds everyone until the window resets, so thousands of triggers do not storm the API
    into 429s. Until the first response only one request is in flight; a server that sends no
    rate-limit headers is not paced at all. Responses only ever lower the allowance (many are in
    flight at once, so a response's ``Remaining`` is already stale); it is restored when the window
    resets.
    """

    def __init__(self) -> None:
        self.limit: int | None = None
        self.remaining: int | None = None
        self.reset: float | None = None
        self.unpaced = False
        self._probing = False
        self._recent: collections.deque[float] = collections.deque()

    def _open_window(self, now: float) -> None:
        # ``Reset`` is in whole seconds, rounded up: the server's window may have turned up to a
        # second earlier, so what we sent in that second may already count against the new one.
        carried = sum(1 for sent in self._recent if sent > (self.reset or now) - 1)
        self.remaining, self.reset = max(0, (self.limit or 1) - carried), None

    async def acquire(self) -> None:
        while not self.unpaced:
            now = time.time()
            if self.remaining is None:
                if not self._probing:
                    self._probing = True
                    return
                await asyncio.sleep(0.05)
                continue
            if self.reset is not None and now >= self.reset:
                self._open_window(now)
            if self.remaining > 0:
                self.remaining -= 1
                self._recent.append(now)
                while self._recent[0] < now - 2:
                    self._recent.popleft()
                return
            # Spread the wake-ups a little so a new window does not open with a thundering herd.
            await asyncio.sleep(max(self.reset - now, 0.0) if self.reset else 0.05)
            await asyncio.sleep(random.uniform(0, 0.05))

    def observe(self, seen: RateLimit | None) -> None:
        """Learn from a response's rate-limit headers (None: the request got no response)."""
        self._probing = False
        if seen is None:
            return
        if seen.remaining is None:
            self.unpaced = self.remaining is None
            return
        # Without a Limit header, the most we have seen remaining is the best guess.
        self.limit = seen.limit if seen.limit is not None else max(self.limit or 0, seen.remaining)
        if self.remaining is None:  # the first answer
            self.remaining, self.reset = seen.remaining, seen.reset
            return
        if seen.reset is None or seen.reset <= time.time() or (self.reset and seen.reset < self.reset):
            return  # a late answer from a window that has already closed
        self.remaining = min(self.remaining, seen.remaining)
        self.reset = max(self.reset or 0.0, seen.reset)


_BUDGETS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, RateBudget]] = (
    weakref.WeakKeyDictionary()
)


def shared_rate_budget(key: str) -> RateBudget:
    """The one budget of a connection in the running event loop."""
    per_loop = _BUDGETS.setdefault(asyncio.get_running_loop(), {})
    return per_loop.setdefault(key, RateBudget())


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
            "User-Agent": _USER_AGENT,
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

    # -- presigned storage URLs -------------------------------------------------------------

    def check_storage_url(self, url: str) -> str:
        """Refuse presigned URLs that are not https on a public host (unless local testing allows it)."""
        parts = urlsplit(url)
        shown = api.redact_url(url)
        if self.settings.allow_insecure_storage_urls:
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ModelRouteTransferError(f"Refusing storage URL {shown}: not an http(s) URL")
            return url
        if parts.scheme != "https" or not parts.hostname:
            raise ModelRouteTransferError(
                f"Refusing storage URL {shown}: only https URLs are fetched. For the local test server set "
                "the connection extra allow_insecure_storage_urls=true."
            )
        try:
            addresses = {info[4][0] for info in socket.getaddrinfo(parts.hostname, parts.port or 443)}
        except OSError as exc:
            raise ModelRouteConnectionError(f"Cannot resolve storage host of {shown}: {exc}") from None
        for address in addresses:
            ip = ipaddress.ip_address(str(address).split("%")[0])
            if not ip.is_global:
                raise ModelRouteTransferError(
                    f"Refusing storage URL {shown}: its host resolves to a non-public address. For the local "
                    "test server set the connection extra allow_insecure_storage_urls=true."
                )
        return url


_SIGNED_QUERY_RE = re.compile(r"\?[^\s\"']*Signature=[^\s\"']*")


class _PresignedQueryFilter(logging.Filter):
    """Redacts presigned query strings from urllib3's debug lines, which quote the request URL."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any("Signature=" in str(arg) for arg in record.args):
            record.args = tuple(
                _SIGNED_QUERY_RE.sub("?<redacted>", arg) if isinstance(arg, str) else arg
                for arg in record.args
            )
        return True


def _redact_urllib3_debug_lines() -> None:
    logger = logging.getLogger("urllib3.connectionpool")
    if not any(isinstance(f, _PresignedQueryFilter) for f in logger.filters):
        logger.addFilter(_PresignedQueryFilter())


def _strip_authorization(request: requests.PreparedRequest) -> requests.PreparedRequest:
    """requests ``auth`` hook for the storage session: no credential ever reaches the storage host.

    Setting any ``auth`` also stops requests from adding ``~/.netrc`` credentials.
    """
    request.headers.pop("Authorization", None)
    return request


@dataclass
class FileDownload:
    """A file being downloaded from its presigned URL; iterate it for the bytes (resumes on drops)."""

    file_id: str
    size_bytes: int | None
    content_type: str
    _hook: ModelRouteHook = field(repr=False)
    _url: str = field(repr=False)
    chunk_size: int = 1024 * 1024

    def __iter__(self) -> Iterator[bytes]:
        return self._hook._iter_storage(self)


class ModelRouteHook(BaseHook):
    """
    Talk to the ModelRoute API: executions, results, cancellation, file downloads and uploads.

    The connection holds the API key in its password and, optionally, the base URL in its host
    (default ``https://api.modelroute.ai``). Extras tune timeouts (``timeout``, ``connect_timeout``),
    retries (``max_retries``, ``retry_base_wait``, ``retry_max_wait``, ``retry_deadline``),
    ``dashboard_url``, and ``allow_insecure_storage_urls`` (local testing only).

    :param modelroute_conn_id: The Airflow connection to use.
    """

    conn_name_attr = "modelroute_conn_id"
    default_conn_name = "modelroute_default"
    conn_type = CONN_TYPE
    hook_name = "ModelRoute"

    def __init__(self, modelroute_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.modelroute_conn_id = modelroute_conn_id

    # -- connection form (Airflow 2.11; 3.2+ reads the same definitions from provider info) --

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        return ui_field_behaviour()

    @classmethod
    def get_connection_form_widgets(cls) -> dict[str, Any]:
        return connection_form_widgets()

    # -- plumbing ---------------------------------------------------------------------------

    @cached_property
    def core(self) -> ApiCore:
        try:
            conn = self.get_connection(self.modelroute_conn_id)
        except AirflowNotFoundException:
            raise ConnectionSettings.missing(self.modelroute_conn_id) from None
        return ApiCore(ConnectionSettings.from_connection(conn), self.log)

    @cached_property
    def session(self) -> requests.Session:
        session = requests.Session()
        session.headers.update(self.core.headers)
        return session

    @cached_property
    def storage_session(self) -> requests.Session:
        """A session without the API key, for presigned storage URLs."""
        _redact_urllib3_debug_lines()
        session = requests.Session()
        session.auth = _strip_authorization
        session.headers["User-Agent"] = _USER_AGENT
        return session

    def get_conn(self) -> requests.Session:
        return self.session

    def _request_once(
        self,
        method: str,
        path: str,
        json_body: Any,
        headers: Mapping[str, str] | None,
        tolerate: frozenset[str],
    ) -> Any:
        delay = self.core.delay_before_request()
        if delay:  # even a zero sleep yields the CPU: ~5 % of a loopback request
            time.sleep(delay)
        url = self.core.url(path)
        try:
            response = self.session.request(
                method,
                url,
                json=json_body,
                headers=dict(headers or {}),
                timeout=(self.core.settings.connect_timeout, self.core.settings.read_timeout),
                allow_redirects=False,
            )
        except requests.RequestException as exc:
            raise self.core.transport_error(exc, method, url) from None
        return self.core.parse(
            method, path, response.status_code, response.headers, response.content, tolerate
        )

    def _request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        headers: Mapping[str, str] | None = None,
        tolerate: frozenset[str] = frozenset(),
    ) -> Any:
        retrying = tenacity.Retrying(**self.core.retry_kwargs())
        return retrying(self._request_once, method, path, json_body, headers, tolerate)

    # -- executions -------------------------------------------------------------------------

    def create_execution(
        self,
        model: str,
        input: dict[str, Any],
        *,
        idempotency_key: str | None = None,
        metadata: dict[str, Any] | None = None,
        webhook_url: str | None = None,
    ) -> dict[str, Any]:
        """Start an execution. Every HTTP retry re-sends the same ``Idempotency-Key``, so it runs once."""
        if not isinstance(model, str) or not model:
            raise ModelRouteConfigError("model must be a non-empty string, e.g. 'flux-1.1-pro'")
        if not isinstance(input, dict):
            raise ModelRouteConfigError(f"input must be a JSON object (dict), got {type(input).__name__}")
        body: dict[str, Any] = {"model": model, "input": input}
        if metadata is not None:
            body["metadata"] = metadata
        if webhook_url is not None:
            body["webhook_url"] = webhook_url
        key = idempotency_key or f"airflow-{uuid.uuid4()}"
        return self._request("POST", "/executions", json_body=body, headers={"Idempotency-Key": key})

    def get_execution(self, execution_id: str) -> dict[str, Any]:
        return self._request("GET", execution_path(execution_id))

    def get_execution_result(self, execution_id: str) -> dict[str, Any]:
        return self._request("GET", execution_path(execution_id, "/result"))

    def cancel_execution(self, execution_id: str) -> dict[str, Any] | None:
        """Cancel an execution; returns None if it had already finished."""
        return self._request(
            "POST", execution_path(execution_id, "/cancel"), tolerate=frozenset({"EXECUTION_NOT_CANCELLABLE"})
        )

    def execution_url(self, execution_id: str) -> str:
        """The execution's page in the ModelRoute dashboard."""
        return f"{self.core.settings.dashboard_url}/executions/{quote(execution_id)}"

    # -- files --------------------------------------------------------------------------------

    def get_file_url(self, file_id: str) -> dict[str, Any]:
        """The presigned download document (``url``, ``expires_at``, ``content_type``, ``size_bytes``).

        The URL is a credential: never log it or put it in XCom.
        """
        document = self._request("GET", file_path(file_id, "/url"))
        self.core.check_storage_url(str(document.get("url", "")))
        return document

    def download_file(self, file_id: str, *, chunk_size: int = 1024 * 1024) -> FileDownload:
        """Open a file for streaming: iterate the result for its bytes, never the whole file in memory."""
        document = self.get_file_url(file_id)
        size = document.get("size_bytes")
        return FileDownload(
            file_id=file_id,
            size_bytes=int(size) if size is not None else None,
            content_type=str(document.get("content_type") or "application/octet-stream"),
            _hook=self,
            _url=str(document["url"]),
            chunk_size=chunk_size,
        )

    def _storage_get(self, url: str, offset: int) -> requests.Response:
        """GET a presigned URL from ``offset``, following redirects only to URLs that pass the checks."""
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        for _ in range(5):
            timeout = (self.core.settings.connect_timeout, self.core.settings.read_timeout)
            response = self.storage_session.get(
                url, headers=headers, stream=True, timeout=timeout, allow_redirects=False
            )
            if not response.is_redirect:
                return response
            response.close()
            url = self.core.check_storage_url(urljoin(url, response.headers["Location"]))
        raise ModelRouteTransferError("Storage redirected more than 5 times")

    def _iter_storage(self, download: FileDownload) -> Iterator[bytes]:
        """Yield a file's bytes; resume with Range after a drop, and get a fresh URL once it expires."""
        offset, failures, url = 0, 0, download._url
        size = download.size_bytes
        while True:
            try:
                with self._storage_get(url, offset) as response:
                    if response.status_code == 403:
                        raise _UrlExpired()
                    if response.status_code not in (200, 206):
                        raise ModelRouteTransferError(
                            f"Storage answered HTTP {response.status_code} for file {download.file_id}"
                        )
                    skip = _bytes_to_skip(response, offset)
                    # Read at most 1 MiB at a time: a drop loses only the read in progress.
                    for chunk in response.iter_content(min(download.chunk_size, _NETWORK_READ)):
                        if skip >= len(chunk):
                            skip -= len(chunk)
                            continue
                        chunk, skip = chunk[skip:], 0
                        offset += len(chunk)
                        failures = 0
                        yield chunk
                if size is None or offset == size:
                    return
                if offset > size:
                    raise ModelRouteTransferError(
                        f"File {download.file_id} is larger than its announced {size} bytes"
                    )
                reason: Exception = ModelRouteConnectionError(f"body ended at byte {offset} of {size}")
            except _UrlExpired as exc:
                reason = exc
                url = str(self.get_file_url(download.file_id)["url"])
            except requests.RequestException as exc:
                reason = self.core.transport_error(exc, "GET", url)
            failures += 1
            if failures > self.core.settings.max_retries:
                raise ModelRouteTransferError(
                    f"Download of file {download.file_id} stopped at byte {offset} of {size} after "
                    f"{failures} failures in a row: {reason}"
                )
            self.log.warning(
                "Download of file %s interrupted at byte %d (%s); resuming", download.file_id, offset, reason
            )
            time.sleep(self.core.backoff(failures))

    def upload_file(
        self, open_source: Callable[[], IO[bytes]], *, filename: str, content_type: str, size_bytes: int
    ) -> dict[str, Any]:
        """Upload an input file through the documented flow; returns ``{file_id, content_type, size_bytes}``.

        ``open_source`` opens the bytes afresh for each attempt, so a dropped upload can be retried.
        """
        if size_bytes > api.MAX_FILE_SIZE:
            raise ModelRouteConfigError(
                f"{filename} is {size_bytes} bytes; ModelRoute accepts files up to {api.MAX_FILE_SIZE} bytes"
            )
        slot = self._request(
            "POST",
            "/files/upload",
            json_body={"filename": filename, "content_type": content_type, "size_bytes": size_bytes},
        )
        file_id, url = str(slot["file_id"]), self.core.check_storage_url(str(slot["upload_url"]))

        def put_once() -> None:
            with open_source() as source:
                try:
                    response = self.storage_session.put(
                        url,
                        data=source,
                        headers={"Content-Length": str(size_bytes)},
                        timeout=(self.core.settings.connect_timeout, self.core.settings.read_timeout),
                    )
                except requests.RequestException as exc:
                    raise self.core.transport_error(exc, "PUT", url) from None
            if response.status_code >= 500:
                raise ModelRouteConnectionError(f"Upload of {filename} got HTTP {response.status_code}")
            if response.status_code >= 300:
                raise ModelRouteTransferError(
                    f"Upload of {filename} was refused by storage (HTTP {response.status_code})"
                )

        tenacity.Retrying(**self.core.retry_kwargs())(put_once)
        confirmed = self._request(
            "POST",
            "/files/confirm",
            json_body={"file_id": file_id},
            tolerate=frozenset({"HTTP_404", "HTTP_405"}),  # older API versions have no confirm step
        )
        result = {"file_id": file_id, "content_type": content_type, "size_bytes": size_bytes}
        result.update({k: v for k, v in (confirmed or {}).items() if k in result})
        return result

    # -- connection test ----------------------------------------------------------------------

    def test_connection(self) -> tuple[bool, str]:
        """Check the key and base URL with a harmless read (a lookup of a made-up execution id)."""
        try:
            self._request(
                "GET", execution_path(_PROBE_EXECUTION_ID), tolerate=frozenset({"EXECUTION_NOT_FOUND"})
            )
        except ModelRouteError as exc:
            return False, str(exc)
        return True, f"Connected to ModelRoute at {self.core.settings.base_url}"

    # -- async (triggers) ---------------------------------------------------------------------

    @asynccontextmanager
    async def async_client(self) -> AsyncIterator[ModelRouteAsyncClient]:
        """An async client for triggers: looks the connection up without blocking the event loop."""
        try:
            conn = await aget_connection(self.modelroute_conn_id)
        except AirflowNotFoundException:
            raise ConnectionSettings.missing(self.modelroute_conn_id) from None
        settings = ConnectionSettings.from_connection(conn)
        budget = shared_rate_budget(f"{self.modelroute_conn_id}|{settings.base_url}")
        client = ModelRouteAsyncClient(ApiCore(settings, self.log), budget)
        try:
            yield client
        finally:
            await client.aclose()


def _bytes_to_skip(response: requests.Response, offset: int) -> int:
    """How many leading bytes of a (resumed) response were already received."""
    if response.status_code == 200:
        return offset  # the server ignored Range: drop what we already have
    start = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    if start is None or int(start[1]) != offset:
        raise ModelRouteTransferError(f"Storage answered a resume from byte {offset} with the wrong range")
    return 0


class _UrlExpired(Exception):
    def __str__(self) -> str:
        return "presigned URL expired (HTTP 403)"


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """One TLS context for all async clients: building one loads the CA bundle (~25 ms, blocking)."""
    import certifi

    return ssl.create_default_context(cafile=certifi.where())


#: Idle keep-alive connections are reused for this long: longer than the usual poll intervals (so a
#: trigger polling every 5-30 s does not reconnect each time), shorter than the idle timeouts of
#: common load balancers (60 s and up). A connection the server closed sooner is noticed before reuse.
_KEEPALIVE_EXPIRY = 50.0
#: Connections to one API origin per event loop; more requests at once wait for a free connection.
_MAX_CONNECTIONS = 100
_TRANSPORT_ERRORS = (httpx.HTTPError, h11.ProtocolError, OSError, asyncio.TimeoutError, zlib.error)


async def _within(awaitable: Any, seconds: float) -> Any:
    """Await with a timeout, without the extra task ``asyncio.wait_for`` costs before Python 3.12."""
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(seconds):
            return await awaitable
    return await asyncio.wait_for(awaitable, seconds)


class _Headers(dict[str, str]):
    """Response headers under lower-case names, readable in any case (like httpx's)."""

    def get(self, key: str, default: Any = None) -> Any:
        return super().get(key.lower(), default)

    def __getitem__(self, key: str) -> str:
        return super().__getitem__(key.lower())

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and super().__contains__(key.lower())


class _Connection:
    """One keep-alive HTTP/1.1 connection: asyncio streams, with h11 (httpx's own HTTP/1.1 engine)."""

    __slots__ = ("h11", "idle_since", "reader", "transport", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.transport = cast("asyncio.Transport", writer.transport)
        self.h11 = h11.Connection(h11.CLIENT)
        self.idle_since = 0.0

    async def exchange(self, request: h11.Request) -> tuple[int, _Headers, bytes]:
        protocol = self.h11
        self.writer.write(protocol.send(request) + protocol.send(h11.EndOfMessage()))
        response, body = None, []
        while True:
            event = protocol.next_event()
            if event is h11.NEED_DATA:
                protocol.receive_data(await self.reader.read(65536))  # b"": the server closed
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                body.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                break
            # an InformationalResponse (1xx) is followed by the real one
        assert response is not None  # h11 yields the Response before its EndOfMessage
        headers = _Headers()
        for raw_name, raw_value in response.headers:
            name, value = raw_name.decode("latin-1"), raw_value.decode("latin-1")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        content = b"".join(body)
        if headers.get("content-encoding", "").strip().lower() in ("gzip", "x-gzip", "deflate"):
            content = zlib.decompress(content, 47)  # not asked for, but a server may send it anyway
        return response.status_code, headers, content

    def park(self) -> None:
        """Back to idle: stop reading, so that anything the server sends meanwhile shows on the socket."""
        self.h11.start_next_cycle()
        self.idle_since = time.monotonic()
        self.transport.pause_reading()

    def reusable(self, now: float) -> bool:
        """Neither expired nor closed; nothing arrived while idle (a close or a stray 408)."""
        if now - self.idle_since >= _KEEPALIVE_EXPIRY or self.writer.is_closing():
            return False
        poll = select.poll()
        poll.register(self.writer.get_extra_info("socket").fileno(), select.POLLIN)
        if poll.poll(0):
            return False
        self.transport.resume_reading()
        return True

    def close(self) -> None:
        self.writer.close()


class _ConnectionPool:
    """Keep-alive connections to one API origin, shared by every async client in one event loop.

    A triggerer waiting on thousands of executions then holds as many sockets as it has requests in
    flight (at most ``_MAX_CONNECTIONS``), not one per trigger; a connection serves one request at a
    time and is reused by whichever trigger polls next.
    """

    def __init__(self, host: str, port: int, tls: ssl.SSLContext | None) -> None:
        self.host, self.port, self.tls = host, port, tls
        self.idle: collections.deque[_Connection] = collections.deque()
        self.slots = asyncio.Semaphore(_MAX_CONNECTIONS)
        self.clients = 0

    async def request(
        self, request: h11.Request, connect_timeout: float, read_timeout: float
    ) -> tuple[int, _Headers, bytes]:
        async with self.slots:
            connection = self._idle_connection() or await self._connect(connect_timeout)
            try:
                result = await _within(connection.exchange(request), read_timeout)
            except asyncio.TimeoutError:
                connection.close()
                raise asyncio.TimeoutError(f"no complete response within {read_timeout:g} s") from None
            except BaseException:
                connection.close()
                raise
            if self.clients > 0 and connection.h11.our_state is connection.h11.their_state is h11.DONE:
                connection.park()
                self.idle.append(connection)
            else:
                connection.close()
            return result

    def _idle_connection(self) -> _Connection | None:
        now = time.monotonic()
        while self.idle:
            connection = self.idle.pop()  # the most recently used: the least likely to have expired
            if connection.reusable(now):
                return connection
            connection.close()
        return None

    async def _connect(self, timeout: float) -> _Connection:
        try:
            reader, writer = await _within(
                asyncio.open_connection(self.host, self.port, ssl=self.tls, happy_eyeballs_delay=0.25),
                timeout,
            )
        except asyncio.TimeoutError:
            raise asyncio.TimeoutError(f"could not connect within {timeout:g} s") from None
        return _Connection(reader, writer)

    async def close_idle(self) -> None:
        connections, self.idle = list(self.idle), collections.deque()
        for connection in connections:
            connection.close()
        with contextlib.suppress(Exception):
            waits = [connection.writer.wait_closed() for connection in connections]
            await _within(asyncio.gather(*waits, return_exceptions=True), 1.0)


_POOLS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[str, str, int], _ConnectionPool]] = (
    weakref.WeakKeyDictionary()
)


def _environment_proxy(url: str) -> bool:
    """Whether the environment (or OS) names a proxy that httpx (``trust_env``) could use for ``url``."""
    proxies = urllib.request.getproxies()
    return bool(proxies.get(urlsplit(url).scheme) or proxies.get("all"))


class ModelRouteAsyncClient:
    """The async read paths (status, result, cancel) used by triggers.

    Requests go over the event loop's shared keep-alive connections to the API (``_ConnectionPool``):
    in the triggerer benchmark (BENCHMARKS.md) a poll costs a half to a fifth of the CPU it did with
    one ``httpx.AsyncClient`` per trigger, and thousands of triggers share ~100 sockets. When the
    environment names an HTTP proxy, requests go through ``httpx`` instead, which honours
    ``HTTP(S)_PROXY``/``ALL_PROXY``/``NO_PROXY``.
    """

    def __init__(self, core: ApiCore, budget: RateBudget | None = None) -> None:
        self.core = core
        self.budget = budget or RateBudget()
        settings = core.settings
        self._httpx: httpx.AsyncClient | None = None
        self._pool: _ConnectionPool | None = None
        self._last_request: dict[tuple[str, str], h11.Request] = {}
        parts = urlsplit(settings.base_url)
        self._origin = (
            parts.scheme,
            parts.hostname or "",
            parts.port or (443 if parts.scheme == "https" else 80),
        )
        self._headers = [("Host", parts.netloc.rpartition("@")[2]), *core.headers.items()]
        if _environment_proxy(settings.base_url):
            self._httpx = httpx.AsyncClient(
                headers=core.headers,
                verify=_tls_context(),
                timeout=httpx.Timeout(settings.read_timeout, connect=settings.connect_timeout),
                limits=httpx.Limits(
                    max_connections=_MAX_CONNECTIONS,
                    max_keepalive_connections=20,
                    keepalive_expiry=_KEEPALIVE_EXPIRY,
                ),
                follow_redirects=False,
            )

    async def _send(self, method: str, url: str) -> tuple[int, Mapping[str, str], bytes]:
        if self._httpx is not None:
            response = await self._httpx.request(method, url)
            return response.status_code, response.headers, response.content
        if self._pool is None:
            scheme, host, port = self._origin
            per_loop = _POOLS.setdefault(asyncio.get_running_loop(), {})
            if self._origin not in per_loop:
                per_loop[self._origin] = _ConnectionPool(
                    host, port, _tls_context() if scheme == "https" else None
                )
            self._pool = per_loop[self._origin]
            self._pool.clients += 1
        request = self._last_request.get((method, url))
        if request is None:  # a trigger polls one URL: build (and validate) its request once
            parts = urlsplit(url)
            headers = [*self._headers, ("Content-Length", "0")] if method == "POST" else self._headers
            request = h11.Request(
                method=method,
                target=f"{parts.path}?{parts.query}" if parts.query else parts.path,
                headers=headers,
            )
            self._last_request = {(method, url): request}
        settings = self.core.settings
        return await self._pool.request(request, settings.connect_timeout, settings.read_timeout)

    async def _request_once(self, method: str, path: str, tolerate: frozenset[str]) -> Any:
        await self.budget.acquire()
        url = self.core.url(path)
        try:
            status, headers, content = await self._send(method, url)
        except _TRANSPORT_ERRORS as exc:
            self.budget.observe(None)
            raise self.core.transport_error(exc, method, url) from None
        try:
            return self.core.parse(method, path, status, headers, content, tolerate)
        finally:
            self.budget.observe(self.core.rate_limit)

    async def _request(self, method: str, path: str, tolerate: frozenset[str] = frozenset()) -> Any:
        retrying = tenacity.AsyncRetrying(**self.core.retry_kwargs())
        return await retrying(self._request_once, method, path, tolerate)

    async def get_execution(self, execution_id: str) -> dict[str, Any]:
        return await self._request("GET", execution_path(execution_id))

    async def get_execution_result(self, execution_id: str) -> dict[str, Any]:
        return await self._request("GET", execution_path(execution_id, "/result"))

    async def cancel_execution(self, execution_id: str) -> dict[str, Any] | None:
        """Cancel an execution; returns None if it had already finished."""
        return await self._request(
            "POST", execution_path(execution_id, "/cancel"), frozenset({"EXECUTION_NOT_CANCELLABLE"})
        )

    async def aclose(self) -> None:
        if self._httpx is not None:
            await self._httpx.aclose()
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.clients -= 1
            if pool.clients == 0:
                await pool.close_idle()
