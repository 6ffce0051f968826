"""The verified atomic publish: streamed bytes appear at the destination complete, or not at all.

Nothing is published before the byte count matches the announced size. Local files go to a hidden
sibling, are fsynced, checked and renamed into place (hard-linked when the name must stay free); S3
and GCS objects appear only when committed, and are discarded on failure; other stores (``memory://``,
SFTP, ...) get a hidden sibling, checked, then moved. A killed worker can leave a hidden
``.*.modelroute-partial`` file or an invisible unfinished multipart upload, never the final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING, Any, BinaryIO

from airflow_provider_modelroute.exceptions import (
    ModelRouteConfigError,
    ModelRouteError,
    ModelRouteTransferError,
)

if TYPE_CHECKING:
    from airflow_provider_modelroute.hooks.modelroute import FileDownload

#: Stores whose written objects appear only when committed (and can be discarded until then).
_COMMIT_ON_CLOSE = frozenset({"s3", "s3a", "s3n", "gs", "gcs"})
#: Stores whose first path segment is a bucket (or container) that must already exist.
_BUCKETS = _COMMIT_ON_CLOSE | {"abfs", "abfss", "az", "adl"}
_LOCAL = frozenset({"file", "local"})
#: S3 refuses multipart parts under 5 MiB (except the last one).
_MIN_BLOCK_SIZE = 5 * 1024 * 1024
#: Local files are written in slices this small: large writes into fresh page cache are slower.
_LOCAL_WRITE_SIZE = 128 * 1024


def publish(
    download: FileDownload, path: Any, uri: str, *, no_clobber: bool, chunk_size: int
) -> tuple[str, int]:
    """Stream ``download`` to ``path`` (an ``ObjectStoragePath``); return the sha256 and size published."""
    if str(path.protocol or "file") in _LOCAL:
        return _publish_local(download, str(path.path), uri, no_clobber)
    fs, final, in_place = path.fs, path.path, path.protocol in _COMMIT_ON_CLOSE
    written = final if in_place else _temp_name(final)
    handle = fs.open(written, "wb", block_size=max(_MIN_BLOCK_SIZE, chunk_size))
    try:
        sha256, size = _stream(download, handle.write)
        if not in_place:
            handle.close()
            _check_size(f"The staged copy of {uri}", int(fs.size(written)), size)
        if no_clobber and fs.exists(final):
            raise exists_error(uri)  # created by someone else meanwhile
        if in_place:
            handle.close()  # the commit: the object appears, complete, now
        else:
            fs.mv(written, final)
    except BaseException:
        if in_place:
            with contextlib.suppress(Exception):
                handle.discard()  # s3fs: abort the multipart upload
            handle.closed = True  # so that garbage collection never commits it
        else:
            with contextlib.suppress(Exception):
                handle.close()
            with contextlib.suppress(Exception):
                fs.rm(written)
        raise
    return sha256, size


def _publish_local(download: FileDownload, final: str, uri: str, no_clobber: bool) -> tuple[str, int]:
    directory = os.path.dirname(final) or "."
    os.makedirs(directory, exist_ok=True)
    temp = _temp_name(final)
    try:
        with open(temp, "xb") as handle:
            sha256, size = _stream(download, partial(_write_sliced, handle))
            handle.flush()
            os.fsync(handle.fileno())  # a rename must never publish bytes still in the page cache
            _check_size(f"The staged copy of {uri}", os.fstat(handle.fileno()).st_size, size)
        if not no_clobber:
            os.replace(temp, final)
        else:
            try:
                os.link(temp, final)  # refuses to clobber, atomically
            except FileExistsError:
                raise exists_error(uri) from None
            except OSError:  # no hard links on this file system: check, then rename
                if os.path.lexists(final):
                    raise exists_error(uri) from None
                os.replace(temp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)  # after a failure, or the name left behind by the hard link
    with contextlib.suppress(OSError):  # make the rename durable where the OS allows it
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return sha256, size


def _write_sliced(handle: BinaryIO, chunk: bytes) -> None:
    view = memoryview(chunk)
    for start in range(0, len(view), _LOCAL_WRITE_SIZE):
        handle.write(view[start : start + _LOCAL_WRITE_SIZE])


def _stream(download: FileDownload, write: Callable[[bytes], Any] | None = None) -> tuple[str, int]:
    """The sha256 and size of a download, which must match the announced size; each chunk also goes to
    ``write``, in a thread of its own so that writing overlaps the next network read and the hashing."""
    digest, size = hashlib.sha256(), 0
    with ThreadPoolExecutor(1, thread_name_prefix="modelroute-write") as writer:
        writing: Future[Any] | None = None
        for chunk in download:
            if write is not None:
                if writing is not None:
                    writing.result()  # a failed write stops the copy
                writing = writer.submit(write, chunk)
            digest.update(chunk)
            size += len(chunk)
        if writing is not None:
            writing.result()
    if download.size_bytes is not None:
        _check_size(f"File {download.file_id}", size, download.size_bytes)
    return digest.hexdigest(), size


def _check_size(what: str, size: int, expected: int) -> None:
    if size != expected:
        raise ModelRouteTransferError(f"{what} has {size} bytes, not {expected}: nothing was published")


def _temp_name(final: str) -> str:
    parent, slash, name = final.rpartition("/")
    return f"{parent}{slash}.{name}.{uuid.uuid4().hex[:12]}.modelroute-partial"


def identical_sha256(download: FileDownload, path: Any, chunk_size: int) -> str | None:
    """The download's sha256 if the object at ``path`` holds the same bytes, else None (writes nothing)."""
    digest = hashlib.sha256()
    with path.fs.open(path.path, "rb", block_size=chunk_size) as existing:
        for chunk in iter(partial(existing.read, chunk_size), b""):
            digest.update(chunk)
    sha256, _ = _stream(download)
    return sha256 if sha256 == digest.hexdigest() else None


