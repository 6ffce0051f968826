"""The ModelRoute API contract in one place: key format, statuses, error codes, idempotency keys, results.

Pure Python (no Airflow, no HTTP client), shared by the hook, the operators and the local test
server so that both sides of the wire read the documentation the same way. Every assumption we
make where the public docs are silent lives here, marked ``ASSUMPTION``.
"""

from __future__ import annotations

import enum
import hashlib
import json
import re
import secrets
import zlib
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import urlsplit, urlunsplit

DEFAULT_BASE_URL = "https://api.modelroute.ai"
DEFAULT_DASHBOARD_URL = "https://app.modelroute.ai"
API_PREFIX = "/v1"
MAX_FILE_SIZE = 150 * 1024 * 1024
#: How the API names a file (``file_<uuid>``); ids are checked before they go into a URL path.
FILE_ID_RE = re.compile(r"file_[A-Za-z0-9_-]{1,128}")

# --- API keys -------------------------------------------------------------------------------

_API_KEY_RE = re.compile(r"sk_[0-9a-fA-F]{64}_[0-9a-fA-F]{8}")
API_KEY_SHAPE = "'sk_' + 64 hex digits + '_' + 8 hex digits (76 characters)"


def make_api_key(body: str | None = None) -> str:
    """Return a key of the llms.txt shape ``sk_<64 hex>_<crc32>``; random unless ``body`` (64 hex) is given.

    ASSUMPTION: no page says what the CRC32 covers; this one covers ``sk_<64 hex>``. Only the local
    server makes keys: the client never checks a checksum.
    """
    body = body or secrets.token_hex(32)
    return f"sk_{body}_{zlib.crc32(f'sk_{body}'.encode()) & 0xFFFFFFFF:08x}"


def api_key_warning(key: str) -> str | None:
    """Say how a key differs from the shape llms.txt gives, or None; the message never repeats the key.

    Only a hint: the docs' own examples use keys such as ``sk_your_api_key_here``, so the server,
    not this check, decides whether a key is valid (``UNAUTHORIZED``).
    """
    if _API_KEY_RE.fullmatch(key.strip()):
        return None
    return f"it does not have the shape llms.txt gives for ModelRoute keys, {API_KEY_SHAPE}"


# --- Execution statuses ---------------------------------------------------------------------


class ExecutionStatus(str, enum.Enum):
    """Lifecycle of an execution. A terminal state never changes again."""

    PENDING = "PENDING"
    PROCESSING = "PROCESSING"
    AWAITING_WEBHOOK = "AWAITING_WEBHOOK"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    EXPIRED = "EXPIRED"


TERMINAL_STATUSES = frozenset(
    {ExecutionStatus.COMPLETED, ExecutionStatus.FAILED, ExecutionStatus.CANCELLED, ExecutionStatus.EXPIRED}
)
FAILED_STATUSES = TERMINAL_STATUSES - {ExecutionStatus.COMPLETED}


_TERMINAL_VALUES = frozenset(s.value for s in TERMINAL_STATUSES)


def is_terminal(status: str | None) -> bool:
    """ASSUMPTION: an unknown status is not terminal (the caller logs it once and keeps waiting)."""
    return status in _TERMINAL_VALUES


def is_known_status(status: str | None) -> bool:
    return status in ExecutionStatus._value2member_map_


# --- Errors -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ErrorSpec:
    """One row of the documented error table, plus what the user should do about it."""

    http_status: int | None  # None: the docs do not give it
    retryable: bool
    hint: str


