"""Webhook signatures as ModelRoute documents them: hex HMAC-SHA256 over ``"{timestamp}.{raw body}"``.

Pure Python (no Airflow): the receiver verifies with it and the local test server signs with it.
"""

from __future__ import annotations

import hashlib
import hmac
import time

#: Deliveries whose ``X-Signature-Timestamp`` is further than this from our clock are refused.
MAX_CLOCK_SKEW = 300.0
SIGNATURE_HEADER = "X-Signature"
TIMESTAMP_HEADER = "X-Signature-Timestamp"


class SignatureRejected(Exception):
    """A delivery failed verification; the message says why and never contains the secret or signature."""


def sign(secret: str, timestamp: int | str, body: bytes) -> str:
    """The ``X-Signature`` value for ``body`` sent at ``timestamp`` (unix seconds)."""
    message = str(timestamp).encode() + b"." + body
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def verify(
    secret: str,
    signature: str | None,
    timestamp: str | None,
    body: bytes,
    *,
    now: float | None = None,
    max_skew: float = MAX_CLOCK_SKEW,
) -> int:
    """Check a delivery's signature (constant time) and its timestamp; return the timestamp.

    :raises SignatureRejected: missing headers, a timestamp outside ``max_skew``, or a wrong signature.
    """
    if not signature or not timestamp:
        raise SignatureRejected(f"missing {SIGNATURE_HEADER} or {TIMESTAMP_HEADER} header")
    timestamp = timestamp.strip()
    try:
        sent = int(timestamp)
    except ValueError:
        raise SignatureRejected(f"{TIMESTAMP_HEADER} is not unix seconds") from None
    # Computed before the time check, so a wrong signature and a stale one cost the same.
    expected = sign(secret, timestamp, body)  # over the header as sent
    valid = hmac.compare_digest(expected.encode(), signature.strip().lower().encode())
    if abs((time.time() if now is None else now) - sent) > max_skew:
        raise SignatureRejected(f"{TIMESTAMP_HEADER} is more than {max_skew:.0f} s away from our clock")
    if not valid:
        raise SignatureRejected("the signature does not match this connection's webhook secret")
    return sent
