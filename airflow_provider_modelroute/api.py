"""The ModelRoute API contract: statuses, error table, idempotency keys, result shapes (pure Python).
Where the public docs are silent, the reading taken is marked ``ASSUMPTION``."""

from __future__ import annotations

import enum
import hashlib
import json
import re
from typing import Any, NamedTuple
from urllib.parse import urlsplit, urlunsplit

DEFAULT_BASE_URL = "https://api.modelroute.ai"
DEFAULT_DASHBOARD_URL = "https://app.modelroute.ai"
API_PREFIX = "/v1"
MAX_FILE_SIZE = 150 * 1024 * 1024
#: How the API names a file (``file_<uuid>``); ids are checked before they go into a URL path.
FILE_ID_RE = re.compile(r"file_[A-Za-z0-9_-]{1,128}")
#: ASSUMPTION: a repeated ``Idempotency-Key`` may replay the original (even stale) answer, saying so here.
REPLAY_HEADER = "Idempotent-Replayed"
#: A server without ``POST /v1/files/confirm`` answers one of these: nothing to confirm.
CONFIRM_ABSENT_STATUSES = frozenset({404, 405})
UPLOAD_PURPOSES = ("INPUT", "UPLOAD")
UPLOAD_REGIONS = ("US", "EU", "APAC")
TTL_DAYS_RANGE = (1, 365)


def api_key_warning(key: str) -> str | None:
    """How a key differs from the shape llms.txt gives, or None (a hint: the docs' examples differ)."""
    if re.fullmatch(r"sk_[0-9a-fA-F]{64}_[0-9a-fA-F]{8}", key.strip()):
        return None
    shape = "'sk_' + 64 hex digits + '_' + 8 hex digits (76 characters)"
    return f"it does not have the shape llms.txt gives for ModelRoute keys, {shape}"


class ExecutionStatus(str, enum.Enum):
    """Lifecycle of an execution. A terminal state never changes again."""

    PENDING = "PENDING"
    PROCESSING = "PROCESSING"
    AWAITING_WEBHOOK = "AWAITING_WEBHOOK"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    EXPIRED = "EXPIRED"


FAILED_STATUSES = frozenset({"FAILED", "CANCELLED", "EXPIRED"})


def is_terminal(status: str | None) -> bool:
    """ASSUMPTION: an unknown status is not terminal (the caller logs it once and keeps waiting)."""
    return status == "COMPLETED" or status in FAILED_STATUSES


def is_known_status(status: str | None) -> bool:
    return status in ExecutionStatus.__members__


class ErrorSpec(NamedTuple):
    """One row of the documented error table, plus what the user should do about it."""

    http_status: int | None  # None: the docs do not give it
    retryable: bool
    hint: str


#: The documented codes, and only those: the client never depends on a code the docs do not list.
ERROR_CODES = {
    "INPUT_VALIDATION_ERROR": ErrorSpec(400, False, "fix the fields named in the details"),
    "CONTENT_MODERATION_REJECTED": ErrorSpec(
        400, False, "the input was rejected by safety filters; change it"
    ),
    "FILE_NOT_FOUND": ErrorSpec(
        None,
        False,
        "the file does not exist, has expired, or belongs to another organization; upload it again",
    ),
    "FILE_FORMAT_UNSUPPORTED": ErrorSpec(400, False, "convert the file to a format the model supports"),
    "INSUFFICIENT_BALANCE": ErrorSpec(402, False, "top up the ModelRoute account's balance"),
    "RATE_LIMITED": ErrorSpec(429, True, "slow down: poll less often or use a pool to limit concurrency"),
    "MODEL_OVERLOADED": ErrorSpec(503, True, "the model is overloaded; retry later"),
    "MODEL_UNAVAILABLE": ErrorSpec(503, True, "the model is unavailable; retry shortly"),
    "GENERATION_TIMEOUT": ErrorSpec(504, True, "generation timed out; retry"),
    "GENERATION_FAILED": ErrorSpec(500, True, "generation failed; retry"),
    "SERVICE_UNAVAILABLE": ErrorSpec(503, True, "ModelRoute is unavailable; retry shortly"),
    "INTERNAL_ERROR": ErrorSpec(500, False, "contact ModelRoute support with the request id"),
    "UNAUTHORIZED": ErrorSpec(
        None, False, "check the API key in the Airflow connection's password field (it may be revoked)"
    ),
}


def classify_error(
    code: str | None, http_status: int | None = None, flag: bool | None = None
) -> tuple[bool, bool]:
    """``(retryable, permanent)``: by the docs' table, else the body's flag, else 429/5xx retry and other
    4xx are permanent (ASSUMPTION: an unlisted execution error is retryable)."""
    spec = ERROR_CODES.get(code or "")
    if spec is not None:
        return spec.retryable, not spec.retryable and code != "INTERNAL_ERROR"
    if flag is None:
        flag = http_status is None or http_status == 429 or http_status >= 500
    return flag, not flag and 400 <= (http_status or 0) < 500


