"""The ModelRoute API as the local server reads its documentation: errors, headers, limits, keys, signatures.

Written from the docs alone, apart from the provider's own reading, so that a test of the client
against this server compares two independent readings: a mistake on one side shows as a failure.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import zlib
from dataclasses import dataclass
from typing import TypeGuard
from urllib.parse import urlsplit


@dataclass(frozen=True)
class ErrorRow:
    """One row of the documented error table."""

    status: int | None  # None: the docs do not give the HTTP status
    retryable: bool


#: The documented error codes: code -> (HTTP status, retryable).
DOCUMENTED_ERRORS: dict[str, ErrorRow] = {
    "INPUT_VALIDATION_ERROR": ErrorRow(400, False),
    "CONTENT_MODERATION_REJECTED": ErrorRow(400, False),
    "FILE_NOT_FOUND": ErrorRow(None, False),
    "FILE_FORMAT_UNSUPPORTED": ErrorRow(400, False),
    "INSUFFICIENT_BALANCE": ErrorRow(402, False),
    "RATE_LIMITED": ErrorRow(429, True),
    "MODEL_OVERLOADED": ErrorRow(503, True),
    "MODEL_UNAVAILABLE": ErrorRow(503, True),
    "GENERATION_TIMEOUT": ErrorRow(504, True),
    "GENERATION_FAILED": ErrorRow(500, True),
    "SERVICE_UNAVAILABLE": ErrorRow(503, True),
    "INTERNAL_ERROR": ErrorRow(500, False),
    "UNAUTHORIZED": ErrorRow(None, False),
}

TERMINAL_STATUSES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "EXPIRED"})

#: Headers, as the docs spell them (HTTP header names are case-insensitive).
REQUEST_ID_HEADER = "X-Request-Id"
IDEMPOTENCY_HEADER = "Idempotency-Key"
#: ASSUMPTION (the docs are silent): a replayed answer may say so with this header.
REPLAY_HEADER = "Idempotent-Replayed"
RATE_LIMIT_HEADERS = ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset")
RETRY_AFTER_HEADER = "Retry-After"
SIGNATURE_HEADER = "X-Signature"
SIGNATURE_TIMESTAMP_HEADER = "X-Signature-Timestamp"
WEBHOOK_USER_AGENT = "ModelRoute-Webhooks/1.0"

#: Upload limits: 150 MB (read as MiB), the purposes, regions and TTL range of the uploading page.
MAX_FILE_SIZE = 150 * 1024 * 1024
UPLOAD_PURPOSES = ("INPUT", "UPLOAD")
UPLOAD_REGIONS = ("US", "EU", "APAC")
TTL_DAYS_RANGE = (1, 365)


def make_api_key(body: str | None = None) -> str:
    """A key of the llms.txt shape ``sk_<64 hex>_<8 hex CRC32>``; random unless ``body`` (64 hex) is given.

    ASSUMPTION: no page says what the CRC32 covers; here it covers ``sk_<64 hex>``.
    """
    body = body or secrets.token_hex(32)
    return f"sk_{body}_{zlib.crc32(f'sk_{body}'.encode()) & 0xFFFFFFFF:08x}"


def sign(secret: str, timestamp: int | str, body: bytes) -> str:
    """``X-Signature``: ``hex(HMAC-SHA256(secret, "{X-Signature-Timestamp}.{raw body}"))``."""
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def is_https_or_loopback(url: object) -> TypeGuard[str]:
    """A webhook URL this server accepts: https (as documented), or http on loopback for local tests."""
    if not isinstance(url, str):
        return False
    if url.startswith("https://"):
        return True
    host = urlsplit(url).hostname or ""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
