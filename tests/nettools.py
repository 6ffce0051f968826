"""Small real network parts for the transport tests, each on loopback in its own thread.

- ``TlsFront``: TLS in front of a plain HTTP server that closes client connections between polls
  (graceful close_notify or TCP reset; while idle, or as the next request arrives), and can ask
  for a client certificate.
- ``ConnectProxy``: an HTTP CONNECT proxy that records where it tunnelled.
- ``CannedServer``: answers every request with the same raw bytes (e.g. a corrupt gzip body).
- ``RateLimitedServer``: a rate-limited execution endpoint whose ``X-RateLimit-Reset`` is unix
  seconds, a delta, or absent.
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
import ssl
import struct
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class _LoopServer:
    """An asyncio server on 127.0.0.1 (any free port) in a daemon thread."""

    def __init__(self, handler: Handler, tls: ssl.SSLContext | None = None) -> None:
        self._handler, self._tls = handler, tls
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.port = 0
        self._server: asyncio.base_events.Server | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self._server = self.loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self._tls)
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self.loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._handler(reader, writer)
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    def __enter__(self) -> Any:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the test server did not start within 30 s")
        return self

    def __exit__(self, *exc_info: object) -> None:
        async def stop() -> None:
            assert self._server is not None
            self._server.close()
            tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, on_data: Any = None) -> None:
    while data := await reader.read(65536):
        if on_data is not None and on_data(data) is False:
            return
        writer.write(data)
        await writer.drain()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (RST) instead of a FIN."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class TlsFront(_LoopServer):
    """TLS in front of ``backend_port`` that closes every client connection after one response.

    :param close: ``"close_notify"`` (a graceful TLS close) or ``"reset"`` (a TCP reset).
    :param when: ``"idle"`` (``idle`` seconds after a response, between polls) or ``"on_reuse"``
        (as the next request on the connection arrives: the client's send races the close).
    """

    def __init__(
        self,
        backend_port: int,
        tls: ssl.SSLContext,
        close: str = "close_notify",
        when: str = "idle",
        idle: float = 0.05,
    ) -> None:
        super().__init__(self._relay, tls)
        self.backend_port, self.close, self.when, self.idle = backend_port, close, when, idle
        self.connections = 0
        self.closed_by_us = 0
        self.client_certs: list[Any] = []

    def _close(self, writer: asyncio.StreamWriter) -> None:
        self.closed_by_us += 1
        if self.close == "reset":
            _reset(writer)
        else:
            writer.close()

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.client_certs.append(client_w.get_extra_info("peercert"))
        backend_r, backend_w = await asyncio.open_connection("127.0.0.1", self.backend_port)
        answered_at: list[float] = []  # when backend bytes last reached the client

        def request(_data: bytes) -> bool:
            if self.when == "on_reuse" and answered_at:
                self._close(client_w)
                return False
            return True

        def answer(_data: bytes) -> None:
            answered_at[:] = [time.monotonic()]

        upstream = asyncio.ensure_future(_pump(client_r, backend_w, request))
        downstream = asyncio.ensure_future(_pump(backend_r, client_w, answer))
        try:
            while self.when == "idle" and not upstream.done():
                await asyncio.sleep(self.idle / 2)
                if answered_at and time.monotonic() - answered_at[0] >= self.idle:
                    self._close(client_w)
                    break
            await asyncio.wait([upstream, downstream], return_when=asyncio.FIRST_COMPLETED)
        finally:
            upstream.cancel()
            downstream.cancel()
            backend_w.close()

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self.port}"


class ConnectProxy(_LoopServer):
    """An HTTP proxy that only tunnels (CONNECT), recording each ``host:port`` asked for.

    :param refuse: answer every CONNECT with this status line instead (e.g. ``"407 Proxy
        Authentication Required"``).
    """

    def __init__(self, refuse: str | None = None) -> None:
        super().__init__(self._tunnel)
        self.refuse = refuse
        self.tunnels: list[str] = []

    async def _tunnel(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        method, target = head.split(" ", 2)[:2]
        if method != "CONNECT":
            writer.write(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
            return
        self.tunnels.append(target)
        if self.refuse:
            writer.write(f"HTTP/1.1 {self.refuse}\r\nContent-Length: 0\r\n\r\n".encode())
            return
        host, _, port = target.rpartition(":")
        upstream_r, upstream_w = await asyncio.open_connection(host, int(port))
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        try:
            await asyncio.gather(_pump(reader, upstream_w), _pump(upstream_r, writer))
        finally:
            upstream_w.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class CannedServer(_LoopServer):
    """Answers every request on a connection with ``response`` (raw HTTP bytes), counting them."""

    def __init__(self, response: bytes) -> None:
        super().__init__(self._answer)
        self.response = response
        self.requests = 0

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await reader.readuntil(b"\r\n\r\n")
            self.requests += 1
            writer.write(self.response)
            await writer.drain()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class RateLimitedServer(_LoopServer):
    """Answers ``GET /v1/executions/{id}`` with a COMPLETED execution, ``limit`` per ``window`` seconds.

    :param reset: how ``X-RateLimit-Reset`` is sent: ``"unix"`` seconds (the docs' example),
        ``"delta"`` (seconds from now) or ``"none"`` (not sent). Over the limit: 429 with Retry-After.
    """

    def __init__(self, limit: int, window: float, reset: str) -> None:
        super().__init__(self._answer)
        self.limit, self.window, self.reset = limit, window, reset
        self.answered = 0
        self.rate_limited = 0
        self._current = (-1, 0)

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            request_line = (await reader.readuntil(b"\r\n\r\n")).split(b" ", 2)
            now = time.time()
            index = int(now // self.window)
            count = (self._current[1] if self._current[0] == index else 0) + 1
            self._current = (index, count)
            ends = (index + 1) * self.window
            headers = {"X-RateLimit-Limit": self.limit, "X-RateLimit-Remaining": max(0, self.limit - count)}
            if self.reset == "unix":
                headers["X-RateLimit-Reset"] = math.ceil(ends)
            elif self.reset == "delta":
                headers["X-RateLimit-Reset"] = math.ceil(ends - now)
            if count > self.limit:
                self.rate_limited += 1
                status = "429 Too Many Requests"
                headers["Retry-After"] = math.ceil(ends - now)
                body = {"error": {"code": "RATE_LIMITED", "message": "slow down", "retryable": True}}
            else:
                self.answered += 1
                status = "200 OK"
                body = {"id": request_line[1].decode().rsplit("/", 1)[-1], "status": "COMPLETED"}
            content = json.dumps(body).encode()
            head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(content)}\r\n"
                f"{head}\r\n".encode()
                + content
            )
            await writer.drain()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"
