"""Files and the presigned storage host of the local server: upload, confirm, URL documents, downloads."""

from __future__ import annotations

import asyncio
import hmac
import math
import os
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from airflow_provider_modelroute.testing import content
from airflow_provider_modelroute.testing.dialects import Dialect
from airflow_provider_modelroute.testing.faults import Fault
from airflow_provider_modelroute.testing.spec import (
    MAX_FILE_SIZE,
    TTL_DAYS_RANGE,
    UPLOAD_PURPOSES,
    UPLOAD_REGIONS,
)
from airflow_provider_modelroute.testing.wire import (
    ApiFailure,
    Receive,
    Reply,
    Scope,
    Send,
    drop_connection,
    invalid_field,
    iso,
    json_reply,
    raw_headers,
    request_header,
    s3_error,
    send_reply,
)

_STORAGE_ROUTE = re.compile(r"/files/(?P<id>file_[A-Za-z0-9-]+)")


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


class StorageMixin:
    """Files of :class:`ModelRouteServer` and the storage host that serves its presigned URLs."""

    _lock: threading.RLock
    _files: dict[str, StoredFile]
    _counters: Counter[str]
    _secret: bytes
    _spool: str
    dialect: Dialect
    storage_url: str
    url_ttl: float

    #: from FaultsMixin and ModelRouteServer
    _take_fault: Callable[..., Fault | None]
    _log_request: Callable[[str, str | None], None]

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
                "expires_at": iso(expires),
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
            if not isinstance(size, int) or not 0 < size <= MAX_FILE_SIZE:
                raise invalid_field("size_bytes", f"must be an integer from 1 to {MAX_FILE_SIZE}")
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
        return json_reply(200, {"file_id": file_id, "upload_url": url, "expires_at": iso(expires)})

    @staticmethod
    def _check_v2_upload(body: dict[str, Any]) -> None:
        if body.get("purpose") not in UPLOAD_PURPOSES:
            raise invalid_field("purpose", f"is required: one of {list(UPLOAD_PURPOSES)}")
        if "region" in body and body["region"] not in UPLOAD_REGIONS:
            raise invalid_field("region", f"must be one of {list(UPLOAD_REGIONS)}")
        low, high = TTL_DAYS_RANGE
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

    # -- the storage app ----------------------------------------------------------------------

    async def _storage_app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        method = scope["method"]
        match = _STORAGE_ROUTE.fullmatch(scope["path"])
        endpoint = f"{method} /files/{{file_id}}"
        self._log_request(endpoint, match["id"] if match else None)
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
                if size > MAX_FILE_SIZE:
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
