"""The ModelRoute API contract in one place: key format, statuses, error codes, result shapes.

Pure Python (no Airflow, no HTTP client), shared by the hook, the operators and the local test
server so that both sides of the wire read the documentation the same way. Every assumption we
make where the public docs are silent lives here, marked ``ASSUMPTION``.
"""

from __future__ import annotations

import enum
import re
import secrets
import zlib
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

DEFAULT_BASE_URL = "https://api.modelroute.ai"
DEFAULT_DASHBOARD_URL = "https://app.modelroute.ai"
API_PREFIX = "/v1"
MAX_FILE_SIZE = 150 * 1024 * 1024

# --- API keys -------------------------------------------------------------------------------

_API_KEY_RE = re.compile(r"sk_(?P<body>[0-9a-fA-F]{64})_(?P<crc>[0-9a-fA-F]{8})")
API_KEY_LENGTH = 76


def _crc32_hex(text: str) -> str:
    return f"{zlib.crc32(text.encode()) & 0xFFFFFFFF:08x}"


def make_api_key(body: str | None = None) -> str:
    """Return a well-formed key ``sk_<64 hex>_<crc32>``; random unless ``body`` (64 hex) is given."""
    body = body or secrets.token_hex(32)
    return f"sk_{body}_{_crc32_hex('sk_' + body)}"


def api_key_problem(key: str | None) -> str | None:
    """Say what is wrong with an API key's format, or return None if it is well formed.

    The message never repeats the key. The docs say the trailing CRC32 covers "the rest" of the
    key; ASSUMPTION: it may be computed over ``sk_<64 hex>`` or over the 64 hex digits alone, and
    both are accepted.
    """
    if not key:
        return "no API key is set: put it in the connection's API key field"
    key = key.strip()
    if not key.startswith("sk_"):
        return "an API key starts with 'sk_'"
    if len(key) != API_KEY_LENGTH:
        return f"an API key is {API_KEY_LENGTH} characters long (this one has {len(key)})"
    match = _API_KEY_RE.fullmatch(key)
    if match is None:
        return "an API key is 'sk_' + 64 hex digits + '_' + 8 hex digits"
    body, crc = match["body"], match["crc"].lower()
    if crc not in (_crc32_hex("sk_" + body), _crc32_hex(body)):
        return "the API key's checksum does not match: it was probably mistyped or truncated"
    return None


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

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset(
    {ExecutionStatus.COMPLETED, ExecutionStatus.FAILED, ExecutionStatus.CANCELLED, ExecutionStatus.EXPIRED}
)
FAILED_STATUSES = TERMINAL_STATUSES - {ExecutionStatus.COMPLETED}


def is_terminal(status: str | None) -> bool:
    """ASSUMPTION: an unknown status is not terminal (the caller logs it once and keeps waiting)."""
    return status in {s.value for s in TERMINAL_STATUSES}


def is_known_status(status: str | None) -> bool:
    return status in ExecutionStatus._value2member_map_


# --- Errors -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ErrorSpec:
    """One row of the documented error table, plus what the user should do about it."""

    http_status: int
    retryable: bool
    hint: str


ERROR_CODES: dict[str, ErrorSpec] = {
    "INPUT_VALIDATION_ERROR": ErrorSpec(400, False, "fix the fields named in the details"),
    "CONTENT_MODERATION_REJECTED": ErrorSpec(
        400, False, "the input was rejected by safety filters; change it"
    ),
    "FILE_NOT_FOUND": ErrorSpec(
        400,
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
    "UNAUTHORIZED": ErrorSpec(401, False, "check the Airflow connection's API key (it may be revoked)"),
    # ASSUMPTION: the codes below are not in the docs' table.
    "EXECUTION_NOT_FOUND": ErrorSpec(
        404, False, "check the execution id; it may belong to another organization"
    ),
    "IDEMPOTENCY_CONFLICT": ErrorSpec(
        409, False, "the same Idempotency-Key was used with a different request body; change the key"
    ),
    "EXECUTION_NOT_CANCELLABLE": ErrorSpec(409, False, "the execution has already finished"),
    "EXECUTION_NOT_COMPLETED": ErrorSpec(409, False, "wait for the execution to complete first"),
}


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
