"""``GET /v1/files/{id}/download`` in each documented reading: the bytes, a URL document, a redirect.

The files page says the endpoint may "get a presigned download URL or download directly", so the
answer may be (1) the file's bytes, (2) the JSON document ``{url, expires_at, content_type,
size_bytes}``, or (3) a redirect to the presigned URL. :class:`ApiDownloadSource` handles all three
and remembers a presigned URL for resumes, until it expires. A presigned URL is always fetched by the
storage client, which never sends the API key.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urljoin

import requests
import tenacity

from airflow_provider_modelroute import api
from airflow_provider_modelroute.hooks.core import file_path
from airflow_provider_modelroute.hooks.storage import check_storage_url

if TYPE_CHECKING:
    from airflow_provider_modelroute.hooks.core import ApiCore
    from airflow_provider_modelroute.hooks.storage import StorageClient

#: Sends one paced request to the API (``ModelRouteHook.send``).
Send = Callable[..., requests.Response]
#: A URL document is small; a JSON answer larger than this is a file's bytes.
_MAX_DOCUMENT = 64 * 1024


class ApiDownloadSource:
    """Opens one file's bytes at an offset through ``/download``, whichever reading the server follows."""

    def __init__(self, core: ApiCore, send: Send, storage: StorageClient, file_id: str) -> None:
        self.core, self.send, self.storage = core, send, storage
        self.path = file_path(file_id, "/download")
        #: The presigned URL the API gave (document or redirect); None: ask the API (again).
        self.url: str | None = None
        #: The URL document, when the API answered with one.
        self.document: dict[str, Any] | None = None
        self._pending: requests.Response | None = None

    def open(self, offset: int) -> requests.Response:
        """A response whose body holds the file from ``offset`` (200: from the start, 206: from there)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            if offset == 0:
                return pending
            pending.close()
        if self.url is not None:
            return self.storage.get(self.url, offset)
        retrying = tenacity.Retrying(**self.core.retry_kwargs())
        return retrying(self._ask_api, offset)

    def prefetch(self) -> requests.Response:
        """Open the start of the file now (its headers tell the size and type); ``open(0)`` returns it."""
        self._pending = self.open(0)
        return self._pending

    def expired(self) -> None:
        self.url = None

    def close(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.close()

    def _ask_api(self, offset: int) -> requests.Response:
        url = self.core.url(self.path)
        headers = {"Accept": "*/*", "Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        response = self.send("GET", url, headers=headers, stream=True)
        if response.is_redirect:  # reading 3: follow it ourselves, without the API key
            response.close()
            self.url = check_storage_url(self.core, urljoin(url, response.headers["Location"]))
            return self.storage.get(self.url, offset)
        if not 200 <= response.status_code < 300:
            with response:
                content = response.raw.read(_MAX_DOCUMENT, decode_content=True)
            raise self.core.error_from_response(response.status_code, response.headers, content)
        document = _url_document(response)
        if document is None:  # reading 1: these are the bytes
            return response
        self.document, self.url = document, check_storage_url(self.core, str(document["url"]))
        return self.storage.get(self.url, offset)


def _url_document(response: requests.Response) -> dict[str, Any] | None:
    """Read the presigned-URL document if that is what ``response`` holds (reading 2), else None.

    Only a small JSON body is read; a body that turns out not to be the document is put back.
    """
    content_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
    length = response.headers.get("Content-Length", "0")
    if content_type != "application/json" or (length.isdigit() and int(length) > _MAX_DOCUMENT):
        return None
    head = response.raw.read(_MAX_DOCUMENT + 1, decode_content=True)
    try:
        document = json.loads(head) if len(head) <= _MAX_DOCUMENT else None
    except ValueError:
        document = None
    if api.is_url_document(document):
        response.close()
        return dict(document)  # type: ignore[arg-type]
    response.raw = _Prefixed(head, response.raw)  # a JSON file: iterate it from its first byte
    return None


class _Prefixed:
    """A raw stream whose first bytes were already read: serves them again, then the rest."""

    def __init__(self, head: bytes, raw: Any) -> None:
        self._head, self._raw = head, raw

    def stream(self, amt: int, decode_content: bool = True) -> Any:
        if self._head:
            yield self._head
            self._head = b""
        yield from self._raw.stream(amt, decode_content=decode_content)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)
