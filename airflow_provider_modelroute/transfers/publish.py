"""The verified atomic publish: streamed bytes appear at the destination complete, or not at all.

Nothing is published until the byte count matches the expected size:

* local files (``file://``) are written to a hidden temporary name in the same directory, fsynced,
  their size checked, and renamed over the final name (``os.replace``; with ``no_clobber`` a hard
  link, which refuses to clobber), so a reader sees the old file or the complete new one;
* object stores whose writes only appear when the file is committed (S3, GCS) are written directly,
  and on failure the pending upload is discarded (S3: the multipart upload is aborted);
* every other store (``memory://``, SFTP, ...) is written to a hidden sibling, its size checked,
  and moved into place.

A worker killed with SIGKILL can still leave a hidden ``.*.modelroute-partial`` file (local and
staged stores) or an incomplete multipart upload (S3: invisible, removed by a bucket lifecycle
rule); never an object under the final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from airflow_provider_modelroute.exceptions import (
    ModelRouteConfigError,
    ModelRouteError,
    ModelRouteTransferError,
)

if TYPE_CHECKING:
    from airflow_provider_modelroute.hooks.modelroute import FileDownload

#: Stores whose written objects only appear when the file is committed (and can be discarded).
_COMMIT_ON_CLOSE_PROTOCOLS = frozenset({"s3", "s3a", "s3n", "gs", "gcs"})
#: Object stores whose first path segment is a bucket (or container) that must already exist.
_BUCKET_PROTOCOLS = _COMMIT_ON_CLOSE_PROTOCOLS | {"abfs", "abfss", "az", "adl"}
_LOCAL_PROTOCOLS = frozenset({"file", "local"})
#: S3 refuses multipart parts under 5 MiB (except the last one).
_MIN_BLOCK_SIZE = 5 * 1024 * 1024
_TEMP_SUFFIX = ".modelroute-partial"
#: Chunks received but not yet written (each up to 1 MiB: the hook's network read).
_WRITE_BEHIND_CHUNKS = 4
#: Local files are written in slices this small: large writes into fresh page cache are slower.
_LOCAL_WRITE_SIZE = 128 * 1024
#: Progress is logged at most this often (and at every quarter of the file).
_PROGRESS_INTERVAL = 5.0


@dataclass
class Target:
    """One file to copy and where it goes."""

    download: FileDownload
    path: Any  # ObjectStoragePath
    uri: str  # the path as logs and errors show it (no credentials)
    existing_size: int | None  # None: nothing there yet
    identical_sha256: str | None = None  # set when the existing object equals the file


def publish(target: Target, *, no_clobber: bool, chunk_size: int, log: Any) -> tuple[str, int]:
    """Copy a target's download to its path; return the sha256 and size it published.

    Only verified bytes are published; after a failure nothing new is left at the path.
    """
    download, path, uri = target.download, target.path, target.uri
    progress = _Progress(log, f"Copying file {download.file_id}", download.size_bytes)
    protocol = str(path.protocol or "file")
    sink: _LocalSink | _StoreSink
    if protocol in _LOCAL_PROTOCOLS:
        sink = _LocalSink(str(path.path))
    else:
        staged = protocol not in _COMMIT_ON_CLOSE_PROTOCOLS
        block_size = max(_MIN_BLOCK_SIZE, chunk_size)
        sink = _StoreSink(path.fs, path.path, uri=uri, staged=staged, block_size=block_size, log=log)
    writer = _WriteBehind(sink)
    try:
        sha256, size = _sha256_of(download, progress, writer.write)
        writer.close()
        _check_size(download, size)
        sink.commit(size, no_clobber)
    except BaseException:
        writer.cancel()
        sink.abort()
        raise
    log.info("Copied file %s to %s: %s; sha256 %s", download.file_id, uri, progress.describe(), sha256)
    return sha256, size


def identical_sha256(target: Target, *, chunk_size: int, log: Any) -> str | None:
    """The sha256 if the object at the target's path equals its download (streams both, writes nothing)."""
    download, path = target.download, target.path
    if download.size_bytes is None or target.existing_size != download.size_bytes:
        return None
    with path.fs.open(path.path, "rb", block_size=chunk_size) as existing:
        existing_sha256, _ = _sha256_of(iter(partial(existing.read, chunk_size), b""))
    progress = _Progress(log, f"Comparing file {download.file_id} with {target.uri}", download.size_bytes)
    sha256, size = _sha256_of(download, progress)
    _check_size(download, size)
    return sha256 if sha256 == existing_sha256 else None


