"""A ModelRoute-compatible API and presigned-storage server on loopback, with fault injection.

It follows ``airflow_provider_modelroute.api`` (the documented codes and statuses) and, where the docs
disagree or are silent, plays one of several dialects (``testing/dialects.py``; the default reads the
docs literally), so that the provider is tested against every reading. Two plain ASGI apps run on
uvicorn in one background thread: the API (``/v1/...`` plus ``/_admin/...`` for out-of-process
control) and the storage host that serves and accepts presigned URLs. Nothing large is held in
memory: generated files are a function of (seed, offset) and uploads are spooled to disk.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import math
import os
import re
import secrets
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any
from urllib.parse import parse_qs

from airflow_provider_modelroute import api
from airflow_provider_modelroute.testing import content, dashboard
from airflow_provider_modelroute.testing.dialects import Dialect, dialect_from
from airflow_provider_modelroute.testing.webhooks import EndpointError, WebhookSender
from airflow_provider_modelroute.testing.wire import (
    ApiFailure,
    Receive,
    Reply,
    Scope,
    Send,
    drop_connection,
    invalid_field,
    json_reply,
    raw_headers,
    read_json,
    request_header,
    s3_error,
    send_reply,
)

#: Fake models. ``flux-1.1-pro`` answers like the docs' example model.
IMAGE_MODELS = frozenset({"test-image", "flux-1.1-pro"})
MODELS = IMAGE_MODELS | {"test-file", "test-multi"}
FAULT_KINDS = frozenset({"error", "rate_limit", "slow", "drop", "truncate", "expire_url", "outcome"})
_SIMULATED_OUTCOMES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "EXPIRED"})

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
_STORAGE_ROUTE = re.compile(r"/files/(?P<id>file_[A-Za-z0-9-]+)")


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Fault:
    """One injected fault: ``kind`` on requests to ``endpoint`` (a route key), ``remaining`` times."""

    endpoint: str
    kind: str
    remaining: int | None
    params: dict[str, Any]


@dataclass
class StoredFile:
    file_id: str
    content_type: str
    size_bytes: int
    data: bytes | None = None  # small outputs
    seed: str | None = None  # generated outputs
    path: str | None = None  # uploads, spooled to disk
    ready: bool = True
    width: int | None = None
    height: int | None = None
    sha256: str | None = None
    #: what the upload request asked for: the type the PUT must carry, purpose, region, ttl_days
    upload: dict[str, Any] = field(default_factory=dict)

    def chunks(self, start: int = 0, chunk_size: int = 256 * 1024) -> Iterator[bytes]:
        if self.data is not None:
            for offset in range(start, self.size_bytes, chunk_size):
                yield self.data[offset : offset + chunk_size]
        elif self.seed is not None:
            yield from content.generated_bytes(self.seed, self.size_bytes, start, chunk_size)
        elif self.path is not None:
            with open(self.path, "rb") as handle:
                handle.seek(start)
                while chunk := handle.read(chunk_size):
                    yield chunk

    def describe(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "file_id": self.file_id,
            "content_type": self.content_type,
            "size_bytes": self.size_bytes,
        }
        if self.width:
            doc.update(width=self.width, height=self.height)
        return doc


@dataclass
class FileReply(Reply):
    """A file's bytes, streamed from the API app itself (``/download`` in the bytes reading)."""

    stored: StoredFile | None = None
    fault: Fault | None = None


@dataclass
class Execution:
    id: str
    model: str
    input: dict[str, Any]
    metadata: dict[str, Any] | None
    webhook_url: str | None
    idempotency_key: str | None
    fingerprint: str
    created: float
    run_seconds: float
    outcome: str
    error_code: str | None
    final_status: str | None = None
    files: list[StoredFile] = field(default_factory=list)
    #: the answer to the POST that created it: what a replay repeats in the "original" reading
    first_answer: tuple[int, dict[str, Any]] | None = None


