"""A ModelRoute-compatible API and presigned-storage server on loopback, with fault injection.

It speaks the API as ``testing/spec.py`` reads the docs (codes, statuses, headers, limits) and, where
the docs disagree or are silent, plays one of several dialects (``testing/dialects.py``; the default reads the
docs literally), so that the provider is tested against every reading. Two plain ASGI apps run on
uvicorn in one background thread: the API (``/v1/...`` plus ``/_admin/...`` for out-of-process
control) and the storage host that serves and accepts presigned URLs. This module holds the
lifecycle and the routing; executions, files and storage, faults and webhooks have their own modules.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Iterable
from typing import Any

from airflow_provider_modelroute.testing import dashboard
from airflow_provider_modelroute.testing.admin import admin_reply
from airflow_provider_modelroute.testing.dialects import Dialect, dialect_from
from airflow_provider_modelroute.testing.executions import ExecutionsMixin
from airflow_provider_modelroute.testing.faults import FAULT_KINDS, FaultsMixin
from airflow_provider_modelroute.testing.spec import IDEMPOTENCY_HEADER, make_api_key
from airflow_provider_modelroute.testing.storage import FileReply, StorageMixin
from airflow_provider_modelroute.testing.webhooks import WebhookSender
from airflow_provider_modelroute.testing.wire import (
    ApiFailure,
    Receive,
    Reply,
    Scope,
    Send,
    drop_connection,
    invalid_field,
    json_reply,
    read_json,
    request_header,
    send_reply,
)

#: How many requests ``request_log()`` keeps.
REQUEST_LOG_SIZE = 100_000

_API_ROUTES: tuple[tuple[str, re.Pattern[str], str], ...] = tuple(
    (method, re.compile(pattern), key)
    for method, pattern, key in (
        ("POST", r"/v1/executions", "POST /v1/executions"),
        ("GET", r"/v1/executions/(?P<id>[^/]+)", "GET /v1/executions/{id}"),
        ("GET", r"/v1/executions/(?P<id>[^/]+)/result", "GET /v1/executions/{id}/result"),
        ("POST", r"/v1/executions/(?P<id>[^/]+)/cancel", "POST /v1/executions/{id}/cancel"),
        ("POST", r"/v1/files/upload", "POST /v1/files/upload"),
        ("POST", r"/v1/files/confirm", "POST /v1/files/confirm"),
        ("GET", r"/v1/files/(?P<id>[^/]+)/url", "GET /v1/files/{file_id}/url"),
        ("GET", r"/v1/files/(?P<id>[^/]+)/download", "GET /v1/files/{file_id}/download"),
        # webhooks (testing/webhooks.py)
        ("POST", r"/v1/webhooks/endpoints", "POST /v1/webhooks/endpoints"),
        ("GET", r"/v1/webhooks/endpoints", "GET /v1/webhooks/endpoints"),
        ("PATCH", r"/v1/webhooks/endpoints/(?P<id>[^/]+)", "PATCH /v1/webhooks/endpoints/{id}"),
        ("DELETE", r"/v1/webhooks/endpoints/(?P<id>[^/]+)", "DELETE /v1/webhooks/endpoints/{id}"),
        ("POST", r"/v1/webhooks/endpoints/(?P<id>[^/]+)/test", "POST /v1/webhooks/endpoints/{id}/test"),
    )
)


class ModelRouteServer(ExecutionsMixin, StorageMixin, FaultsMixin):
    """The ModelRoute API and its presigned storage on loopback, for tests, demos and benchmarks.

    Set ``rate_limited_routes`` (route keys, e.g. ``{"GET /v1/executions/{id}"}``) to apply
    ``rate_limit`` to those routes only (default None: every ``/v1`` route).

    :param host: interface to bind (loopback by default).
    :param port: API port (0: any free port).
    :param storage_port: storage host port (0: any free port).
    :param dialect: how to read the docs where they disagree or are silent: a preset name of
        ``testing.dialects.PRESETS`` with optional overrides (``"sync,download=json"``) or a
        ``Dialect``; default: ``$MODELROUTE_DIALECT``, else the literal reading. Settable later.
    :param api_keys: accepted API keys, any strings (default: one fresh key of the llms.txt shape,
        in ``api_key``).
    :param pending_seconds: time an execution stays ``PENDING``.
    :param processing_seconds: time it stays ``PROCESSING`` (``input._simulate.seconds`` overrides).
    :param awaiting_webhook_seconds: time in ``AWAITING_WEBHOOK`` (waiting for the AI provider's
        callback) before the terminal state.
    :param execution_ttl: an execution still running after this many seconds becomes ``EXPIRED``.
    :param rate_limit: requests per window per key on ``/v1``; every answer carries the
        ``X-RateLimit-*`` headers (None: unlimited, no such headers).
    :param rate_window: the rate-limit window in seconds.
    :param url_ttl: lifetime of presigned URLs in seconds.
    :param ssl_certfile: serve https on both ports with this PEM certificate chain (and
        ``ssl_keyfile``, unless the file holds the key too).
    """

    rate_limited_routes: frozenset[str] | None = None

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        storage_port: int = 0,
        *,
        dialect: str | Dialect | None = None,
        api_keys: Iterable[str] | None = None,
        pending_seconds: float = 0.2,
        processing_seconds: float = 0.3,
        awaiting_webhook_seconds: float = 2.0,
        execution_ttl: float = 300.0,
        rate_limit: int | None = 60,
        rate_window: float = 60.0,
        url_ttl: float = 3600.0,
        ssl_certfile: str | None = None,
        ssl_keyfile: str | None = None,
    ) -> None:
        self.dialect = dialect_from(dialect)
        self.api_keys = list(api_keys or [make_api_key()])
        self.api_key = self.api_keys[0]
        self.pending_seconds = pending_seconds
        self.processing_seconds = processing_seconds
        self.awaiting_webhook_seconds = awaiting_webhook_seconds
        self.execution_ttl = execution_ttl
        self.rate_limit = rate_limit
        self.rate_window = rate_window
        self.url_ttl = url_ttl
        self.ssl_certfile, self.ssl_keyfile = ssl_certfile, ssl_keyfile
        self._lock = threading.RLock()
        self._secret = secrets.token_bytes(32)
        self._spool = tempfile.mkdtemp(prefix="modelroute-server-")
        self._sockets = [self._bind(host, port), self._bind(host, storage_port)]
        api_port, storage = (s.getsockname()[1] for s in self._sockets)
        scheme = "https" if ssl_certfile else "http"
        self.base_url = f"{scheme}://{host}:{api_port}"
        self.storage_url = f"{scheme}://{host}:{storage}"
        self.admin_url = f"{self.base_url}/_admin"
        self._thread: threading.Thread | None = None
        self._servers: list[Any] = []
        self._epoch = time.time()
        self._faults = []
        self._executions = {}
        self._files = {}
        self._idempotency: dict[str, str] = {}
        self._requests: Counter[str] = Counter()
        self._log: deque[tuple[float, str, str | None]] = deque(maxlen=REQUEST_LOG_SIZE)
        self._responses: Counter[int] = Counter()
        self._idempotency_counts: Counter[str] = Counter()
        self._cancels: Counter[str] = Counter()
        self._window: tuple[int, Counter[str]] = (-1, Counter())
        self._counters: Counter[str] = Counter()
        self.webhooks = WebhookSender()

    @staticmethod
    def _bind(host: str, port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted sockets inherit this: without it, headers and body sent as two writes wait for a
        # delayed ACK (~40 ms a response).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(4096)
        return sock

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> ModelRouteServer:
        """Serve in a daemon thread; returns once both ports answer."""
        import uvicorn  # the `testing` extra; Airflow 3 already ships it

        configs = [
            uvicorn.Config(
                app,
                interface="asgi3",
                proxy_headers=False,
                log_level="warning",
                access_log=False,
                lifespan="off",
                timeout_keep_alive=30,
                ssl_certfile=self.ssl_certfile,
                ssl_keyfile=self.ssl_keyfile,
            )
            for app in (self._api_app, self._storage_app)
        ]
        self._servers = [uvicorn.Server(config) for config in configs]

        async def serve() -> None:
            self.webhooks.loop = asyncio.get_running_loop()
            await asyncio.gather(
                *(
                    server.serve(sockets=[sock])
                    for server, sock in zip(self._servers, self._sockets, strict=True)
                )
            )
            await self.webhooks.aclose()

        self._thread = threading.Thread(
            target=asyncio.run, args=(serve(),), name="modelroute-server", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 30
        while not all(server.started for server in self._servers):
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the local ModelRoute server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        for sock in self._sockets:
            sock.close()
        shutil.rmtree(self._spool, ignore_errors=True)

    def __enter__(self) -> ModelRouteServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- control and inspection (in-process; the same over HTTP at /_admin) ------------------

    @property
    def dialect(self) -> Dialect:
        """The reading of the docs the server plays; set it to a preset name, a spec or a ``Dialect``."""
        return self._dialect

    @dialect.setter
    def dialect(self, value: str | Dialect | None) -> None:
        self._dialect = dialect_from(value)

    def airflow_connection(self) -> dict[str, Any]:
        """An Airflow connection (as a dict) to this server: loopback storage URLs allowed, and the
        extra link's dashboard served here (``/executions/{id}``)."""
        return {
            "conn_type": "modelroute",
            "host": self.base_url,
            "password": self.api_key,
            "extra": {"allow_insecure_storage_urls": True, "dashboard_url": self.base_url},
        }

    def airflow_connection_env(self, conn_id: str = "modelroute_default") -> dict[str, str]:
        """``{"AIRFLOW_CONN_<ID>": json}`` for ``os.environ`` or a subprocess."""
        return {f"AIRFLOW_CONN_{conn_id.upper()}": json.dumps(self.airflow_connection())}

    def reset(self) -> None:
        """Forget executions, files, faults and counters (keys and timings stay)."""
        with self._lock:
            self._faults = []
            self._executions = {}
            self._files = {}
            self._idempotency = {}
            self._requests = Counter()
            self._log.clear()
            self._responses = Counter()
            self._idempotency_counts = Counter()
            self._cancels = Counter()
            self._window = (-1, Counter())
            self._counters = Counter()
            self.webhooks.reset()

    def stats(self) -> dict[str, Any]:
        """What the server saw, for assertions."""
        with self._lock:
            return {
                "requests": dict(self._requests),
                "responses": {str(k): v for k, v in self._responses.items()},
                "executions_created": len(self._executions),
                "idempotency_keys": dict(self._idempotency_counts),
                "idempotent_replays": self._counters["idempotent_replays"],
                "cancels": dict(self._cancels),
                "rate_limited": self._counters["rate_limited"],
                "faults_fired": self._counters["faults_fired"],
                "storage_requests_with_authorization": self._counters["storage_auth"],
                "bytes_served": self._counters["bytes_served"],
                "dialect": self.dialect.name,
                "webhooks": self.webhooks.stats(),
            }

    def request_log(self) -> list[dict[str, Any]]:
        """Every request in order of arrival (the latest ``REQUEST_LOG_SIZE``): ``at`` (unix time),
        ``route`` (a key of ``stats()["requests"]``) and ``id`` (the execution or file in the path)."""
        with self._lock:
            return [{"at": at, "route": route, "id": ident} for at, route, ident in self._log]

    def _log_request(self, route: str, ident: str | None) -> None:
        with self._lock:
            self._requests[route] += 1
            self._log.append((time.time(), route, ident))

    # -- the API app --------------------------------------------------------------------------

    def _route(self, method: str, path: str) -> tuple[str, dict[str, str]] | None:
        for route_method, pattern, key in _API_ROUTES:
            match = pattern.fullmatch(path)
            if match and route_method == method:
                return key, match.groupdict()
        return None

    async def _api_app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        if path.startswith("/_admin/"):
            await send_reply(
                send, admin_reply(self, method, path[len("/_admin/") :], await read_json(receive))
            )
            return
        if method == "GET" and path.startswith(dashboard.PATH_PREFIX):  # the extra link's target
            execution_id = path.removeprefix(dashboard.PATH_PREFIX)
            with self._lock:
                known = execution_id in self._executions
            status, page = dashboard.page(execution_id, self.execution(execution_id) if known else None)
            await send_reply(send, Reply(status, page, {"content-type": "text/html; charset=utf-8"}))
            return
        request_id = f"req_{uuid.uuid4().hex[:16]}"
        routed = self._route(method, path)
        self._log_request(
            routed[0] if routed else f"{method} unknown", routed[1].get("id") if routed else None
        )
        headers = {"x-request-id": request_id}
        try:
            reply = await self._handle(scope, receive, send, routed, headers)
        except ApiFailure as failure:
            reply = (
                Reply(failure.status, b"", failure.headers)
                if failure.bare
                else json_reply(
                    failure.status,
                    {
                        "error": {
                            "code": failure.code,
                            "message": failure.message,
                            "retryable": failure.retryable,
                            "details": failure.details,
                            "request_id": request_id,
                        }
                    },
                    failure.headers,
                )
            )
        if reply is None:  # the connection was dropped
            return
        reply.headers.update(headers)
        with self._lock:
            self._responses[reply.status] += 1
        if isinstance(reply, FileReply) and reply.stored is not None:
            await self._serve_file(reply.stored, scope, send, reply.fault, reply.headers)
        else:
            await send_reply(send, reply)

    async def _handle(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        routed: tuple[str, dict[str, str]] | None,
        headers: dict[str, str],
    ) -> Reply | None:
        if routed is None:
            raise ApiFailure("NOT_FOUND", f"No route {scope['method']} {scope['path']}", status=404)
        endpoint, params = routed
        authorization = request_header(scope, "authorization") or ""
        key = authorization.removeprefix("Bearer ").strip()
        limited = self.rate_limited_routes is None or endpoint in self.rate_limited_routes
        # on every answer of a limited route, a refusal too
        limit_headers, over = self._rate_limit_headers(key) if limited else ({}, False)
        headers.update(limit_headers)
        if not authorization.startswith("Bearer ") or key not in self.api_keys:
            raise ApiFailure("UNAUTHORIZED", "Invalid or missing API key")
        if over:
            raise ApiFailure(
                "RATE_LIMITED", "Rate limit exceeded", headers={"retry-after": headers["retry-after"]}
            )
        body = await read_json(receive)
        fault = self._take_fault(endpoint, FAULT_KINDS - {"outcome", "truncate", "expire_url"})
        if fault is not None:
            if fault.kind == "rate_limit" or (
                fault.kind == "error" and fault.params.get("code") == "RATE_LIMITED"
            ):
                with self._lock:
                    self._counters["rate_limited"] += 1
            if fault.kind in ("error", "rate_limit"):
                retry_after = fault.params.get("retry_after", 1 if fault.kind == "rate_limit" else None)
                extra = {"retry-after": str(retry_after)} if retry_after is not None else {}
                raise ApiFailure(
                    fault.params.get("code", "RATE_LIMITED"),
                    "Injected fault",
                    status=fault.params.get("status"),
                    headers=extra,
                )
            if fault.kind == "slow":
                await asyncio.sleep(float(fault.params.get("seconds", 1.0)))
            if fault.kind == "drop" and endpoint != "POST /v1/executions":
                await drop_connection(send)
                return None
        reply = self._dispatch(endpoint, params, body, scope)
        if fault is not None and fault.kind == "drop":  # the execution exists; the answer is lost
            await drop_connection(send)
            return None
        return reply

    def _dispatch(self, endpoint: str, params: dict[str, str], body: Any, scope: Scope) -> Reply:
        if endpoint in ("POST /v1/executions", "POST /v1/files/upload", "POST /v1/files/confirm") and not (
            isinstance(body, dict)
        ):
            raise invalid_field("body", "must be a JSON object")
        if endpoint == "POST /v1/executions":
            outcome = self._take_fault(endpoint, {"outcome"})
            return self._create(body, request_header(scope, IDEMPOTENCY_HEADER), outcome)
        if endpoint == "GET /v1/executions/{id}":
            with self._lock:
                return json_reply(200, self._execution_document(self._get_execution(params["id"])))
        if endpoint == "GET /v1/executions/{id}/result":
            return self._result(params["id"])
        if endpoint == "POST /v1/executions/{id}/cancel":
            return self._cancel(params["id"])
        if endpoint == "GET /v1/files/{file_id}/url":
            if not self.dialect.url_endpoint:
                raise ApiFailure("NOT_FOUND", "No route GET /v1/files/{file_id}/url")
            return self._url_document(params["id"])
        if endpoint == "GET /v1/files/{file_id}/download":
            return self._download(params["id"], self._take_fault(endpoint, {"truncate"}))
        if endpoint == "POST /v1/files/upload":
            return self._upload(body)
        if "/v1/webhooks/" in endpoint:
            return self.webhooks.api_reply(endpoint, params, body)
        return self._confirm(body)
