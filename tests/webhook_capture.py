"""Loopback HTTP servers for the webhook tests: one that records what the local server delivers, and
the receiver plugin's app served as the api-server mounts it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from airflow_provider_modelroute.testing import ModelRouteServer


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


class CaptureServer:
    """Records every POST; answers ``status`` (settable) to each."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.status = 200
        self._lock = threading.Lock()
        capture = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                with capture._lock:
                    capture.received.append(Received(self.path, dict(self.headers.items()), body))
                    status = capture.status
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> CaptureServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def wait_for(
        self, what: str, check: Callable[[list[Received]], bool], timeout: float = 60.0
    ) -> list[Received]:
        """Wait until ``check`` holds for what was received so far; fail naming ``what``."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                seen = list(self.received)
            if check(seen):
                return seen
            if time.monotonic() > deadline:
                raise AssertionError(f"Timed out after {timeout:.0f} s waiting for {what}; received {seen}")
            time.sleep(0.02)


@contextmanager
def served_receiver() -> Iterator[str]:
    """The plugin's apps mounted at their prefixes on a loopback port (uvicorn); yields the base URL."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.routing import Mount

    from airflow_provider_modelroute.webhooks.receiver import ModelRouteWebhooksPlugin

    app = Starlette(
        routes=[Mount(a["url_prefix"], app=a["app"]) for a in ModelRouteWebhooksPlugin.fastapi_apps]
    )
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise AssertionError("the receiver did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextmanager
def endpoints_cleared(server: ModelRouteServer) -> Iterator[ModelRouteServer]:
    """The local server with no webhook endpoints (they outlive ``reset()``, as API keys do), and its
    webhook shape and retry pace restored afterwards."""
    server.webhooks.endpoints.clear()
    try:
        yield server
    finally:
        server.webhooks.endpoints.clear()
        server.webhooks.configure(shape="overview", retry_scale=1.0)
        server.webhooks.reset()
