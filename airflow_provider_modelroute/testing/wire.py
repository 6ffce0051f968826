"""The wire of the local server: error bodies, replies, and the ASGI plumbing both of its apps use."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from airflow_provider_modelroute.testing.spec import DOCUMENTED_ERRORS

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


#: The HTTP status of each code this server answers: the documented ones; our choice where the docs
#: give none; and codes only this server uses (a client must never depend on those).
CODE_STATUSES: dict[str, int] = {
    **{code: row.status for code, row in DOCUMENTED_ERRORS.items() if row.status},
    "FILE_NOT_FOUND": 404,
    "UNAUTHORIZED": 401,
    "NOT_FOUND": 404,
    "METHOD_NOT_ALLOWED": 405,
    "EXECUTION_NOT_FOUND": 404,
    "IDEMPOTENCY_CONFLICT": 409,
    "EXECUTION_NOT_CANCELLABLE": 409,
    "EXECUTION_NOT_COMPLETED": 409,
}


class ApiFailure(Exception):
    """An API error response, in the documented body format (``bare``: the status alone, no body)."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        status: int | None = None,
        details: list[dict[str, str]] | None = None,
        headers: dict[str, str] | None = None,
        bare: bool = False,
    ) -> None:
        super().__init__(message)
        row = DOCUMENTED_ERRORS.get(code)
        self.code, self.message, self.details = code, message, details or []
        self.status = status or CODE_STATUSES.get(code, 500)
        self.retryable = row.retryable if row else self.status >= 500
        self.headers = headers or {}
        self.bare = bare


def iso(ts: float) -> str:
    """A unix time as the API writes times (``2026-01-01T00:00:00Z``)."""
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def invalid_field(field_name: str, message: str) -> ApiFailure:
    return ApiFailure(
        "INPUT_VALIDATION_ERROR",
        f"{field_name}: {message}",
        details=[{"field": field_name, "code": "invalid", "message": message}],
    )


@dataclass
class Reply:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def json_reply(status: int, document: Any, headers: dict[str, str] | None = None) -> Reply:
    return Reply(
        status, json.dumps(document).encode(), {"content-type": "application/json", **(headers or {})}
    )


def request_header(scope: Scope, name: str) -> str | None:
    wanted = name.lower().encode()
    for key, value in scope["headers"]:
        if key.lower() == wanted:
            return str(value.decode("latin-1"))
    return None


def raw_headers(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode(), v.encode("latin-1")) for k, v in headers.items()]


async def read_json(receive: Receive) -> Any:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    raw = b"".join(chunks)
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None


async def send_reply(send: Send, reply: Reply) -> None:
    headers = {"content-length": str(len(reply.body)), **reply.headers}
    await send({"type": "http.response.start", "status": reply.status, "headers": raw_headers(headers)})
    await send({"type": "http.response.body", "body": reply.body})


async def drop_connection(send: Send) -> None:
    """Close the client's connection without (the rest of) a response, as a network fault would."""
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    if transport is None:  # not uvicorn: the closest we can do is an error
        raise ConnectionAbortedError("injected drop")
    transport.abort()
    await asyncio.sleep(0)  # let the server notice the disconnect before the app returns


def s3_error(status: int, code: str, message: str) -> Reply:
    body = (
        "<?xml version='1.0' encoding='UTF-8'?>"
        f"<Error><Code>{code}</Code><Message>{message}</Message></Error>"
    )
    return Reply(status, body.encode(), {"content-type": "application/xml"})
