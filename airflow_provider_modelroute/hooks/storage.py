"""Files on presigned URLs (fetched without the API key) and the checks of the hosts they name.
:class:`FileDownload` reads all three answers of ``/download``, resumes drops and renews expired URLs."""

from __future__ import annotations

import ipaddress
import itertools
import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests

from airflow_provider_modelroute import api, metrics
from airflow_provider_modelroute.exceptions import ModelRouteConnectionError, ModelRouteTransferError
from airflow_provider_modelroute.hooks.transport import Transport, api_path, requests_options

#: The most read from the network at once: a dropped connection loses only the read in progress.
NETWORK_READ = 1024 * 1024
#: A URL document is small; a JSON answer larger than this is a file's bytes.
_MAX_DOCUMENT = 64 * 1024
#: The headers of a storage request: the API key is taken out of the session's headers.
NO_API_KEY: dict[str, str | None] = {"Authorization": None}
_SIGNED_QUERY_RE = re.compile(r"\?[^\s\"']*Signature=[^\s\"']*")


def _redact_signatures(record: logging.LogRecord) -> bool:
    """urllib3's debug lines quote request URLs: keep presigned query strings out of them."""
    if isinstance(record.args, tuple):
        redact = _SIGNED_QUERY_RE.sub
        record.args = tuple(redact("?<redacted>", a) if isinstance(a, str) else a for a in record.args)
    return True


logging.getLogger("urllib3.connectionpool").addFilter(_redact_signatures)


def local_address(host: str) -> str | None:
    """``"loopback"``, ``"private"`` (a non-global literal address) or None: names are never resolved."""
    if host == "localhost" or host.endswith(".localhost"):
        return "loopback"
    try:
        address = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return None
    return "loopback" if address.is_loopback else None if address.is_global else "private"


