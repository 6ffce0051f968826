"""ModelRouteHook: the ModelRoute API for tasks (sync) and triggers (async), one error model.

The sync calls use one ``requests.Session`` per hook; triggers get a :class:`ModelRouteAsyncClient`
from :meth:`ModelRouteHook.async_client`. Both go through one :class:`ApiCore` (URLs, headers,
error parsing, retry policy), so the two paths cannot drift apart. Presigned-URL transfers live in
``hooks/storage.py``, pacing in ``hooks/rate_budget.py``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from functools import cached_property
from typing import IO, Any
from urllib.parse import quote

import requests
import tenacity

from airflow_provider_modelroute import api, metrics
from airflow_provider_modelroute._compat import (
    AirflowNotFoundException,
    BaseHook,
    aget_connection,
)
from airflow_provider_modelroute.exceptions import (
    ModelRouteConfigError,
    ModelRouteError,
)
from airflow_provider_modelroute.hooks.async_client import ModelRouteAsyncClient
from airflow_provider_modelroute.hooks.core import ApiCore, execution_path, file_path
from airflow_provider_modelroute.hooks.rate_budget import shared_rate_budget
from airflow_provider_modelroute.hooks.settings import ConnectionSettings
from airflow_provider_modelroute.hooks.storage import FileDownload, StorageClient, check_storage_url
from airflow_provider_modelroute.provider_info import CONN_TYPE, connection_form_widgets, ui_field_behaviour

_PROBE_EXECUTION_ID = "exec_00000000-0000-0000-0000-000000000000"


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
    def storage(self) -> StorageClient:
        """Presigned-URL transfers, without the API key."""
        return StorageClient(self.core)

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
            metrics.rate_budget_wait(delay)
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
        check_storage_url(self.core, str(document.get("url", "")))
        return document

    def download_file(self, file_id: str, *, chunk_size: int = 1024 * 1024) -> FileDownload:
        """Open a file for streaming: iterate the result for its bytes, never the whole file in memory."""
        document = self.get_file_url(file_id)
        size = document.get("size_bytes")
        return FileDownload(
            file_id=file_id,
            size_bytes=int(size) if size is not None else None,
            content_type=str(document.get("content_type") or "application/octet-stream"),
            _storage=self.storage,
            _url=str(document["url"]),
            _refresh_url=lambda: str(self.get_file_url(file_id)["url"]),
            chunk_size=chunk_size,
        )

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
        file_id, url = str(slot["file_id"]), check_storage_url(self.core, str(slot["upload_url"]))
        self.storage.put(url, open_source, filename=filename, size_bytes=size_bytes)
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
        settings = ConnectionSettings.from_connection(conn)
        budget = shared_rate_budget(f"{self.modelroute_conn_id}|{settings.base_url}")
        client = ModelRouteAsyncClient(ApiCore(settings, self.log), budget)
        try:
            yield client
        finally:
            await client.aclose()
