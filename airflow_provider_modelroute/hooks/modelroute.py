"""ModelRouteHook (tasks, requests) and ModelRouteAsyncHook (triggers, aiohttp, imported lazily)."""

from __future__ import annotations

import asyncio
import re
import uuid
import weakref
from collections.abc import Callable, Mapping, Sequence
from functools import cached_property
from typing import IO, Any
from urllib.parse import quote, urlsplit

import requests

from airflow_provider_modelroute import api
from airflow_provider_modelroute.exceptions import (
    ModelRouteApiError,
    ModelRouteConfigError,
    ModelRouteConnectionError,
    ModelRouteError,
    ModelRouteTransferError,
)
from airflow_provider_modelroute.get_provider_info import (
    CONN_TYPE,
    connection_form_widgets,
    ui_field_behaviour,
)
from airflow_provider_modelroute.hooks.storage import (
    NO_API_KEY,
    FileDownload,
    check_storage_url,
    local_address,
)
from airflow_provider_modelroute.hooks.transport import (
    ConnectionSettings,
    Transport,
    api_path,
    read_connection,
    requests_options,
    ssl_context,
)
from airflow_provider_modelroute.version_compat import BaseHook, aget_connection, mask_secret

_ENDPOINTS = "/webhooks/endpoints"
_UPDATABLE = frozenset({"url", "description", "events", "headers", "is_active"})
#: Idle keep-alive connections outlive poll intervals, not load balancers' idle timeouts (60 s and up).
_KEEPALIVE = 50.0


def _given(**fields: Any) -> dict[str, Any]:
    """The fields that were given: optional body fields are left out, not sent as null."""
    return {name: value for name, value in fields.items() if value is not None}