class ModelRouteServer:
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
        self.api_keys = list(api_keys or [api.make_api_key()])
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
        self._faults: list[Fault] = []
        self._executions: dict[str, Execution] = {}
        self._files: dict[str, StoredFile] = {}
        self._idempotency: dict[str, str] = {}
        self._requests: Counter[str] = Counter()
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

    def add_fault(self, endpoint: str, kind: str, count: int | None = 1, **params: Any) -> None:
        """Inject ``kind`` into the next ``count`` requests (None: all) to ``endpoint``.

        ``endpoint`` is a route key as in ``stats()["requests"]`` (e.g. ``"GET /v1/executions/{id}"``,
        ``"GET /files/{file_id}"``) or ``"*"`` for every API route. Kinds: ``error`` (``code``,
        ``status`` when not the code's own, ``retry_after``), ``rate_limit`` (``retry_after``),
        ``slow`` (``seconds``), ``drop`` (close the connection; a create is dropped after the
        execution exists), ``truncate`` (``after_bytes``; storage, or ``/download`` in the bytes
        reading), ``expire_url`` (storage answers 403) and ``outcome`` (the next created execution
        ends ``outcome`` with ``error_code``).
        """
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; use one of {sorted(FAULT_KINDS)}")
        with self._lock:
            self._faults.append(Fault(endpoint, kind, count, params))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults = []

    def reset(self) -> None:
        """Forget executions, files, faults and counters (keys and timings stay)."""
        with self._lock:
            self._faults = []
            self._executions = {}
            self._files = {}
            self._idempotency = {}
            self._requests = Counter()
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

    def execution(self, execution_id: str) -> dict[str, Any]:
        """The execution as the API shows it, plus what the server knows (key, input, metadata)."""
        with self._lock:
            execution = self._executions[execution_id]
            return {
                **self._execution_document(execution),
                "input": execution.input,
                "idempotency_key": execution.idempotency_key,
            }

    def execution_ids(self) -> list[str]:
        with self._lock:
            return list(self._executions)

    def file_info(self, file_id: str) -> dict[str, Any]:
        """``file_id``, ``size_bytes``, ``content_type``, ``sha256`` (computed by streaming) and, for
        an upload, what its request asked for (``upload``: content_type, purpose, region, ttl_days)."""
        with self._lock:
            stored = self._files[file_id]
        if stored.sha256 is None:
            stored.sha256 = content.sha256_of(stored.chunks())
        return {**stored.describe(), "sha256": stored.sha256, "upload": dict(stored.upload)}

    def add_file(self, data: bytes, content_type: str) -> str:
        """Store a file as if it had been uploaded and confirmed; returns its ``file_...`` id."""
        stored = StoredFile(f"file_{uuid.uuid4()}", content_type, len(data), data=data)
        with self._lock:
            self._files[stored.file_id] = stored
        return stored.file_id

    def set_execution_status(
        self, execution_id: str, status: str, error_code: str | None = None
    ) -> dict[str, Any]:
        """End an execution now with a terminal ``status`` (files are produced on COMPLETED)."""
        if status not in _SIMULATED_OUTCOMES:
            raise ValueError(f"status must be one of {sorted(_SIMULATED_OUTCOMES)}")
        with self._lock:
            execution = self._executions[execution_id]
            execution.outcome, execution.error_code = status, error_code
            self._finish(execution, status)
            return self._execution_document(execution)

    # -- execution model ----------------------------------------------------------------------

    def _status(self, execution: Execution, now: float | None = None) -> str:
        if execution.final_status:
            return execution.final_status
        elapsed = (now or time.time()) - execution.created
        if elapsed >= self.execution_ttl:
            return self._finish(execution, "EXPIRED")
        for status, until in (
            ("PENDING", self.pending_seconds),
            ("PROCESSING", self.pending_seconds + execution.run_seconds),
            (
                "AWAITING_WEBHOOK",
                self.pending_seconds + execution.run_seconds + self.awaiting_webhook_seconds,
            ),
        ):
            if elapsed < until:
                return status
        return self._finish(execution, execution.outcome)

    def _finish(self, execution: Execution, status: str) -> str:
        execution.final_status = status
        if status == "COMPLETED" and not execution.files:
            execution.files = self._produce(execution)
            for stored in execution.files:
                self._files[stored.file_id] = stored
        self.webhooks.finished(self, execution, status)
        return status

    def _produce(self, execution: Execution) -> list[StoredFile]:
        params = execution.input
        if execution.model == "test-file":
            size = int(params["size_bytes"])
            seed = str(params.get("seed", execution.id))
            return [StoredFile(f"file_{uuid.uuid4()}", "application/octet-stream", size, seed=seed)]
        count = int(params.get("count", 2)) if execution.model == "test-multi" else 1
        width, height = int(params.get("width", 64)), int(params.get("height", 64))
        files = []
        for index in range(count):
            prompt = f"{params.get('prompt', '')}|{params.get('image', '')}|{index}"
            png = content.png_from_prompt(prompt, width, height)
            files.append(
                StoredFile(
                    f"file_{uuid.uuid4()}", "image/png", len(png), data=png, width=width, height=height
                )
            )
        return files

    def _execution_document(self, execution: Execution) -> dict[str, Any]:
        status = self._status(execution)
        doc: dict[str, Any] = {
            "id": execution.id,
            "status": status,
            "model": execution.model,
            "hold_amount": "0.048",
            "estimated_cost": "0.040",
            "created_at": _iso(execution.created),
            "expires_at": _iso(execution.created + self.execution_ttl),
        }
        if execution.metadata is not None:
            doc["metadata"] = execution.metadata
        if execution.webhook_url:
            doc["webhook_url"] = execution.webhook_url
        if status == "COMPLETED":
            doc["cost"] = "0.040"
            described = [stored.describe() for stored in execution.files]
            doc["result"] = {"files": described} if len(described) > 1 else described[0]
        elif status == "FAILED":
            code = execution.error_code or "GENERATION_FAILED"
            doc["error"] = {"code": code, "message": f"The model failed: {code}"}
        elif status == "EXPIRED":
            doc["error"] = {"code": "EXPIRED", "message": "No result arrived before expires_at"}
        return doc

    # -- API handlers ---------------------------------------------------------------------------

    def _create(self, body: dict[str, Any], key: str | None, outcome: Fault | None) -> Reply:
        model, params = body.get("model"), body.get("input")
        if not isinstance(model, str) or not model:
            raise invalid_field("model", "is required (a model name such as 'flux-1.1-pro')")
        if model not in MODELS:
            raise invalid_field("model", f"unknown model {model!r}; available: {sorted(MODELS)}")
        if not isinstance(params, dict):
            raise invalid_field("input", "is required and must be an object")
        metadata = body.get("metadata")
        if metadata is not None and not isinstance(metadata, dict):
            raise invalid_field("metadata", "must be an object of key-value pairs")
        fingerprint = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        with self._lock:
            if key is not None and key in self._idempotency:
                original = self._executions[self._idempotency[key]]
                if original.fingerprint != fingerprint:
                    raise ApiFailure(
                        "IDEMPOTENCY_CONFLICT",
                        "This Idempotency-Key was already used with a different request body",
                    )
                self._counters["idempotent_replays"] += 1
                return self._replay(original)
            self._validate_input(model, params)
            simulate = params.get("_simulate") or {}
            outcome_name = str(simulate.get("outcome", "COMPLETED")).upper()
            error_code = simulate.get("error_code")
            if outcome is not None:
                outcome_name = str(outcome.params.get("outcome", "FAILED")).upper()
                error_code = outcome.params.get("error_code")
            if outcome_name not in _SIMULATED_OUTCOMES:
                raise invalid_field(
                    "input._simulate.outcome", f"must be one of {sorted(_SIMULATED_OUTCOMES)}"
                )
            execution = Execution(
                id=f"exec_{uuid.uuid4()}",
                model=model,
                input=params,
                metadata=metadata,
                webhook_url=body.get("webhook_url"),
                idempotency_key=key,
                fingerprint=fingerprint,
                created=time.time(),
                run_seconds=float(simulate.get("seconds", self.processing_seconds)),
                outcome=outcome_name,
                error_code=error_code,
            )
            self._executions[execution.id] = execution
            self.webhooks.watch(self, execution)
            if key is not None:
                self._idempotency[key] = execution.id
                self._idempotency_counts[key] += 1
            if self.dialect.submit == "sync":  # the seed's example: the answer is the finished execution
                self._finish(execution, execution.outcome)
            answer = (200 if self.dialect.submit == "sync" else 202, self._execution_document(execution))
            execution.first_answer = answer
            return json_reply(*answer)

    def _replay(self, execution: Execution) -> Reply:
        """The answer to a repeated Idempotency-Key: the original answer or the current state."""
        status, document = execution.first_answer or (202, {})
        if self.dialect.replay == "current":
            document = self._execution_document(execution)
        headers = {api.REPLAY_HEADER.lower(): "true"} if self.dialect.replay_header else {}
        return json_reply(status, document, headers)

    def _validate_input(self, model: str, params: dict[str, Any]) -> None:
        if model == "test-file":
            size = params.get("size_bytes")
            if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= api.MAX_FILE_SIZE:
                raise invalid_field("input.size_bytes", f"must be an integer from 1 to {api.MAX_FILE_SIZE}")
            return
        prompt = params.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise invalid_field("input.prompt", "is required and must be a non-empty string")
        if "forbidden" in prompt.lower():
            raise ApiFailure("CONTENT_MODERATION_REJECTED", "The prompt was rejected by safety filters")
        for name in ("width", "height"):
            value = params.get(name, 64)
            if not isinstance(value, int) or not 1 <= value <= 1024:
                raise invalid_field(f"input.{name}", "must be an integer from 1 to 1024")
        image = params.get("image")
        if image is not None:
            stored = self._files.get(image) if isinstance(image, str) else None
            if stored is None or not stored.ready:
                raise ApiFailure(
                    "FILE_NOT_FOUND",
                    f"input.image: file {image!r} does not exist, has expired, or belongs to another org",
                    status=400,
                    details=[{"field": "input.image", "code": "not_found", "message": "unknown file"}],
                )
            if not stored.content_type.startswith("image/"):
                raise ApiFailure(
                    "FILE_FORMAT_UNSUPPORTED", f"input.image: {stored.content_type} is not an image"
                )

    def _get_execution(self, execution_id: str) -> Execution:
        execution = self._executions.get(execution_id)
        if execution is None:
            bare = self.dialect.unknown_id == "bare-404"
            raise ApiFailure("EXECUTION_NOT_FOUND", f"No execution {execution_id}", bare=bare)
        return execution

    def _result(self, execution_id: str) -> Reply:
        with self._lock:
            execution = self._get_execution(execution_id)
            status = self._status(execution)
            if status != "COMPLETED":
                raise ApiFailure("EXECUTION_NOT_COMPLETED", f"Execution {execution_id} is {status}")
            outputs = [
                {
                    "file_id": f.file_id,
                    "format": f.content_type.split("/")[-1].replace("octet-stream", "bin"),
                    "content_type": f.content_type,
                    "size_bytes": f.size_bytes,
                }
                for f in execution.files
            ]
            kind = "images" if execution.model != "test-file" else "files"
            return json_reply(
                200, {"id": execution.id, "status": status, "cost": "0.040", "output": {kind: outputs}}
            )

    def _cancel(self, execution_id: str) -> Reply:
        with self._lock:
            execution = self._get_execution(execution_id)
            self._cancels[execution_id] += 1
            status = self._status(execution)
            if api.is_terminal(status):
                raise ApiFailure("EXECUTION_NOT_CANCELLABLE", f"Execution {execution_id} is already {status}")
            self._finish(execution, "CANCELLED")
            return json_reply(200, self._execution_document(execution))

    def _presign(self, file_id: str, method: str) -> tuple[str, float]:
        expires = math.ceil(time.time() + self.url_ttl)
        signature = self._signature(method, file_id, int(expires))
        return (
            f"{self.storage_url}/files/{file_id}?X-Amz-Expires={int(expires)}&X-Amz-Signature={signature}",
            expires,
        )

    def _signature(self, method: str, file_id: str, expires: int) -> str:
        return hmac.new(self._secret, f"{method}|{file_id}|{expires}".encode(), "sha256").hexdigest()

    def _file(self, file_id: str) -> StoredFile:
        stored = self._files.get(file_id)
        if stored is None or not stored.ready:
            raise ApiFailure("FILE_NOT_FOUND", f"No file {file_id}", status=404)
        return stored

    def _url_document(self, file_id: str) -> Reply:
        with self._lock:
            stored = self._file(file_id)
        url, expires = self._presign(file_id, "GET")
        return json_reply(
            200,
            {
                "url": url,
                "expires_at": _iso(expires),
                "content_type": stored.content_type,
                "size_bytes": stored.size_bytes,
            },
        )

    def _download(self, file_id: str, fault: Fault | None) -> Reply:
        """``/download`` in the dialect's reading: the bytes, the URL document, or a redirect."""
        if self.dialect.download == "json":
            return self._url_document(file_id)
        with self._lock:
            stored = self._file(file_id)
        if self.dialect.download == "bytes":
            return FileReply(200, stored=stored, fault=fault)
        return Reply(302, b"", {"location": self._presign(file_id, "GET")[0]})

    def _upload(self, body: dict[str, Any]) -> Reply:
        """``/files/upload``: v1 (llms.txt) needs filename and size_bytes, v2 (the uploading page) purpose."""
        filename, content_type, size = body.get("filename"), body.get("content_type"), body.get("size_bytes")
        if self.dialect.upload == "v1":
            if not isinstance(filename, str) or not filename:
                raise invalid_field("filename", "is required")
            if not isinstance(size, int) or not 0 < size <= api.MAX_FILE_SIZE:
                raise invalid_field("size_bytes", f"must be an integer from 1 to {api.MAX_FILE_SIZE}")
        else:
            self._check_v2_upload(body)
        if content_type is not None and not isinstance(content_type, str):
            raise invalid_field("content_type", "must be a MIME type string")
        file_id = f"file_{uuid.uuid4()}"
        asked: dict[str, Any] = {
            name: body[name] for name in ("content_type", "purpose", "region", "ttl_days") if name in body
        }
        with self._lock:
            self._files[file_id] = StoredFile(
                file_id, str(content_type or "application/octet-stream"), 0, ready=False, upload=asked
            )
        url, expires = self._presign(file_id, "PUT")
        return json_reply(200, {"file_id": file_id, "upload_url": url, "expires_at": _iso(expires)})

    @staticmethod
    def _check_v2_upload(body: dict[str, Any]) -> None:
        if body.get("purpose") not in api.UPLOAD_PURPOSES:
            raise invalid_field("purpose", f"is required: one of {list(api.UPLOAD_PURPOSES)}")
        if "region" in body and body["region"] not in api.UPLOAD_REGIONS:
            raise invalid_field("region", f"must be one of {list(api.UPLOAD_REGIONS)}")
        low, high = api.TTL_DAYS_RANGE
        ttl = body.get("ttl_days", low)
        if not isinstance(ttl, int) or isinstance(ttl, bool) or not low <= ttl <= high:
            raise invalid_field("ttl_days", f"must be an integer from {low} to {high}")

    def _confirm(self, body: dict[str, Any]) -> Reply:
        if self.dialect.confirm != "required":  # an API version without the confirm step
            status = int(self.dialect.confirm)
            raise ApiFailure(
                "NOT_FOUND" if status == 404 else "METHOD_NOT_ALLOWED", "No such route", status=status
            )
        file_id = body.get("file_id")
        with self._lock:
            stored = self._files.get(file_id) if isinstance(file_id, str) else None
            if stored is None or stored.path is None:
                raise ApiFailure("FILE_NOT_FOUND", f"No uploaded bytes for file {file_id!r}: PUT them first")
            stored.ready = True
            return json_reply(200, {**stored.describe(), "status": "READY"})

    # -- the API app --------------------------------------------------------------------------

    def _route(self, method: str, path: str) -> tuple[str, dict[str, str]] | None:
        for route_method, pattern, key in _API_ROUTES:
            match = pattern.fullmatch(path)
            if match and route_method == method:
                return key, match.groupdict()
        return None

    def _take_fault(self, endpoint: str, kinds: Iterable[str] = FAULT_KINDS) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                matches = fault.endpoint == endpoint or (fault.endpoint == "*" and " /v1/" in endpoint)
                if matches and fault.kind in kinds:
                    if fault.remaining is not None:
                        fault.remaining -= 1
                        if fault.remaining <= 0:
                            self._faults.remove(fault)
                    self._counters["faults_fired"] += 1
                    return fault
        return None

    def _rate_limit_headers(self, key: str) -> tuple[dict[str, str], bool]:
        """Count a request against the key's window; return the headers and whether it is over."""
        if self.rate_limit is None:
            return {}, False
        with self._lock:
            now = time.time()
            window = int((now - self._epoch) // self.rate_window)
            if window != self._window[0]:
                self._window = (window, Counter())
            counts = self._window[1]
            counts[key] += 1
            reset = math.ceil(self._epoch + (window + 1) * self.rate_window)
            over = counts[key] > self.rate_limit
            headers = {
                "x-ratelimit-limit": str(self.rate_limit),
                "x-ratelimit-remaining": str(max(0, self.rate_limit - counts[key])),
            }
            if self.dialect.rate_limit_reset != "absent":
                delta = self.dialect.rate_limit_reset == "delta"
                headers["x-ratelimit-reset"] = str(max(0, math.ceil(reset - now)) if delta else reset)
            if over:
                self._counters["rate_limited"] += 1
                headers["retry-after"] = str(max(1, math.ceil(reset - now)))
            return headers, over

    async def _api_app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        if path.startswith("/_admin/"):
            await send_reply(
                send, await self._admin(method, path[len("/_admin/") :], await read_json(receive))
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
        key = routed[0] if routed else f"{method} unknown"
        with self._lock:
            self._requests[key] += 1
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
            return self._create(body, request_header(scope, "idempotency-key"), outcome)
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
            return self._webhook_endpoints(endpoint, params, body)
        return self._confirm(body)

    def _webhook_endpoints(self, endpoint: str, params: dict[str, str], body: Any) -> Reply:
        """The endpoints API (testing/webhooks.py), errors in the documented body."""
        body = body if isinstance(body, dict) else {}
        hooks = self.webhooks
        try:
            if endpoint == "POST /v1/webhooks/endpoints":
                return json_reply(201, hooks.create_endpoint(body))
            if endpoint == "GET /v1/webhooks/endpoints":
                return json_reply(200, hooks.list_endpoints())
            if endpoint == "PATCH /v1/webhooks/endpoints/{id}":
                return json_reply(200, hooks.update_endpoint(params["id"], body))
            if endpoint == "DELETE /v1/webhooks/endpoints/{id}":
                return json_reply(200, hooks.delete_endpoint(params["id"]))
            return json_reply(202, hooks.test_endpoint(params["id"]))
        except EndpointError as exc:
            if exc.status == 404:
                raise ApiFailure("NOT_FOUND", str(exc), status=404) from None
            raise invalid_field(exc.field, str(exc)) from None

    # -- the storage app ----------------------------------------------------------------------

    async def _storage_app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        method = scope["method"]
        match = _STORAGE_ROUTE.fullmatch(scope["path"])
        endpoint = f"{method} /files/{{file_id}}"
        with self._lock:
            self._requests[endpoint] += 1
        if match is None or method not in ("GET", "PUT"):
            await send_reply(send, s3_error(404, "NoSuchKey", "No such object"))
            return
        file_id = match["id"]
        if request_header(scope, "authorization") is not None:
            with self._lock:
                self._counters["storage_auth"] += 1
            await send_reply(send, s3_error(400, "InvalidArgument", "Only one auth mechanism allowed"))
            return
        query = parse_qs(scope["query_string"].decode())
        expires = int((query.get("X-Amz-Expires") or ["0"])[0] or 0)
        signature = (query.get("X-Amz-Signature") or [""])[0]
        if not hmac.compare_digest(signature, self._signature(method, file_id, expires)):
            await send_reply(send, s3_error(403, "SignatureDoesNotMatch", "The signature does not match"))
            return
        fault = self._take_fault(endpoint)
        if (fault is not None and fault.kind == "expire_url") or time.time() > expires:
            await send_reply(send, s3_error(403, "AccessDenied", "Request has expired"))
            return
        if fault is not None and fault.kind in ("error", "rate_limit"):
            await send_reply(send, s3_error(503, "SlowDown", "Please reduce your request rate"))
            return
        if fault is not None and fault.kind == "slow":
            await asyncio.sleep(float(fault.params.get("seconds", 1.0)))
        if fault is not None and fault.kind == "drop":
            await drop_connection(send)
            return
        if method == "PUT":
            await send_reply(send, await self._store_upload(file_id, scope, receive))
            return
        with self._lock:
            stored = self._files.get(file_id)
        if stored is None or not stored.ready:
            await send_reply(send, s3_error(404, "NoSuchKey", "No such object"))
            return
        await self._serve_file(stored, scope, send, fault)

    async def _store_upload(self, file_id: str, scope: Scope, receive: Receive) -> Reply:
        with self._lock:
            stored = self._files.get(file_id)
        if stored is None:
            return s3_error(404, "NoSuchUpload", "No such upload")
        declared, sent = stored.upload.get("content_type"), request_header(scope, "content-type")
        if declared and sent != declared:  # the URL was presigned for the declared type
            return s3_error(
                403, "SignatureDoesNotMatch", f"Content-Type {sent!r} is not the signed {declared!r}"
            )
        path = os.path.join(self._spool, file_id)
        size, head = 0, b""
        with open(path, "wb") as handle:
            while True:
                message = await receive()
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > api.MAX_FILE_SIZE:
                    handle.close()
                    os.unlink(path)
                    return s3_error(400, "EntityTooLarge", "Your proposed upload exceeds the maximum size")
                if len(head) < 16:
                    head += chunk[: 16 - len(head)]
                handle.write(chunk)
                if not message.get("more_body"):
                    break
        if message.get("type") == "http.disconnect":
            os.unlink(path)
            return Reply(400)
        with self._lock:
            stored.path, stored.size_bytes, stored.sha256 = path, size, None
            stored.content_type = content.sniff_content_type(head, stored.content_type)
            stored.ready = self.dialect.confirm != "required"
        return Reply(200, b"", {"etag": f'"{file_id}"'})

    async def _serve_file(
        self,
        stored: StoredFile,
        scope: Scope,
        send: Send,
        fault: Fault | None,
        extra: dict[str, str] | None = None,
    ) -> None:
        start = 0
        status = 200
        headers = {**(extra or {}), "content-type": stored.content_type, "accept-ranges": "bytes"}
        range_header = request_header(scope, "range")
        if range_header:
            match = re.fullmatch(r"bytes=(\d+)-", range_header.strip())
            if match is None or int(match[1]) >= stored.size_bytes:
                await send_reply(
                    send, s3_error(416, "InvalidRange", "The requested range is not satisfiable")
                )
                return
            start, status = int(match[1]), 206
            headers["content-range"] = f"bytes {start}-{stored.size_bytes - 1}/{stored.size_bytes}"
        headers["content-length"] = str(stored.size_bytes - start)
        await send({"type": "http.response.start", "status": status, "headers": raw_headers(headers)})
        budget = int(fault.params.get("after_bytes", 0)) if fault and fault.kind == "truncate" else None
        sent = 0
        for chunk in stored.chunks(start):
            if budget is not None and sent + len(chunk) > budget:
                await send({"type": "http.response.body", "body": chunk[: budget - sent], "more_body": True})
                await drop_connection(send)
                self._count_bytes(budget)
                return
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            sent += len(chunk)
        await send({"type": "http.response.body", "body": b""})
        self._count_bytes(sent)

    def _count_bytes(self, count: int) -> None:
        with self._lock:
            self._counters["bytes_served"] += count

    # -- admin over HTTP (for servers in another process) ------------------------------------------

    async def _admin(self, method: str, action: str, body: Any) -> Reply:
        body = body if isinstance(body, dict) else {}
        try:
            if action == "faults" and method == "POST":
                self.add_fault(body["endpoint"], body["kind"], body.get("count", 1), **body.get("params", {}))
                return json_reply(200, {})
            if action == "faults" and method == "DELETE":
                self.clear_faults()
                return json_reply(200, {})
            if action == "reset" and method == "POST":
                self.reset()
                return json_reply(200, {})
            if action == "stats":
                return json_reply(200, self.stats())
            if action == "dialect" and method == "POST":
                self.dialect = body["dialect"]
                return json_reply(200, {"name": self.dialect.name, **self.dialect.readings()})
            if action == "executions":
                return json_reply(200, self.execution_ids())
            kind, _, ident = action.partition("/")
            if kind == "executions" and method == "POST":
                return json_reply(
                    200, self.set_execution_status(ident, body["status"], body.get("error_code"))
                )
            if kind == "executions":
                return json_reply(200, self.execution(ident))
            if kind == "files":
                return json_reply(200, self.file_info(ident))
            if kind == "webhooks":
                return json_reply(200, self.webhooks.admin(method, ident, body))
        except (KeyError, ValueError, TypeError) as exc:
            return json_reply(400, {"error": {"code": "ADMIN_ERROR", "message": repr(exc)}})
        return json_reply(404, {"error": {"code": "NOT_FOUND", "message": action}})
