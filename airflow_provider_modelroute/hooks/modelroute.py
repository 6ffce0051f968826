"""ModelRouteHook: the ModelRoute API for tasks (sync) and triggers (async), one error model.

The sync calls use one ``requests.Session`` per hook; triggers get a :class:`ModelRouteAsyncClient`
from :meth:`ModelRouteHook.async_client`. Both go through one :class:`ApiCore` (URLs, headers,
error parsing, retry policy), so the two paths cannot drift apart. The readings of ``/download``
live in ``hooks/download.py``, presigned-URL transfers in ``hooks/storage.py``, pacing in
``hooks/rate_budget.py``, TLS and proxies in ``hooks/network.py``.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from functools import cached_property
from typing import IO, Any
from urllib.parse import quote

import requests
import tenacity

from airflow_provider_modelroute import api
from airflow_provider_modelroute._compat import (
    AirflowNotFoundException,
    BaseHook,
    aget_connection,
)
from airflow_provider_modelroute.exceptions import (
    ModelRouteApiError,
    ModelRouteAuthError,
    ModelRouteConfigError,
    ModelRouteError,
)
from airflow_provider_modelroute.hooks.async_client import ModelRouteAsyncClient
from airflow_provider_modelroute.hooks.core import ApiCore, execution_path
from airflow_provider_modelroute.hooks.download import ApiDownloadSource
from airflow_provider_modelroute.hooks.network import route
from airflow_provider_modelroute.hooks.settings import ConnectionSettings
from airflow_provider_modelroute.hooks.storage import FileDownload, StorageClient, check_storage_url
from airflow_provider_modelroute.hooks.webhook_endpoints import WebhookEndpointsMixin
from airflow_provider_modelroute.provider_info import CONN_TYPE, connection_form_widgets, ui_field_behaviour

_PROBE_EXECUTION_ID = "exec_00000000-0000-0000-0000-000000000000"


class ModelRouteHook(WebhookEndpointsMixin, BaseHook):
    """
    Talk to the ModelRoute API: executions, results, cancellation, file downloads and uploads.

    The connection holds the API key in its password and, optionally, the base URL in its host
    (default ``https://api.modelroute.ai``). Extras tune timeouts (``timeout``, ``connect_timeout``),
    retries (``max_retries``, ``retry_base_wait``, ``retry_max_wait``, ``retry_deadline``),
    ``dashboard_url``, TLS (``ca_bundle``, ``client_cert``, ``client_key``; see ``hooks/network.py``
    for these and the proxy variables), and ``allow_insecure_storage_urls`` (local testing only).
    Webhook endpoints: ``hooks/webhook_endpoints.py``.

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
        session.trust_env = False  # CA bundle and proxies come from ``network.route``, as for triggers
        session.headers.update(self.core.headers)
        return session

    @cached_property
    def _route_options(self) -> dict[str, Any]:
        return route(self.core.settings, self.core.settings.base_url).requests_options()

    @cached_property
    def storage(self) -> StorageClient:
        """Presigned-URL transfers, without the API key."""
        return StorageClient(self.core)

    def get_conn(self) -> requests.Session:
        return self.session

    def send(self, method: str, url: str, **kwargs: Any) -> requests.Response:
        """One request to the API, paced by the key's rate budget; transport errors in the error model."""
        budget = self.core.budget
        budget.acquire_blocking(self.log)
        seen = None
        try:
            try:
                response = self.session.request(
                    method,
                    url,
                    timeout=(self.core.settings.connect_timeout, self.core.settings.read_timeout),
                    allow_redirects=False,
                    **self._route_options,
                    **kwargs,
                )
            except requests.RequestException as exc:
                raise self.core.transport_error(exc, method, url) from None
            self.core.note_rate_limit(response.headers)
            seen = self.core.rate_limit
            return response
        finally:
            budget.observe(seen)

    def _request_once(
        self,
        method: str,
        path: str,
        json_body: Any,
        headers: Mapping[str, str] | None,
    ) -> tuple[Any, Mapping[str, str]]:
        response = self.send(method, self.core.url(path), json=json_body, headers=dict(headers or {}))
        body = self.core.parse(method, path, response.status_code, response.headers, response.content)
        return body, response.headers

    def _exchange(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[Any, Mapping[str, str]]:
        """One API call with the retry policy: the answer's JSON and headers."""
        retrying = tenacity.Retrying(**self.core.retry_kwargs())
        return retrying(self._request_once, method, path, json_body, headers)

    def _request(self, method: str, path: str, *, json_body: Any = None) -> Any:
        return self._exchange(method, path, json_body=json_body)[0]

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
        """Start an execution. Every HTTP retry re-sends the same ``Idempotency-Key``, so it runs once.

        Returns the POST's answer: usually ``PENDING`` (202), but it may already be terminal (a
        ``COMPLETED`` one carries its ``result``), and for a repeated key it may replay an old answer.
        """
        return self.submit_execution(
            model, input, idempotency_key=idempotency_key, metadata=metadata, webhook_url=webhook_url
        )[0]

    def submit_execution(
        self,
        model: str,
        input: dict[str, Any],
        *,
        idempotency_key: str | None = None,
        metadata: dict[str, Any] | None = None,
        webhook_url: str | None = None,
    ) -> tuple[dict[str, Any], bool]:
        """:meth:`create_execution`, also saying whether the server marked the answer a replay.

        A replayed answer may be stale (the original ``PENDING``): read the execution before deciding.
        """
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
        execution, headers = self._exchange(
            "POST", "/executions", json_body=body, headers={"Idempotency-Key": key}
        )
        replayed = str(headers.get(api.REPLAY_HEADER, "")).strip().lower() == "true"
        return execution, replayed

    def get_execution(self, execution_id: str) -> dict[str, Any]:
        return self._request("GET", execution_path(execution_id))

    def get_execution_result(self, execution_id: str) -> dict[str, Any]:
        return self._request("GET", execution_path(execution_id, "/result"))

    def cancel_execution(self, execution_id: str) -> dict[str, Any] | None:
        """Cancel an execution; returns None if it had already finished.

        The docs give no code for cancelling a finished execution: a refusal is checked by reading it.
        """
        try:
            return self._request("POST", execution_path(execution_id, "/cancel"))
        except ModelRouteApiError as exc:
            if not exc.permanent or not api.is_terminal(self.get_execution(execution_id).get("status")):
                raise
            return None

    def execution_url(self, execution_id: str) -> str:
        """The execution's page in the ModelRoute dashboard."""
        return f"{self.core.settings.dashboard_url}/executions/{quote(execution_id)}"

    # -- files --------------------------------------------------------------------------------

    def download_file(self, file_id: str, *, chunk_size: int = 1024 * 1024) -> FileDownload:
        """Open a file for streaming: iterate the result for its bytes, never the whole file in memory.

        Asks ``GET /v1/files/{id}/download`` at once, so the size and type are known before the first
        byte is read; any of its readings works (the bytes, a URL document, a redirect).
        """
        source = ApiDownloadSource(self.core, self.send, self.storage, file_id)
        first = source.prefetch()
        document = source.document or {}
        size = document.get("size_bytes") if source.document else _announced_size(first)
        content_type = document.get("content_type") or first.headers.get("Content-Type")
        return FileDownload(
            file_id=file_id,
            size_bytes=int(size) if size is not None else None,
            content_type=str(content_type or "application/octet-stream").split(";")[0].strip(),
            _source=source,
            _storage=self.storage,
            chunk_size=chunk_size,
        )

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
        """Upload an input file through the documented flow; returns ``{file_id, content_type, size_bytes}``.

        The request carries the fields of both documented versions (llms.txt's ``filename``,
        ``content_type``, ``size_bytes``; the uploading page's ``purpose``, ``region``, ``ttl_days``).
        ``open_source`` opens the bytes afresh for each attempt, so a dropped upload can be retried.
        """
        if size_bytes > api.MAX_FILE_SIZE:
            raise ModelRouteConfigError(
                f"{filename} is {size_bytes} bytes; ModelRoute accepts files up to {api.MAX_FILE_SIZE} bytes"
            )
        body: dict[str, Any] = {
            "filename": filename,
            "content_type": content_type,
            "size_bytes": size_bytes,
            "purpose": purpose,
        }
        if region is not None:
            body["region"] = region
        if ttl_days is not None:
            body["ttl_days"] = ttl_days
        slot = self._request("POST", "/files/upload", json_body=body)
        file_id, url = str(slot["file_id"]), check_storage_url(self.core, str(slot["upload_url"]))
        self.storage.put(
            url, open_source, filename=filename, size_bytes=size_bytes, content_type=content_type
        )
        try:
            confirmed = self._request("POST", "/files/confirm", json_body={"file_id": file_id})
        except ModelRouteApiError as exc:
            if exc.http_status not in api.CONFIRM_ABSENT_STATUSES:
                raise
            confirmed = None  # a server without the confirm step: nothing to confirm
        result = {"file_id": file_id, "content_type": content_type, "size_bytes": size_bytes}
        result.update({k: v for k, v in (confirmed or {}).items() if k in result})
        return result

    # -- connection test ----------------------------------------------------------------------

    def test_connection(self) -> tuple[bool, str]:
        """Check the key and base URL with a harmless read: a lookup of a made-up execution id.

        Any 4xx other than an auth refusal means the key was accepted and the id is unknown.
        """
        try:
            self._request("GET", execution_path(_PROBE_EXECUTION_ID))
        except ModelRouteAuthError as exc:
            return False, str(exc)
        except ModelRouteApiError as exc:
            if not exc.permanent:
                return False, str(exc)
        except ModelRouteError as exc:
            # The UI's Test button tests a temporary connection under a random id: never show it.
            return False, str(exc).replace(f"Connection {self.modelroute_conn_id!r}", "This connection")
        return True, f"Connected to ModelRoute at {self.core.settings.base_url}"

    # -- async (triggers) ---------------------------------------------------------------------

    @asynccontextmanager
    async def async_client(self) -> AsyncIterator[ModelRouteAsyncClient]:
        """An async client for triggers: looks the connection up without blocking the event loop."""
        try:
            conn = await aget_connection(self.modelroute_conn_id)
        except AirflowNotFoundException:
            raise ConnectionSettings.missing(self.modelroute_conn_id) from None
        client = ModelRouteAsyncClient(ApiCore(ConnectionSettings.from_connection(conn), self.log))
        try:
            yield client
        finally:
            await client.aclose()


def _announced_size(response: requests.Response) -> int | None:
    """The file's size from a response to a GET from byte 0, when it says (and is not compressed)."""
    if response.headers.get("Content-Encoding", "identity").strip().lower() != "identity":
        return None
    length = response.headers.get("Content-Length")
    return int(length) if length is not None and length.isdigit() else None