def is_final_failure(error: dict[str, Any] | None) -> bool:
    """Whether a FAILED execution's ``error`` would fail again with the same input."""
    error = error or {}
    return not classify_error(str(error.get("code") or ""), None, error.get("retryable"))[0]


def error_hint(code: str | None, http_status: int | None = None) -> str | None:
    """What to do about an error: by its code, else by the answer's HTTP status (None without one).
    ASSUMPTION: an unknown execution id may come back as any 4xx (no documented EXECUTION_NOT_FOUND)."""
    by_status = {401: "UNAUTHORIZED", 403: "UNAUTHORIZED", 429: "RATE_LIMITED"}
    spec = ERROR_CODES.get(code or "") or ERROR_CODES.get(by_status.get(http_status or 0, ""))
    if spec is not None or http_status is None:
        return spec.hint if spec else None
    if http_status == 404:
        return (
            "check the execution or file id: ModelRoute does not know it, or it belongs to another "
            "organization"
        )
    if http_status >= 500:
        return "a ModelRoute server error; retried automatically, retry later if it persists"
    return (
        "ModelRoute refused the request; if it names an execution, check the id (an unknown or another "
        "organization's execution may be refused with any 4xx)"
    )


def idempotency_key_base(ti: Any, request: dict[str, Any]) -> str:
    """The same on every try of a task instance's request (never the try number); keys are
    ``<base>-g<generation>``: the next generation starts a new execution after one failed."""
    identity = {n: getattr(ti, n) for n in ("dag_id", "run_id", "task_id", "map_index")}
    text = json.dumps({**identity, "request": request}, sort_keys=True, default=str)
    return f"airflow-{hashlib.sha256(text.encode()).hexdigest()[:40]}"


def is_url_document(document: Any) -> bool:
    """Whether a JSON answer of ``/download`` is the presigned-URL document (not a JSON file's bytes)."""
    url = document.get("url") if isinstance(document, dict) else None
    fields = {"url", "expires_at", "content_type", "size_bytes"}
    return isinstance(url, str) and url.startswith(("https://", "http://")) and set(document) <= fields


def rate_limit_reset(value: str | None, now: float) -> float | None:
    """``X-RateLimit-Reset`` as a unix time. ASSUMPTION: below 1e9 it is a delta in seconds."""
    try:
        number = float(value or "")
    except ValueError:
        return None
    return None if number < 0 else number if number >= 1_000_000_000 else now + number


_FORMAT_CONTENT_TYPES = {
    **{fmt: f"image/{fmt}" for fmt in ("png", "jpeg", "webp", "gif")},
    **{"jpg": "image/jpeg", "mp3": "audio/mpeg", "wav": "audio/wav", "mp4": "video/mp4"},
    **{"json": "application/json", "txt": "text/plain"},
}
CONTENT_TYPE_EXTENSIONS = {v: k for k, v in _FORMAT_CONTENT_TYPES.items() if k != "jpeg"}


def result_files(document: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The output files (``result.file_id``, ``result.files[]``, ``output.images[]``), in order, each once,
    each with ``file_id`` and ``content_type``."""
    found: dict[str, dict[str, Any]] = {}

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            file_id = node.get("file_id")
            if isinstance(file_id, str) and file_id.startswith("file_") and file_id not in found:
                fmt = str(node.get("format") or "").lower()
                found[file_id] = {
                    "content_type": _FORMAT_CONTENT_TYPES.get(fmt, "application/octet-stream"),
                    **node,
                }
            node = list(node.values())
        if isinstance(node, list):
            for item in node:
                walk(item)

    walk([(document or {}).get("result"), (document or {}).get("output")])
    return list(found.values())


def display_uri(url: Any) -> str:
    """A URL fit for logs, XCom and lineage: no user info (credentials), query or fragment."""
    parts = urlsplit(str(url))
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


def redact_url(url: str) -> str:
    """``display_uri``, with ``?<redacted>`` for a query (a presigned URL's signature lives there)."""
    try:
        return display_uri(url) + ("?<redacted>" if urlsplit(url).query else "")
    except ValueError:
        return "<unparseable URL>"


def execution_summary(document: dict[str, Any]) -> dict[str, Any]:
    """The JSON-safe record of an execution that tasks return: its fields plus ``files``."""
    fields = ("id", "status", "model", "created_at", "expires_at", "hold_amount", "estimated_cost", "cost")
    summary = {name: document[name] for name in (*fields, "metadata", "result", "error") if name in document}
    return {**summary, "files": result_files(document)}