class _ModelRouteBaseHook(BaseHook):
    """What both hooks share: the connection id and the form of its connection type."""

    conn_name_attr = "modelroute_conn_id"
    default_conn_name = "modelroute_default"
    conn_type = CONN_TYPE
    hook_name = "ModelRoute"

    def __init__(self, modelroute_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.modelroute_conn_id = modelroute_conn_id

    @classmethod  # Airflow 2.11 reads the form here; 3.2+ reads provider info
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        return ui_field_behaviour()

    @classmethod
    def get_connection_form_widgets(cls) -> dict[str, Any]:
        return connection_form_widgets()


class ModelRouteHook(_ModelRouteBaseHook):
    """Talk to the ModelRoute API: executions, cancellation, file downloads and uploads, webhook endpoints.

    :param modelroute_conn_id: The Airflow connection (API key in its password, base URL in its host).
    """

    @cached_property
    def transport(self) -> Transport:
        with read_connection(self.modelroute_conn_id):
            conn = self.get_connection(self.modelroute_conn_id)
        return Transport(ConnectionSettings.from_connection(conn), self.log)

    @cached_property
    def session(self) -> requests.Session:
        session = requests.Session()
        session.trust_env = False  # CA bundle, proxies, netrc: the transport's, as for triggers
        session.headers.update(self.transport.headers)
        return session

    def send(self, method: str, url: str, **kwargs: Any) -> requests.Response:
        """One request to the API, paced by the key's rate budget; transport errors in the error model."""
        transport = self.transport
        transport.budget.acquire_blocking(self.log)
        with transport.exchange(method, url, requests.RequestException) as answered:
            response = self.session.request(method, url, **transport.api_options, **kwargs)
            answered(response.headers)
            return response

    def _call(self, method: str, path: str, body: Any = None, key: str | None = None) -> tuple[Any, Any]:
        """One API call with the retry policy (the same ``Idempotency-Key`` on every retry): JSON, headers."""

        def once() -> tuple[Any, Mapping[str, str]]:
            headers = {"Idempotency-Key": key} if key else {}
            r = self.send(method, self.transport.url(path), json=body, headers=headers)
            return self.transport.parse(method, path, r.status_code, r.headers, r.content), r.headers

        return self.transport.retrying(once)

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        return self._call(method, path, body)[0]

    def create_execution(self, model: str, input: dict[str, Any], **options: Any) -> dict[str, Any]:
        """:meth:`submit_execution`'s answer: usually ``PENDING``, maybe already terminal or a replay."""
        return self.submit_execution(model, input, **options)[0]

    def submit_execution(
        self,
        model: str,
        input: dict[str, Any],
        *,
        idempotency_key: str | None = None,
        metadata: dict[str, Any] | None = None,
        webhook_url: str | None = None,
    ) -> tuple[dict[str, Any], bool]:
        """Start an execution (run once: every HTTP retry re-sends the same ``Idempotency-Key``); also say
        whether the server marked the answer a replay, which may be stale: read the execution then."""
        if not isinstance(model, str) or not model.strip():
            raise ModelRouteConfigError("model must be a non-empty model slug, e.g. model='flux-1.1-pro'")
        if not isinstance(input, dict):
            raise ModelRouteConfigError(f"input must be a dict (the model input), got {type(input).__name__}")
        body = _given(model=model, input=input, metadata=metadata, webhook_url=webhook_url)
        key = idempotency_key or f"airflow-{uuid.uuid4()}"
        execution, headers = self._call("POST", "/executions", body, key)
        return execution, str(headers.get(api.REPLAY_HEADER, "")).strip().lower() == "true"

    def get_execution(self, execution_id: str) -> dict[str, Any]:
        return self._request("GET", api_path("executions", execution_id))

    def get_execution_result(self, execution_id: str) -> dict[str, Any]:
        return self._request("GET", api_path("executions", execution_id, "/result"))

    def cancel_execution(self, execution_id: str) -> dict[str, Any] | None:
        """Cancel an execution; None if it had already finished."""
        try:
            return self._request("POST", api_path("executions", execution_id, "/cancel"))
        except ModelRouteApiError as exc:  # the docs give no code for "already finished": read it
            if exc.permanent and api.is_terminal(self.get_execution(execution_id).get("status")):
                return None
            raise

    def execution_url(self, execution_id: str) -> str:
        """The execution's page in the ModelRoute dashboard."""
        return f"{self.transport.settings.dashboard_url}/executions/{quote(execution_id)}"

    def download_file(self, file_id: str, *, chunk_size: int = 1024 * 1024) -> FileDownload:
        """Open a file for streaming (any reading of ``/download``): iterate the result for its bytes."""
        return FileDownload(self.transport, self.session, self.send, file_id, chunk_size)

    def upload_file(
        self,
        open_source: Callable[[], IO[bytes]],
        *,
        filename: str,
        content_type: str,
        size_bytes: int,
        purpose: str = "INPUT",
        region: str | None = None,
        ttl_days: int | None = None,
    ) -> dict[str, Any]:
        """Upload an input file (the request carries the fields of both documented versions); returns
        ``{file_id, content_type, size_bytes}``. ``open_source`` opens the bytes afresh for each attempt."""
        if size_bytes > api.MAX_FILE_SIZE:
            raise ModelRouteConfigError(
                f"{filename} is {size_bytes} bytes; ModelRoute accepts files up to {api.MAX_FILE_SIZE} bytes"
            )
        fields = {"filename": filename, "content_type": content_type, "size_bytes": size_bytes}
        body = _given(**fields, purpose=purpose, region=region, ttl_days=ttl_days)
        slot = self._request("POST", "/files/upload", body)
        file_id, url = str(slot["file_id"]), check_storage_url(self.transport, str(slot["upload_url"]))
        headers = {**NO_API_KEY, "Content-Length": str(size_bytes), "Content-Type": content_type}
        options = requests_options(self.transport.settings, url)

        def put() -> None:  # retried per the policy, the bytes opened afresh each time
            with open_source() as source:
                try:
                    response = self.session.put(url, data=source, headers=headers, **options)
                except requests.RequestException as exc:
                    raise self.transport.transport_error(exc, "PUT", url) from None
            if response.status_code >= 300:
                error = ModelRouteConnectionError if response.status_code >= 500 else ModelRouteTransferError
                raise error(f"Storage answered HTTP {response.status_code} to the upload of {filename}")

        self.transport.retrying(put)
        try:
            confirmed = self._request("POST", "/files/confirm", {"file_id": file_id})
        except ModelRouteApiError as exc:
            if exc.http_status not in api.CONFIRM_ABSENT_STATUSES:
                raise
            confirmed = None  # a server without the confirm step
        result = {"file_id": file_id, "content_type": content_type, "size_bytes": size_bytes}
        result.update({k: v for k, v in (confirmed or {}).items() if k in result})
        return result

    def create_webhook_endpoint(
        self,
        url: str,
        *,
        description: str | None = None,
        events: Sequence[str] = (),
        headers: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """Register ``url`` (https) for ``events`` (empty: all); the answer holds the one-time ``secret``."""
        loopback = local_address(urlsplit(str(url)).hostname or "") == "loopback"
        if not (str(url).startswith("https://") or loopback):
            raise ModelRouteConfigError(f"A webhook endpoint url must be https://..., got {url!r}")
        headers = dict(headers) if headers else None
        body = _given(url=url, events=list(events), description=description, headers=headers)
        endpoint: dict[str, Any] = self._call("POST", _ENDPOINTS, body, f"airflow-webhook-{uuid.uuid4()}")[0]
        if endpoint.get("secret"):
            mask_secret(str(endpoint["secret"]))
        return endpoint

    def list_webhook_endpoints(self) -> list[dict[str, Any]]:
        """Every endpoint, with ``is_active``, ``failure_count`` and ``last_success``."""
        document = self._request("GET", _ENDPOINTS)
        endpoints = document
        if isinstance(document, dict):  # the docs show neither a bare list nor a wrapped one: read both
            wrapped = ("data", "endpoints", "items", "webhooks")
            endpoints = next((document[key] for key in wrapped if key in document), None)
        if not isinstance(endpoints, list):
            raise ModelRouteError(f"Unexpected answer listing webhook endpoints: {str(document)[:200]}")
        return [item for item in endpoints if isinstance(item, dict)]

    def update_webhook_endpoint(self, endpoint_id: str, **changes: Any) -> dict[str, Any]:
        """Change ``url``, ``description``, ``events``, ``headers`` or ``is_active`` (re-activate it)."""
        unknown = sorted(set(changes) - _UPDATABLE)
        if unknown:
            raise ModelRouteConfigError(f"Cannot update {unknown}; updatable: {sorted(_UPDATABLE)}")
        return dict(self._request("PATCH", api_path("webhooks/endpoints", endpoint_id), changes))

    def delete_webhook_endpoint(self, endpoint_id: str) -> None:
        self._request("DELETE", api_path("webhooks/endpoints", endpoint_id))

    def test_webhook_endpoint(self, endpoint_id: str) -> dict[str, Any]:
        """Ask ModelRoute to send the endpoint a test delivery; returns its answer."""
        return dict(self._request("POST", api_path("webhooks/endpoints", endpoint_id, "/test"), {}) or {})

    def test_connection(self) -> tuple[bool, str]:
        """Check the key and base URL: reading a made-up execution, any 4xx but an auth refusal is success."""
        try:
            self.get_execution("exec_00000000-0000-0000-0000-000000000000")
        except ModelRouteApiError as exc:
            if exc.code == "UNAUTHORIZED" or exc.http_status in (401, 403) or not exc.permanent:
                return False, self._anonymous(exc)
        except ModelRouteError as exc:
            return False, self._anonymous(exc)
        return True, f"Connected to ModelRoute at {self.transport.settings.base_url}"

    def _anonymous(self, exc: Exception) -> str:
        """The UI's Test button tests a temporary connection under a random id: never show it."""
        named = re.compile(rf"(?:Airflow )?([Cc])onnection {re.escape(repr(self.modelroute_conn_id))}")
        return named.sub(lambda m: "This connection" if m[1] == "C" else "this connection", str(exc))


#: Per event loop, the shared aiohttp sessions by origin and TLS setup, each as [session, users].
_SESSIONS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[Any, ...], list[Any]]] = (
    weakref.WeakKeyDictionary()
)


