"""The async client of triggers: status, result and cancel over keep-alive connections."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import select
import ssl
import sys
import time
import urllib.request
import weakref
import zlib
from collections.abc import Mapping
from typing import Any, cast
from urllib.parse import urlsplit

import h11
import httpx
import tenacity

from airflow_provider_modelroute import metrics
from airflow_provider_modelroute.hooks.core import ApiCore, execution_path
from airflow_provider_modelroute.hooks.rate_budget import RateBudget


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
        waiting_since = time.monotonic()
        await self.budget.acquire()
        metrics.rate_budget_wait(time.monotonic() - waiting_since)
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