#: The documented codes, and only those: the client never depends on a code the docs do not list.
ERROR_CODES: dict[str, ErrorSpec] = {
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
#: A server-side fault: a later task try may succeed, so it does not fail the task at once.
_SERVER_FAULT_CODES = frozenset({"INTERNAL_ERROR"})


def is_retryable_error(code: str | None, http_status: int | None, retryable: bool | None) -> bool:
    """Decide whether an error response may be retried.

    Documented codes follow the docs' table. ASSUMPTION: an unknown code is retryable iff the body's
    ``retryable`` flag says so, else by HTTP status (429 and 5xx yes).
    """
    spec = ERROR_CODES.get(code or "")
    if spec is not None:
        return spec.retryable
    if retryable is not None:
        return retryable
    return http_status is not None and (http_status == 429 or http_status >= 500)


def is_permanent_error(code: str | None, http_status: int | None, retryable: bool | None) -> bool:
    """Whether an error response means the request itself is wrong, so no task retry can fix it.

    A documented non-retryable code (except ``INTERNAL_ERROR``, a server fault) or, for a code the
    docs do not list, a non-retryable 4xx. ASSUMPTION: an unknown execution id may come back as any
    4xx, with or without a body; it is permanent too.
    """
    if is_retryable_error(code, http_status, retryable):
        return False
    if code in ERROR_CODES:
        return code not in _SERVER_FAULT_CODES
    return http_status is not None and 400 <= http_status < 500


def is_final_failure(error: dict[str, Any] | None) -> bool:
    """Whether a FAILED execution's ``error`` would fail again with the same input.

    A documented non-retryable code, or ``retryable: false``. ASSUMPTION: an unknown code without
    a ``retryable`` flag is retryable (a model failure a new execution may not repeat).
    """
    error = error or {}
    spec = ERROR_CODES.get(str(error.get("code") or ""))
    if spec is not None:
        return not spec.retryable
    return error.get("retryable") is False


#: What to do about an error answer whose code the docs do not list (or a bare HTTP status).
#: ASSUMPTION: an execution id ModelRoute does not know may come back as any 4xx (there is no
#: documented EXECUTION_NOT_FOUND), so a refused request that names an execution says so.
_STATUS_HINTS = {
    401: ERROR_CODES["UNAUTHORIZED"].hint,
    403: ERROR_CODES["UNAUTHORIZED"].hint,
    404: "check the execution or file id: ModelRoute does not know it, or it belongs to another organization",
    429: ERROR_CODES["RATE_LIMITED"].hint,
}
_REFUSED_HINT = (
    "ModelRoute refused the request; if it names an execution, check the id (an unknown or another "
    "organization's execution may be refused with any 4xx)"
)
_SERVER_HINT = "a ModelRoute server error; retried automatically, retry later if it persists"


def error_hint(code: str | None, http_status: int | None = None) -> str | None:
    """What the user should do about an error code; for a code the docs do not list, by the answer's
    HTTP status (None without one: an execution's own ``error``)."""
    spec = ERROR_CODES.get(code or "")
    if spec is not None:
        return spec.hint
    if http_status is None:
        return None
    if http_status in _STATUS_HINTS:
        return _STATUS_HINTS[http_status]
    if http_status is not None and http_status >= 500:
        return _SERVER_HINT
    return _REFUSED_HINT


# --- Idempotency keys ----------------------------------------------------------------------


def idempotency_key_base(
    dag_id: str, run_id: str, task_id: str, map_index: int, *, request: dict[str, Any]
) -> str:
    """The same task instance and request give the same key base on every try (never the try number).

    Keys are ``<base>-g<generation>``: the next generation starts a new execution after one failed.
    """
    task = {"dag_id": dag_id, "run_id": run_id, "task_id": task_id, "map_index": map_index}
    identity = {**task, "request": request}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
    return f"airflow-{digest[:40]}"


# --- Readings of the docs -------------------------------------------------------------------

#: ASSUMPTION: a repeated ``Idempotency-Key`` may replay the original answer (even a stale PENDING)
#: and may say so with this header; the client then reads the execution's current state. The header
#: is not needed: the operator also reads it after sending any key an earlier try may have sent.
REPLAY_HEADER = "Idempotent-Replayed"
#: ``GET /v1/files/{id}/download`` may answer with this JSON document instead of the bytes.
URL_DOCUMENT_FIELDS = frozenset({"url", "expires_at", "content_type", "size_bytes"})
#: A server without ``POST /v1/files/confirm`` answers one of these: nothing to confirm.
CONFIRM_ABSENT_STATUSES = frozenset({404, 405})
UPLOAD_PURPOSES = ("INPUT", "UPLOAD")
UPLOAD_REGIONS = ("US", "EU", "APAC")
TTL_DAYS_RANGE = (1, 365)
#: ASSUMPTION: an ``X-RateLimit-Reset`` below this is a delta in seconds, at or above it a unix time.
_UNIX_TIME_FLOOR = 1_000_000_000


def is_url_document(document: Any) -> bool:
    """Whether a JSON answer of ``/download`` is the presigned-URL document (not a JSON file's bytes)."""
    return (
        isinstance(document, dict)
        and isinstance(document.get("url"), str)
        and document["url"].startswith(("https://", "http://"))
        and set(document) <= URL_DOCUMENT_FIELDS
    )


def rate_limit_reset(value: str | None, now: float) -> float | None:
    """``X-RateLimit-Reset`` as an absolute unix time: the header may be a unix time, a delta in
    seconds, or absent (None)."""
    try:
        number = float(value) if value is not None else None
    except ValueError:
        return None
    if number is None or number < 0:
        return None
    return number if number >= _UNIX_TIME_FLOOR else now + number


# --- Costs --------------------------------------------------------------------------------

#: The execution's cost fields: the hold and estimate the POST answers, then the final cost. Amounts
#: stay as the API sends them (decimal strings such as ``"0.040"``) in logs and XCom, and are
#: compared as ``Decimal``, never as floats.
ESTIMATE_FIELDS = ("hold_amount", "estimated_cost")
COST_FIELDS = (*ESTIMATE_FIELDS, "cost")


def amount(value: Any) -> Decimal | None:
    """An API amount (string or number) as a Decimal; None when absent or not a number."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = Decimal(str(value).strip())
    except InvalidOperation:
        return None
    return number if number.is_finite() else None


def describe_costs(execution: dict[str, Any]) -> str:
    """``hold_amount 0.048, estimated_cost 0.040`` (the cost fields the execution has)."""
    shown = [f"{name} {execution[name]}" for name in COST_FIELDS if execution.get(name) is not None]
    return ", ".join(shown) or "no cost fields"


# --- Results --------------------------------------------------------------------------------

_FORMAT_CONTENT_TYPES = {
    "png": "image/png",
    "jpg": "image/jpeg",
    "jpeg": "image/jpeg",
    "webp": "image/webp",
    "gif": "image/gif",
    "mp3": "audio/mpeg",
    "wav": "audio/wav",
    "mp4": "video/mp4",
    "json": "application/json",
    "txt": "text/plain",
}
CONTENT_TYPE_EXTENSIONS = {v: k for k, v in _FORMAT_CONTENT_TYPES.items() if k != "jpeg"}


def result_files(document: dict[str, Any] | None) -> list[dict[str, Any]]:
    """List the output files of an execution or ``/result`` document, in order, each once.

    The docs show three shapes: ``result.file_id`` (single file), ``result.files[]`` (ASSUMPTION,
    several files) and ``output.images[]`` (the quickstart's ``/result``). Each returned dict has
    at least ``file_id`` and ``content_type`` (derived from ``format`` when only that is given).
    """
    found: dict[str, dict[str, Any]] = {}

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            file_id = node.get("file_id")
            if isinstance(file_id, str) and file_id.startswith("file_") and file_id not in found:
                entry = dict(node)
                fmt = str(entry.get("format") or "").lower()
                entry.setdefault("content_type", _FORMAT_CONTENT_TYPES.get(fmt, "application/octet-stream"))
                found[file_id] = entry
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    if document:
        walk(document.get("result"))
        walk(document.get("output"))
    return list(found.values())


# --- Secrets in URLs ----------------------------------------------------------------------


def redact_url(url: str) -> str:
    """Drop a URL's query string and fragment (a presigned URL's signature lives there)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    query = "<redacted>" if parts.query else ""
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))


def display_uri(url: Any) -> str:
    """A storage URL fit for logs, XCom and lineage: no user info (credentials), query or fragment."""
    parts = urlsplit(str(url))
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


# --- Execution summaries ------------------------------------------------------------------

_SUMMARY_FIELDS = (
    "id",
    "status",
    "model",
    "created_at",
    "expires_at",
    "hold_amount",
    "estimated_cost",
    "cost",
    "metadata",
    "result",
    "error",
)


def execution_summary(document: dict[str, Any]) -> dict[str, Any]:
    """The JSON-safe record of an execution that tasks return: its fields plus ``files``."""
    summary = {name: document[name] for name in _SUMMARY_FIELDS if name in document}
    summary["files"] = result_files(document)
    return summary
