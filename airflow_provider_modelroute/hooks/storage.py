"""Reaching hosts (TLS, proxies, refused addresses), and files on presigned URLs (without the API key).

``GET /v1/files/{id}/download`` answers in one of three documented readings, all handled by
:class:`FileDownload`: the file's bytes, the document ``{url, expires_at, content_type, size_bytes}``,
or a redirect to the presigned URL. Downloads stream and resume; uploads are retried.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
import os
import re
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import IO, Any
from urllib.parse import urljoin, urlsplit

import requests
import tenacity

from airflow_provider_modelroute import api, metrics
from airflow_provider_modelroute.exceptions import (
    ModelRouteConfigError,
    ModelRouteConnectionError,
    ModelRouteTransferError,
)
from airflow_provider_modelroute.hooks.transport import USER_AGENT, ConnectionSettings, Transport, api_path

#: The most read from the network at once: a dropped connection loses only the read in progress.
NETWORK_READ = 1024 * 1024
#: A URL document is small; a JSON answer larger than this is a file's bytes.
_MAX_DOCUMENT = 64 * 1024
_MAX_REDIRECTS = 5
CA_BUNDLE_VARIABLES = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE")
_PROXY_VARIABLES = tuple(n for b in ("https_proxy", "http_proxy", "all_proxy") for n in (b, b.upper()))
_SIGNED_QUERY_RE = re.compile(r"\?[^\s\"']*Signature=[^\s\"']*")


def local_address(host: str) -> str | None:
    """``"loopback"`` (localhost, loopback addresses), ``"private"`` (other literal addresses that are
    not global) or None; names are not resolved (that is the proxy's or resolver's business)."""
    if host == "localhost" or host.endswith(".localhost"):
        return "loopback"
    try:
        address = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return None
    if address.is_loopback:
        return "loopback"
    return None if address.is_global else "private"


@dataclass(frozen=True)
class Route:
    """The CA bundle to trust, the client certificate to show, and the proxy to use for one URL."""

    ca_bundle: str
    client_cert: str | None = None
    client_key: str | None = None
    proxy: str | None = None

    def requests_options(self) -> dict[str, Any]:
        """``verify``/``cert``/``proxies`` for a requests call (whose ``trust_env`` is off)."""
        cert = (self.client_cert, self.client_key) if self.client_key else self.client_cert
        proxies = {"http": self.proxy, "https": self.proxy} if self.proxy else {}
        return {"verify": self.ca_bundle, "cert": cert, "proxies": proxies}

    def ssl_context(self) -> ssl.SSLContext:
        """The TLS context for aiohttp (cached: loading a CA bundle is slow)."""
        try:
            return _ssl_context(self.ca_bundle, self.client_cert, self.client_key)
        except (ssl.SSLError, OSError) as exc:
            raise ModelRouteConfigError(
                f"Cannot load the TLS files (ca_bundle {self.ca_bundle!r}, client_cert "
                f"{self.client_cert!r}, client_key {self.client_key!r}): {exc}. Fix the connection extras "
                "or the CA environment variable"
            ) from None


@functools.lru_cache(maxsize=16)
def _ssl_context(ca_bundle: str, client_cert: str | None, client_key: str | None) -> ssl.SSLContext:
    if os.path.isdir(ca_bundle):
        context = ssl.create_default_context(capath=ca_bundle)
    else:
        context = ssl.create_default_context(cafile=ca_bundle)
    if client_cert:
        context.load_cert_chain(client_cert, client_key)
    return context


def _origin(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port or {"https": 443}.get(parts.scheme, 80)


def _ca_bundle(settings: ConnectionSettings) -> str:
    if settings.ca_bundle:
        return settings.ca_bundle
    for name in CA_BUNDLE_VARIABLES:
        path = os.environ.get(name)
        if path:
            if not os.path.exists(path):
                raise ModelRouteConfigError(
                    f"The environment variable {name} names {path!r}, which does not exist: fix or unset it"
                )
            return path
    import certifi

    return str(certifi.where())


def _proxy(url: str) -> str | None:
    # requests scans the whole environment for proxies: skip that when no proxy variable is set
    if not any(os.environ.get(name) for name in _PROXY_VARIABLES):
        return None
    from requests.utils import get_environ_proxies, select_proxy

    return select_proxy(url, get_environ_proxies(url))


def route(settings: ConnectionSettings, url: str) -> Route:
    """How to reach ``url``, one answer for both HTTP clients (which would read the environment
    differently) and for API and storage URLs. CA bundle: the extra ``ca_bundle``, else
    ``REQUESTS_CA_BUNDLE``, ``CURL_CA_BUNDLE`` or ``SSL_CERT_FILE``, else certifi's. The client
    certificate goes to the API host only. Proxy: ``HTTPS_PROXY``/``HTTP_PROXY``/``ALL_PROXY`` by
    scheme, except for hosts ``NO_PROXY`` matches, as requests reads them."""
    to_api = url == settings.base_url or _origin(url) == _origin(settings.base_url)
    return Route(
        ca_bundle=_ca_bundle(settings),
        client_cert=settings.client_cert if to_api else None,
        client_key=settings.client_key if to_api else None,
        proxy=_proxy(url),
    )


def check_storage_url(transport: Transport, url: str) -> str:
    """Refuse presigned URLs that are not https, or name a loopback/private address literally (the
    local test server's http://127.0.0.1 URLs pass only with ``allow_insecure_storage_urls``)."""
    parts = urlsplit(url)
    shown = api.redact_url(url)
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


class _PresignedQueryFilter(logging.Filter):
    """Redacts presigned query strings from urllib3's debug lines, which quote the request URL."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any("Signature=" in str(arg) for arg in record.args):
            record.args = tuple(
                _SIGNED_QUERY_RE.sub("?<redacted>", arg) if isinstance(arg, str) else arg
                for arg in record.args
            )
        return True


def _strip_authorization(request: requests.PreparedRequest) -> requests.PreparedRequest:
    """requests ``auth`` hook: no credential reaches the storage host (it also stops ``~/.netrc``)."""
    request.headers.pop("Authorization", None)
    return request


class StorageClient:
    """Talks to the storage host behind presigned URLs, with the API's timeouts and retry policy."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport

    def _options(self, url: str) -> dict[str, Any]:
        settings = self.transport.settings
        return {"timeout": settings.timeouts, **route(settings, url).requests_options()}

    @cached_property
    def session(self) -> requests.Session:
        """A session without the API key, for presigned storage URLs."""
        logger = logging.getLogger("urllib3.connectionpool")
        if not any(isinstance(f, _PresignedQueryFilter) for f in logger.filters):
            logger.addFilter(_PresignedQueryFilter())
        session = requests.Session()
        session.trust_env = False  # CA bundle and proxies come from ``route``
        session.auth = _strip_authorization
        session.headers["User-Agent"] = USER_AGENT
        return session

    def follow(self, response: requests.Response, url: str) -> str:
        """Where a redirect answer points, checked like any presigned URL; the answer is closed."""
        response.close()
        return check_storage_url(self.transport, urljoin(url, response.headers["Location"]))

    def get(self, url: str, offset: int) -> requests.Response:
        """GET a presigned URL from ``offset``, following redirects only to URLs that pass the checks."""
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        for _ in range(_MAX_REDIRECTS):
            response = self.session.get(
                url, headers=headers, stream=True, allow_redirects=False, **self._options(url)
            )
            if not response.is_redirect:
                return response
            url = self.follow(response, url)
        raise ModelRouteTransferError(f"Storage redirected more than {_MAX_REDIRECTS} times")

    def put(self, url: str, open_source: Callable[[], IO[bytes]], headers: dict[str, str], name: str) -> None:
        """PUT a file's bytes to a presigned upload URL, retried per the policy (reopened each time)."""
        options = self._options(url)

        def put_once() -> None:
            with open_source() as source:
                try:
                    response = self.session.put(url, data=source, headers=headers, **options)
                except requests.RequestException as exc:
                    raise self.transport.transport_error(exc, "PUT", url) from None
            if response.status_code >= 500:
                raise ModelRouteConnectionError(f"Upload of {name} got HTTP {response.status_code}")
            if response.status_code >= 300:
                refused = f"Storage refused the upload of {name} (HTTP {response.status_code})"
                raise ModelRouteTransferError(refused)

        tenacity.Retrying(**self.transport.retry.args())(put_once)


class FileDownload:
    """A file being downloaded; iterate it for the bytes (resumes on drops, refreshes an expired URL).
    Opening asks ``/download`` at once, so the size and type are known before the first byte is read."""

    def __init__(
        self, storage: StorageClient, send: Callable[..., requests.Response], file_id: str, chunk_size: int
    ) -> None:
        self.file_id, self.chunk_size = file_id, chunk_size
        self._storage, self._send = storage, send
        self._path = api_path("files", file_id, "/download")
        #: The presigned URL the API gave (document or redirect); None: ask the API (again).
        self._url: str | None = None
        self._pending: requests.Response | None = None
        document: dict[str, Any] = {}
        self._pending = self._open(0, document)
        size = document.get("size_bytes") if document else _announced_size(self._pending)
        self.size_bytes = int(size) if size is not None else None
        content_type = document.get("content_type") or self._pending.headers.get("Content-Type")
        self.content_type = str(content_type or "application/octet-stream").split(";")[0].strip()

    def close(self) -> None:
        """Release the response opened ahead of iteration (when the bytes are not needed after all)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.close()

    def _open(self, offset: int, document: dict[str, Any] | None = None) -> requests.Response:
        """A response whose body holds the file from ``offset`` (200: from the start, 206: from there)."""
        if self._pending is not None and offset == 0:
            pending, self._pending = self._pending, None
            return pending
        self.close()
        if self._url is not None:
            return self._storage.get(self._url, offset)
        retrying = tenacity.Retrying(**self._storage.transport.retry.args())
        return retrying(self._ask_api, offset, {} if document is None else document)

    def _ask_api(self, offset: int, document: dict[str, Any]) -> requests.Response:
        transport = self._storage.transport
        url = transport.url(self._path)
        headers = {"Accept": "*/*", "Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        response = self._send("GET", url, headers=headers, stream=True)
        if response.is_redirect:  # reading 3
            self._url = self._storage.follow(response, url)
            return self._storage.get(self._url, offset)
        if not 200 <= response.status_code < 300:
            with response:
                content = response.raw.read(_MAX_DOCUMENT, decode_content=True)
            raise transport.error_from_response(response.status_code, response.headers, content)
        found = _url_document(response)
        if found is None:  # reading 1: these are the bytes
            return response
        document.update(found)  # reading 2
        self._url = check_storage_url(transport, str(found["url"]))
        return self._storage.get(self._url, offset)

    def __iter__(self) -> Iterator[bytes]:
        """Yield the file's bytes; resume with Range after a drop, and get a fresh URL once it expires."""
        transport = self._storage.transport
        offset, failures, url, size = 0, 0, "", self.size_bytes
        while True:
            try:
                with self._open(offset) as response:
                    url = response.url
                    if response.status_code == 403:  # expired: the next open asks the API for a fresh URL
                        self._url = None
                        raise ModelRouteConnectionError("presigned URL expired (HTTP 403)")
                    if response.status_code >= 500:
                        raise ModelRouteConnectionError(f"storage answered HTTP {response.status_code}")
                    if response.status_code not in (200, 206):
                        raise ModelRouteTransferError(
                            f"Storage answered HTTP {response.status_code} for file {self.file_id}"
                        )
                    if size is None and offset == 0:
                        size = _announced_size(response)
                    skip = _bytes_to_skip(response, offset)
                    for chunk in response.iter_content(min(self.chunk_size, NETWORK_READ)):
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
                        f"File {self.file_id} is larger than its announced {size} bytes"
                    )
                reason: Exception = ModelRouteConnectionError(f"body ended at byte {offset} of {size}")
            except ModelRouteConnectionError as exc:
                reason = exc
            except requests.RequestException as exc:
                reason = transport.transport_error(exc, "GET", getattr(exc.request, "url", None) or url)
                if not getattr(reason, "retryable", False):
                    raise reason from None
            failures += 1
            metrics.retry()
            if failures > transport.retry.max_retries:
                raise ModelRouteTransferError(
                    f"Download of file {self.file_id} stopped at byte {offset} of {size} after "
                    f"{failures} failures in a row: {reason}"
                )
            transport.log.warning(
                "Download of file %s interrupted at byte %d (%s); resuming", self.file_id, offset, reason
            )
            time.sleep(transport.retry.backoff(failures))


def _announced_size(response: requests.Response) -> int | None:
    """The file's size from a 200 answer to a GET from byte 0 (not an expired URL's 403), if it says."""
    if response.status_code != 200 or response.headers.get("Content-Encoding", "identity") != "identity":
        return None
    length = response.headers.get("Content-Length")
    return int(length) if length is not None and length.isdigit() else None


def _bytes_to_skip(response: requests.Response, offset: int) -> int:
    """How many leading bytes of a (resumed) response were already received."""
    if response.status_code == 200:
        return offset  # the server ignored Range: drop what we already have
    start = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    if start is None or int(start[1]) != offset:
        raise ModelRouteTransferError(f"Storage answered a resume from byte {offset} with the wrong range")
    return 0


def _url_document(response: requests.Response) -> dict[str, Any] | None:
    """The presigned-URL document if ``response`` holds one (reading 2), else None. Only a small JSON
    body is read; a body that turns out not to be the document is put back."""
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