def check_storage_url(transport: Transport, url: str) -> str:
    """Refuse presigned URLs that are not https, or name a loopback/private address literally (the
    local test server's http://127.0.0.1 URLs pass only with ``allow_insecure_storage_urls``)."""
    parts, shown = urlsplit(url), api.redact_url(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ModelRouteTransferError(f"Refusing storage URL {shown}: not an http(s) URL")
    if transport.settings.allow_insecure_storage_urls:
        return url
    fix = f"For the local test server set connection {transport.settings.conn_id!r}'s extra"
    fix += " allow_insecure_storage_urls=true."
    if parts.scheme != "https":
        raise ModelRouteTransferError(f"Refusing storage URL {shown}: only https URLs are fetched. {fix}")
    if local_address(parts.hostname):
        raise ModelRouteTransferError(
            f"Refusing storage URL {shown}: its host is a loopback or private address. {fix}"
        )
    return url


class FileDownload:
    """A file being downloaded; iterate it for the bytes (resumes on drops, refreshes an expired URL).
    Opening asks ``/download`` at once, so the size and type are known before the first byte is read."""

    def __init__(
        self,
        transport: Transport,
        session: requests.Session,
        send: Callable[..., Any],
        file_id: str,
        chunk_size: int,
    ) -> None:
        self.file_id, self.chunk_size = file_id, chunk_size
        self._transport, self._session, self._send = transport, session, send
        self._url: str | None = None  # the presigned URL the API gave; None: ask the API (again)
        document: dict[str, Any] = {}
        self._pending: requests.Response | None = transport.retrying(self._ask_api, 0, document)
        size = document.get("size_bytes") if document else _announced_size(self._pending)
        self.size_bytes = int(size) if size is not None else None
        content_type = document.get("content_type") or self._pending.headers.get("Content-Type")
        self.content_type = str(content_type or "application/octet-stream").split(";")[0].strip()

    def close(self) -> None:
        """Release the response opened ahead of iteration (when the bytes are not needed after all)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.close()

    def _open(self, offset: int) -> requests.Response:
        """A response whose body holds the file from ``offset`` (200: from the start, 206: from there)."""
        if self._pending is not None and offset == 0:
            pending, self._pending = self._pending, None
            return pending
        self.close()
        if self._url is not None:
            return self._get(self._url, offset)
        return self._transport.retrying(self._ask_api, offset, {})

    def _get(self, url: str, offset: int) -> requests.Response:
        """GET a presigned URL (once checked) from ``offset``, without the API key or redirects."""
        self._url = check_storage_url(self._transport, url)
        headers = {**NO_API_KEY, "Range": f"bytes={offset}-" if offset else None}  # None: not sent
        options = requests_options(self._transport.settings, url)
        return self._session.get(url, headers=headers, stream=True, **options)

    def _ask_api(self, offset: int, document: dict[str, Any]) -> requests.Response:
        """Ask ``/download``; the bytes (reading 1), else follow the URL document (2) or redirect (3)."""
        url = self._transport.url(api_path("files", self.file_id, "/download"))
        ranged = f"bytes={offset}-" if offset else None
        headers = {"Accept": "*/*", "Accept-Encoding": "identity", "Range": ranged}
        response = self._send("GET", url, headers=headers, stream=True)
        if response.is_redirect:
            response.close()
            return self._get(urljoin(url, response.headers["Location"]), offset)
        if not 200 <= response.status_code < 300:
            with response:
                content = response.raw.read(_MAX_DOCUMENT, decode_content=True)
            raise self._transport.error_from_response(response.status_code, response.headers, content)
        content_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
        length = response.headers.get("Content-Length", "0")
        if content_type != "application/json" or (length.isdigit() and int(length) > _MAX_DOCUMENT):
            return response
        head = response.raw.read(_MAX_DOCUMENT + 1, decode_content=True)  # a small JSON body: a document?
        try:
            found = json.loads(head) if len(head) <= _MAX_DOCUMENT else None
        except ValueError:
            found = None
        if not api.is_url_document(found):  # a JSON file: iterate it from its first byte
            rest = response.iter_content
            response.iter_content = lambda size=1, *_: itertools.chain((head,), rest(size))
            return response
        response.close()
        document.update(found)  # type: ignore[arg-type]
        return self._get(str(document["url"]), offset)

    def __iter__(self) -> Iterator[bytes]:
        """Yield the file's bytes; resume with Range after a drop, and get a fresh URL once it expires."""
        transport, retry = self._transport, self._transport.settings.retry
        offset, failures, url, size = 0, 0, "", self.size_bytes
        while True:
            try:
                with self._open(offset) as response:
                    url, status = response.url, response.status_code
                    if status == 403:  # expired: the next open asks the API for a fresh URL
                        self._url = None
                        raise ModelRouteConnectionError("presigned URL expired (HTTP 403)")
                    if status not in (200, 206):
                        error = ModelRouteConnectionError if status >= 500 else ModelRouteTransferError
                        raise error(f"Storage answered HTTP {status} for file {self.file_id}")
                    if size is None and offset == 0:
                        size = _announced_size(response)
                    skip = offset if status == 200 else 0  # the server ignored Range: drop what we have
                    start = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
                    if status == 206 and (start is None or int(start[1]) != offset):
                        raise ModelRouteTransferError(
                            f"Storage answered a resume from byte {offset} with the wrong range"
                        )
                    for chunk in response.iter_content(min(self.chunk_size, NETWORK_READ)):
                        if skip >= len(chunk):
                            skip -= len(chunk)
                            continue
                        chunk, skip = chunk[skip:], 0
                        offset += len(chunk)
                        failures = 0
                        yield chunk
                if size is None or offset >= size:  # the announced size is exact
                    return
                reason: Exception = ModelRouteConnectionError(f"body ended at byte {offset} of {size}")
            except ModelRouteConnectionError as exc:
                reason = exc
            except requests.RequestException as exc:
                reason = transport.transport_error(exc, "GET", getattr(exc.request, "url", None) or url)
                if not getattr(reason, "retryable", False):
                    raise reason from None
            failures += 1
            metrics.retry()
            if failures > retry.max_retries:
                raise ModelRouteTransferError(
                    f"Download of file {self.file_id} stopped at byte {offset} of {size} after "
                    f"{failures} failures in a row: {reason}"
                )
            transport.log.warning(
                "Download of file %s interrupted at byte %d (%s); resuming", self.file_id, offset, reason
            )
            time.sleep(retry.backoff(failures))


def _announced_size(response: requests.Response) -> int | None:
    """The file's size from a 200 answer to a GET from byte 0 (not an expired URL's 403), if it says."""
    if response.status_code != 200 or response.headers.get("Content-Encoding", "identity") != "identity":
        return None
    length = response.headers.get("Content-Length")
    return int(length) if length is not None and length.isdigit() else None