def exists_error(uri: str) -> ModelRouteConfigError:
    """The destination is taken and ``overwrite="fail"``: no retry, a human must decide."""
    return ModelRouteConfigError(
        f"The destination {uri} already exists and overwrite='fail'. Delete it, choose another "
        "destination, or set overwrite='replace' or overwrite='skip_if_identical'."
    )


def _sha256_of(
    chunks: Iterable[bytes], progress: _Progress | None = None, write: Callable[[bytes], None] | None = None
) -> tuple[str, int]:
    """The sha256 and byte count of a stream; each chunk also goes to ``write`` when one is given."""
    digest, size = hashlib.sha256(), 0
    for chunk in chunks:
        if write is not None:
            write(chunk)  # the write-behind thread writes while this one hashes and reads on
        digest.update(chunk)
        size += len(chunk)
        if progress is not None:
            progress.add(len(chunk))
    return digest.hexdigest(), size


def _check_size(download: FileDownload, size: int) -> None:
    if download.size_bytes is not None and size != download.size_bytes:
        raise ModelRouteTransferError(
            f"File {download.file_id} arrived with {size} bytes, not the announced "
            f"{download.size_bytes}: nothing was published"
        )


def _check_staged(shown: str, staged_size: int, size: int) -> None:
    if staged_size != size:
        raise ModelRouteTransferError(
            f"The staged copy of {shown} has {staged_size} bytes, not the {size} received"
        )


def _temp_name(final: str) -> str:
    """A hidden sibling of ``final``, unique to this copy."""
    parent, slash, name = final.rpartition("/")
    return f"{parent}{slash}.{name}.{uuid.uuid4().hex[:12]}{_TEMP_SUFFIX}"


class _Progress:
    """Logs bytes, percent and MB/s at every quarter of the file or every few seconds, not per chunk."""

    def __init__(self, log: Any, label: str, total: int | None) -> None:
        self.log, self.label, self.total = log, label, total
        self.done = self.quarter = 0
        self.start = self.last = time.monotonic()

    def add(self, count: int) -> None:
        self.done += count
        now = time.monotonic()
        quarter = self.done * 4 // self.total if self.total else 0
        if self.quarter < quarter < 4 or now - self.last >= _PROGRESS_INTERVAL:
            self.quarter, self.last = max(quarter, self.quarter), now
            self.log.info("%s: %s", self.label, self.describe())

    def describe(self) -> str:
        rate = self.done / max(time.monotonic() - self.start, 1e-6) / 1e6
        if self.total:
            return f"{self.done} of {self.total} bytes ({100 * self.done / self.total:.0f}%), {rate:.1f} MB/s"
        return f"{self.done} bytes, {rate:.1f} MB/s"


