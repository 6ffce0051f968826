"""Storage I/O on presigned URLs: checked, credential-free, streamed downloads (resumed) and uploads."""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import IO
from urllib.parse import urljoin, urlsplit

import requests
import tenacity

from airflow_provider_modelroute import api, metrics
from airflow_provider_modelroute.exceptions import ModelRouteConnectionError, ModelRouteTransferError
from airflow_provider_modelroute.hooks.core import ApiCore
from airflow_provider_modelroute.hooks.settings import USER_AGENT

#: The most read from the network at once: a dropped connection loses only the read in progress.
NETWORK_READ = 1024 * 1024

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


def check_storage_url(core: ApiCore, url: str) -> str:
    """Refuse presigned URLs that are not https on a public host (unless local testing allows it)."""
    parts = urlsplit(url)
    shown = api.redact_url(url)
    if core.settings.allow_insecure_storage_urls:
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


@dataclass
class FileDownload:
    """A file being downloaded from its presigned URL; iterate it for the bytes (resumes on drops)."""

    file_id: str
    size_bytes: int | None
    content_type: str
    _storage: StorageClient = field(repr=False)
    _url: str = field(repr=False)
    #: Fetches a fresh presigned URL once the current one has expired.
    _refresh_url: Callable[[], str] = field(repr=False)
    chunk_size: int = 1024 * 1024

    def __iter__(self) -> Iterator[bytes]:
        return self._storage.iter_download(self)


class StorageClient:
    """Talks to the storage host behind presigned URLs, with the API's timeouts and retry policy."""

    def __init__(self, core: ApiCore) -> None:
        self.core = core

    @cached_property
    def session(self) -> requests.Session:
        """A session without the API key, for presigned storage URLs."""
        _redact_urllib3_debug_lines()
        session = requests.Session()
        session.auth = _strip_authorization
        session.headers["User-Agent"] = USER_AGENT
        return session

    @property
    def _timeout(self) -> tuple[float, float]:
        return (self.core.settings.connect_timeout, self.core.settings.read_timeout)

    def _get(self, url: str, offset: int) -> requests.Response:
        """GET a presigned URL from ``offset``, following redirects only to URLs that pass the checks."""
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        for _ in range(5):
            response = self.session.get(
                url, headers=headers, stream=True, timeout=self._timeout, allow_redirects=False
            )
            if not response.is_redirect:
                return response
            response.close()
            url = check_storage_url(self.core, urljoin(url, response.headers["Location"]))
        raise ModelRouteTransferError("Storage redirected more than 5 times")

    def iter_download(self, download: FileDownload) -> Iterator[bytes]:
        """Yield a file's bytes; resume with Range after a drop, and get a fresh URL once it expires."""
        offset, failures, url = 0, 0, download._url
        size = download.size_bytes
        log = self.core.log
        while True:
            try:
                with self._get(url, offset) as response:
                    if response.status_code == 403:
                        raise _UrlExpired()
                    if response.status_code not in (200, 206):
                        raise ModelRouteTransferError(
                            f"Storage answered HTTP {response.status_code} for file {download.file_id}"
                        )
                    skip = _bytes_to_skip(response, offset)
                    for chunk in response.iter_content(min(download.chunk_size, NETWORK_READ)):
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
                url = download._refresh_url()
            except requests.RequestException as exc:
                reason = self.core.transport_error(exc, "GET", url)
            failures += 1
            metrics.retry()
            if failures > self.core.settings.max_retries:
                raise ModelRouteTransferError(
                    f"Download of file {download.file_id} stopped at byte {offset} of {size} after "
                    f"{failures} failures in a row: {reason}"
                )
            log.warning(
                "Download of file %s interrupted at byte %d (%s); resuming", download.file_id, offset, reason
            )
            time.sleep(self.core.backoff(failures))

    def put(self, url: str, open_source: Callable[[], IO[bytes]], *, filename: str, size_bytes: int) -> None:
        """PUT a file's bytes to a presigned upload URL, retried per the policy (reopened each time)."""

        def put_once() -> None:
            with open_source() as source:
                try:
                    response = self.session.put(
                        url, data=source, headers={"Content-Length": str(size_bytes)}, timeout=self._timeout
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