def exists_error(uri: str) -> ModelRouteConfigError:
    """The destination is taken and ``overwrite="fail"``: no retry, a human must decide."""
    return ModelRouteConfigError(
        f"The destination {uri} already exists and overwrite='fail'. Delete it, choose another "
        "destination, or set overwrite='replace' or overwrite='skip_if_identical'."
    )


@contextmanager
def storage_errors(uri: str, conn_id: str | None) -> Iterator[None]:
    """Say the store's errors in the task's terms: missing buckets and denied access are not retried."""
    via = (
        f"destination_conn_id={conn_id!r}"
        if conn_id
        else "the store's default credentials (no destination_conn_id)"
    )
    shown = f"destination {uri} (through {via})"
    try:
        yield
    except ModelRouteError:
        raise
    except FileNotFoundError as exc:
        raise ModelRouteConfigError(
            f"Cannot write to {shown}: {exc}. Create the bucket (or container) or fix the destination URL."
        ) from exc
    except PermissionError as exc:
        raise ModelRouteConfigError(
            f"Cannot write to {shown}: access denied ({exc}). Give that connection's credentials write "
            "access (e.g. s3:PutObject), or set destination_conn_id to one that has it."
        ) from exc
    except OSError as exc:
        raise ModelRouteTransferError(
            f"Writing to {shown} failed: {type(exc).__name__}: {exc}. Check that the store is reachable "
            "with that connection; the task's retries will try again."
        ) from exc


def check_writable(path: Any, uri: str, conn_id: str | None) -> None:
    """Before any download: the bucket (or the nearest existing local directory) is there and writable."""
    with storage_errors(uri, conn_id):
        protocol = str(path.protocol or "file")
        if protocol in _LOCAL:
            directory = str(path.path)
            while directory and not os.path.isdir(directory):
                directory = os.path.dirname(directory.rstrip("/")) or "/"
            if not os.access(directory, os.W_OK | os.X_OK):
                raise PermissionError(f"{directory} is not writable by this worker")
        elif protocol in _BUCKETS and getattr(path, "bucket", None):
            bucket = str(path.bucket).rpartition("@")[2]  # Airflow 2.11 keeps "conn_id@" in it
            try:
                path.fs.info(bucket)  # FileNotFoundError: no such bucket; PermissionError: denied
            except FileNotFoundError:
                path.fs.ls(bucket)  # older s3fs cannot head some buckets: list it