class _LocalSink:
    """A hidden temporary file beside the destination, fsynced, checked and renamed over it."""

    def __init__(self, final: str) -> None:
        self.final = final
        os.makedirs(os.path.dirname(final) or ".", exist_ok=True)
        self.temp = _temp_name(final)
        self.handle = open(self.temp, "xb")  # noqa: SIM115 - closed in commit() or abort()

    def write(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        for start in range(0, len(view), _LOCAL_WRITE_SIZE):
            self.handle.write(view[start : start + _LOCAL_WRITE_SIZE])

    def commit(self, size: int, no_clobber: bool) -> None:
        """Flush to disk (a rename must never publish bytes still in the page cache), check, rename."""
        self.handle.flush()
        os.fsync(self.handle.fileno())
        staged_size = os.fstat(self.handle.fileno()).st_size
        self.handle.close()
        _check_staged(self.final, staged_size, size)
        if no_clobber:
            self._link()
        else:
            os.replace(self.temp, self.final)
        with contextlib.suppress(OSError):  # make the rename durable where the OS allows it
            fd = os.open(os.path.dirname(self.final) or ".", os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _link(self) -> None:
        """Publish only if the final name is free: a hard link refuses to clobber, atomically."""
        try:
            os.link(self.temp, self.final)
        except FileExistsError:
            raise exists_error(f"file://{self.final}") from None
        except OSError:  # no hard links on this file system: check, then rename
            if os.path.lexists(self.final):
                raise exists_error(f"file://{self.final}") from None
            os.replace(self.temp, self.final)
        else:
            with contextlib.suppress(OSError):
                os.unlink(self.temp)

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self.handle.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.temp)


class _StoreSink:
    """A file in an fsspec store; after a failure nothing new is left at the final path.

    Written in place where the store commits on close (S3 multipart, GCS resumable), else
    (``staged``) to a hidden sibling that is moved into place once verified.
    """

    def __init__(self, fs: Any, final: str, *, uri: str, staged: bool, block_size: int, log: Any) -> None:
        self.fs, self.final, self.uri, self.staged, self.log = fs, final, uri, staged, log
        self.target = _temp_name(final) if staged else final
        self.keep_final = fs.exists(final)  # an object there before the copy is not ours to remove
        self.handle = fs.open(self.target, "wb", block_size=block_size)

    def write(self, chunk: bytes) -> None:
        self.handle.write(chunk)

    def commit(self, size: int, no_clobber: bool) -> None:
        if self.staged:  # in place, nothing is readable before the commit: the byte count must do
            self.handle.close()
            _check_staged(self.uri, int(self.fs.size(self.target)), size)
        if no_clobber and self.fs.exists(self.final):
            self.keep_final = True  # created by someone else meanwhile
            raise exists_error(self.uri)
        if self.staged:
            self.fs.mv(self.target, self.final)
        else:
            self.handle.close()  # the commit: the object appears, complete, now
        published = self.fs.info(self.final).get("size")
        if published is not None and int(published) != size:
            self.keep_final = False
            raise ModelRouteTransferError(f"{self.uri} holds {published} bytes after the copy, not {size}")

    def abort(self) -> None:
        if self.staged:
            with contextlib.suppress(Exception):
                self.handle.close()
            with contextlib.suppress(Exception):
                self.fs.rm(self.target)
        else:
            with contextlib.suppress(Exception):
                self.handle.discard()  # s3fs: abort the multipart upload; the pending bytes are dropped
            with contextlib.suppress(Exception):
                self.handle.closed = True  # so that its __del__ -> close() never commits it later
        if not self.keep_final:
            self._remove_final()

    def _remove_final(self) -> None:
        with contextlib.suppress(Exception):
            self.fs.invalidate_cache(self.final)
        try:
            if self.fs.exists(self.final):
                self.fs.rm(self.final)
                self.log.warning("Removed the incomplete object at %s", self.uri)
        except Exception as exc:
            self.log.error(
                "Could not check or remove %s after the failed copy (%s): remove it by hand", self.uri, exc
            )


class _WriteBehind:
    """Writes chunks to a sink from a thread, so that disk or upload time overlaps the next network reads.

    File writes, socket reads and sha256 updates all release the GIL. At most a few chunks wait in
    memory; a failed write is raised by the next ``write`` or by ``close``.
    """

    def __init__(self, sink: _LocalSink | _StoreSink) -> None:
        self.sink = sink
        self.error: BaseException | None = None
        self.cancelled = False
        self.queue: queue.Queue[bytes | None] = queue.Queue(maxsize=_WRITE_BEHIND_CHUNKS)
        self.thread = threading.Thread(target=self._run, name="modelroute-write-behind", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (chunk := self.queue.get()) is not None:
            if self.error is None and not self.cancelled:  # after a failure: drain, never block the reader
                try:
                    self.sink.write(chunk)
                except BaseException as exc:
                    self.error = exc

    def write(self, chunk: bytes) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(chunk)

    def close(self) -> None:
        """Wait until every chunk is written (or dropped, after ``cancel``); raise a write's failure."""
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()
        if self.error is not None and not self.cancelled:
            raise self.error

    def cancel(self) -> None:
        """Drop the chunks not yet written and wait for the write in progress (before the sink is aborted)."""
        self.cancelled = True
        self.close()


# -- the destination's own errors, said in the task's terms --------------------------------------


@contextmanager
def storage_errors(uri: str, conn_id: str | None) -> Iterator[None]:
    """Turn the store's errors into ones naming the destination, the connection and the fix.

    A missing bucket or denied access will not fix itself: no retry (``ModelRouteConfigError``).
    Other storage errors (timeouts, throttling) stay retryable.
    """
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
        if protocol in _LOCAL_PROTOCOLS:
            directory = str(path.path)
            while directory and not os.path.isdir(directory):
                directory = os.path.dirname(directory.rstrip("/")) or "/"
            if not os.access(directory, os.W_OK | os.X_OK):
                raise PermissionError(f"{directory} is not writable by this worker")
        elif protocol in _BUCKET_PROTOCOLS and getattr(path, "bucket", None):
            bucket = str(path.bucket).rpartition("@")[2]  # Airflow 2.11 keeps "conn_id@" in it
            try:
                path.fs.info(bucket)  # FileNotFoundError: no such bucket; PermissionError: denied
            except FileNotFoundError:
                path.fs.ls(bucket)  # older s3fs cannot head some buckets: list it