class ModelRouteAsyncHook(_ModelRouteBaseHook):
    """The calls of triggers on aiohttp, ``async with ModelRouteAsyncHook(conn_id) as hook``; the hooks of
    one event loop and API origin share one aiohttp session."""

    transport: Transport
    _shared: list[Any] | None = None

    async def __aenter__(self) -> ModelRouteAsyncHook:
        import aiohttp

        with read_connection(self.modelroute_conn_id):
            conn = await aget_connection(self.modelroute_conn_id)
        self.transport = Transport(ConnectionSettings.from_connection(conn), self.log)
        base_url, options = self.transport.settings.base_url, self.transport.api_options
        self._key = (base_url, options["verify"], options["cert"])
        connect, read = options["timeout"]
        timeout = aiohttp.ClientTimeout(total=connect + read, sock_connect=connect, sock_read=read)
        self._options = {"proxy": options["proxies"]["https"], "timeout": timeout, "allow_redirects": False}
        sessions = _SESSIONS.setdefault(asyncio.get_running_loop(), {})
        if self._key not in sessions:  # trust_env off: proxies and CAs are the ones requests uses
            tls = ssl_context(options["verify"], options["cert"])
            connector = aiohttp.TCPConnector(limit=100, keepalive_timeout=_KEEPALIVE, ssl=tls)
            sessions[self._key] = [aiohttp.ClientSession(connector=connector, trust_env=False), 0]
        self._shared = sessions[self._key]
        self._shared[1] += 1
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        shared, self._shared = self._shared, None
        if shared is not None:
            shared[1] -= 1
            if shared[1] == 0:  # the last user closes the session
                _SESSIONS.get(asyncio.get_running_loop(), {}).pop(self._key, None)
                await shared[0].close()

    @property
    def sharing(self) -> int:
        """How many hooks of this event loop share this one's session (this one included)."""
        return self._shared[1] if self._shared is not None else 1

    async def _request(self, method: str, path: str) -> Any:
        assert self._shared is not None, "use the hook as `async with ModelRouteAsyncHook(...) as hook`"
        transport, session, options = self.transport, self._shared[0], self._options
        url = transport.url(path)

        async def once() -> Any:
            await transport.budget.acquire(self.log)
            with transport.exchange(method, url, Exception) as answered:
                async with session.request(method, url, headers=transport.headers, **options) as response:
                    status, headers, content = response.status, response.headers, await response.read()
                answered(headers)
            return transport.parse(method, path, status, headers, content)

        return await transport.async_retrying(once)

    async def get_execution(self, execution_id: str) -> dict[str, Any]:
        return await self._request("GET", api_path("executions", execution_id))

    async def cancel_execution(self, execution_id: str) -> dict[str, Any] | None:
        """Cancel an execution; None if it had already finished."""
        try:
            return await self._request("POST", api_path("executions", execution_id, "/cancel"))
        except ModelRouteApiError as exc:  # the docs give no code for "already finished": read it
            if exc.permanent and api.is_terminal((await self.get_execution(execution_id)).get("status")):
                return None
            raise
