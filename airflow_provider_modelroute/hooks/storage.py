"""Storage I/O on presigned URLs: checked, credential-free, streamed downloads (resumed) and uploads."""

from __future__ import annotations

import ipaddress
import logging
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import IO, Protocol
from urllib.parse import urljoin, urlsplit

import requests
import tenacity

from airflow_provider_modelroute import api, metrics
from airflow_provider_modelroute.exceptions import ModelRouteConnectionError, ModelRouteTransferError
from airflow_provider_modelroute.hooks.core import ApiCore
from airflow_provider_modelroute.hooks.network import route
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
    """Refuse presigned URLs that are not https, or name a loopback/private address literally.

    Names are not resolved here: resolving locally breaks proxy-only egress and private endpoints,
    and the storage host never gets the API key anyway (see ``StorageClient``). The local test
    server's http://127.0.0.1 URLs pass only with ``allow_insecure_storage_urls``.
    """
    parts = urlsplit(url)
    shown = api.redact_url(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ModelRouteTransferError(f"Refusing storage URL {shown}: not an http(s) URL")
    if core.settings.allow_insecure_storage_urls:
        return url
    if parts.scheme != "https":
        raise ModelRouteTransferError(
            f"Refusing storage URL {shown}: only https URLs are fetched. For the local test server set "
            "the connection extra allow_insecure_storage_urls=true."
        )
    if not _public_host(parts.hostname):
        raise ModelRouteTransferError(
            f"Refusing storage URL {shown}: its host is a loopback or private address. For the local "
            "test server set the connection extra allow_insecure_storage_urls=true."
        )
    return url


def _public_host(host: str) -> bool:
    """False for ``localhost`` and for literal addresses that are not global (no DNS lookup)."""
    if host == "localhost" or host.endswith(".localhost"):
        return False
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_global
    except ValueError:
        return True  # a name: whatever it resolves to is the proxy's or resolver's business


class DownloadSource(Protocol):
    """Opens a file's bytes at an offset, in whichever reading the API serves them (see hooks/download.py)."""

    def open(self, offset: int) -> requests.Response: ...

    def expired(self) -> None:
        """The presigned URL answered 403: the next ``open`` asks the API for a fresh one."""

    def close(self) -> None: ...


@dataclass
class FileDownload:
    """A file being downloaded; iterate it for the bytes (resumes on drops, refreshes an expired URL)."""

    file_id: str
    size_bytes: int | None
    content_type: str
    _source: DownloadSource = field(repr=False)
    _storage: StorageClient = field(repr=False)
    chunk_size: int = 1024 * 1024

    def __iter__(self) -> Iterator[bytes]:
        return self._storage.iter_download(self)

    def close(self) -> None:
        """Release a response opened ahead of iteration (when the bytes are not needed after all)."""
        self._source.close()


class StorageClient:
    """Talks to the storage host behind presigned URLs, with the API's timeouts and retry policy."""

    def __init__(self, core: ApiCore) -> None:
        self.core = core

    @cached_property
    def session(self) -> requests.Session:
        """A session without the API key, for presigned storage URLs."""
        _redact_urllib3_debug_lines()
        session = requests.Session()
        session.trust_env = False  # CA bundle and proxies come from ``network.route``
        session.auth = _strip_authorization
        session.headers["User-Agent"] = USER_AGENT
        return session

    @property
    def _timeout(self) -> tuple[float, float]:
        return (self.core.settings.connect_timeout, self.core.settings.read_timeout)

    def get(self, url: str, offset: int) -> requests.Response:
        """GET a presigned URL from ``offset``, following redirects only to URLs that pass the checks."""
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        for _ in range(5):
            response = self.session.get(
                url,
                headers=headers,
                stream=True,
                timeout=self._timeout,
                allow_redirects=False,
                **route(self.core.settings, url).requests_options(),
            )
            if not response.is_redirect:
                return response
            response.close()
            url = check_storage_url(self.core, urljoin(url, response.headers["Location"]))
        raise ModelRouteTransferError("Storage redirected more than 5 times")

    def iter_download(self, download: FileDownload) -> Iterator[bytes]:
        """Yield a file's bytes; resume with Range after a drop, and get a fresh URL once it expires."""
        offset, failures, url = 0, 0, ""
        size = download.size_bytes
        log = self.core.log
        while True:
            try:
                with download._source.open(offset) as response:
                    url = response.url
                    if response.status_code == 403:
                        raise _UrlExpired()
                    if response.status_code >= 500:
                        raise ModelRouteConnectionError(f"storage answered HTTP {response.status_code}")
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
                download._source.expired()
            except ModelRouteConnectionError as exc:
                reason = exc
            except requests.RequestException as exc:
                reason = self.core.transport_error(exc, "GET", getattr(exc.request, "url", None) or url)
                if not getattr(reason, "retryable", False):
                    raise reason from None
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

    def put(
        self,
        url: str,
        open_source: Callable[[], IO[bytes]],
        *,
        filename: str,
        size_bytes: int,
        content_type: str,
    ) -> None:
        """PUT a file's bytes to a presigned upload URL, retried per the policy (reopened each time).

        The Content-Type is the one declared when the URL was issued: a URL presigned for it
        rejects any other.
        """
        headers = {"Content-Length": str(size_bytes), "Content-Type": content_type}

        def put_once() -> None:
            with open_source() as source:
                try:
                    response = self.session.put(
                        url,
                        data=source,
                        headers=headers,
                        timeout=self._timeout,
                        **route(self.core.settings, url).requests_options(),
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
