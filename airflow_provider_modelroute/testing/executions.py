"""The executions of the local server: their state machine, the documents the API shows, idempotency."""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from airflow_provider_modelroute.testing import content
from airflow_provider_modelroute.testing.dialects import Dialect
from airflow_provider_modelroute.testing.faults import Fault
from airflow_provider_modelroute.testing.spec import MAX_FILE_SIZE, REPLAY_HEADER, TERMINAL_STATUSES
from airflow_provider_modelroute.testing.storage import StoredFile
from airflow_provider_modelroute.testing.webhooks import WebhookSender
from airflow_provider_modelroute.testing.wire import ApiFailure, Reply, invalid_field, iso, json_reply

#: Fake models. ``flux-1.1-pro`` answers like the docs' example model.
IMAGE_MODELS = frozenset({"test-image", "flux-1.1-pro"})
MODELS = IMAGE_MODELS | {"test-file", "test-multi"}


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


class ExecutionsMixin:
    """Executions of :class:`ModelRouteServer`: created, advanced lazily by the clock, ended, cancelled."""

    _lock: threading.RLock
    _executions: dict[str, Execution]
    _files: dict[str, StoredFile]
    _idempotency: dict[str, str]
    _idempotency_counts: Counter[str]
    _cancels: Counter[str]
    _counters: Counter[str]
    dialect: Dialect
    webhooks: WebhookSender
    pending_seconds: float
    processing_seconds: float
    awaiting_webhook_seconds: float
    execution_ttl: float

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

    def set_execution_status(
        self, execution_id: str, status: str, error_code: str | None = None
    ) -> dict[str, Any]:
        """End an execution now with a terminal ``status`` (files are produced on COMPLETED)."""
        if status not in TERMINAL_STATUSES:
            raise ValueError(f"status must be one of {sorted(TERMINAL_STATUSES)}")
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
            "created_at": iso(execution.created),
            "expires_at": iso(execution.created + self.execution_ttl),
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
            if outcome_name not in TERMINAL_STATUSES:
                raise invalid_field("input._simulate.outcome", f"must be one of {sorted(TERMINAL_STATUSES)}")
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
        headers = {REPLAY_HEADER.lower(): "true"} if self.dialect.replay_header else {}
        return json_reply(status, document, headers)

    def _validate_input(self, model: str, params: dict[str, Any]) -> None:
        if model == "test-file":
            size = params.get("size_bytes")
            if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= MAX_FILE_SIZE:
                raise invalid_field("input.size_bytes", f"must be an integer from 1 to {MAX_FILE_SIZE}")
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
            if status in TERMINAL_STATUSES:
                raise ApiFailure("EXECUTION_NOT_CANCELLABLE", f"Execution {execution_id} is already {status}")
            self._finish(execution, "CANCELLED")
            return json_reply(200, self._execution_document(execution))
