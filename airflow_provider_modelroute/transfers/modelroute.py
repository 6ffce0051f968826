"""Copy ModelRoute files to any Airflow object storage, and upload files from it to ModelRoute.

Downloads stream chunk by chunk from the presigned URL (the hook resumes with ``Range`` and refreshes
an expired URL) into the destination while a sha256 is computed; memory does not grow with the file.
Nothing is published until the byte count matches ``size_bytes``:

* local files (``file://``) are written to a hidden temporary name in the same directory, fsynced,
  their size checked, and renamed over the final name (``os.replace``; with
  ``overwrite="fail"`` a hard link, which refuses to clobber), so a reader sees the old file or the
  complete new one;
* object stores whose writes only appear when the file is committed (S3, GCS) are written directly,
  and on failure the pending upload is discarded (S3: the multipart upload is aborted);
* every other store (``memory://``, SFTP, ...) is written to a hidden sibling, its size checked,
  and moved into place.

A worker killed with SIGKILL can still leave a hidden ``.*.modelroute-partial`` file (local and
staged stores) or an incomplete multipart upload (S3: invisible, removed by a bucket lifecycle
rule); never an object under the final name.

Cheap to import (DAG files import it at every parse): the hook (HTTP clients) and
``ObjectStoragePath`` (fsspec) are imported only when a task runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import mimetypes
import os
import queue
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from airflow_provider_modelroute import api, metrics
from airflow_provider_modelroute._compat import (
    AirflowFailException,
    AirflowNotFoundException,
    BaseOperator,
    object_storage_path,
)
from airflow_provider_modelroute.exceptions import ModelRouteConfigError, ModelRouteTransferError
from airflow_provider_modelroute.transfers.destination import check_writable, storage_errors

if TYPE_CHECKING:
    from airflow.providers.openlineage.extractors import OperatorLineage

    from airflow_provider_modelroute._compat import Context
    from airflow_provider_modelroute.hooks.modelroute import FileDownload, ModelRouteHook

#: What ``overwrite`` accepts.
OVERWRITE_MODES = ("fail", "replace", "skip_if_identical")
DEFAULT_CHUNK_SIZE = 5 * 1024 * 1024
#: Progress is logged at most this often (and at every quarter of the file).
PROGRESS_INTERVAL = 5.0
#: Stores whose written objects only appear when the file is committed (and can be discarded).
_COMMIT_ON_CLOSE_PROTOCOLS = frozenset({"s3", "s3a", "s3n", "gs", "gcs"})
_LOCAL_PROTOCOLS = frozenset({"file", "local"})
#: S3 refuses multipart parts under 5 MiB (except the last one).
_MIN_BLOCK_SIZE = 5 * 1024 * 1024
_TEMP_SUFFIX = ".modelroute-partial"
#: Chunks received but not yet written (each up to 1 MiB: the hook's network read).
_WRITE_BEHIND_CHUNKS = 4
#: Local files are written this much at a time: on the benchmark VM a write of 512 KiB or more into
#: fresh page cache took up to 10x longer than the same bytes written 128 KiB at a time (BENCHMARKS.md).
_LOCAL_WRITE_SIZE = 128 * 1024


class ModelRouteDestinationExistsError(ModelRouteConfigError):
    """The destination already holds an object and ``overwrite="fail"`` (no retry: a human must decide)."""


class ModelRouteNoFilesError(ModelRouteTransferError, AirflowFailException):
    """The execution ended without files to copy (FAILED, CANCELLED, EXPIRED, or no outputs)."""


def display_uri(path: Any) -> str:
    """A storage URL fit for logs and XCom: no user info (credentials), query or fragment."""
    parts = urlsplit(str(path))
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def open_storage_path(url: str, conn_id: str | None, field: str) -> Any:
    """The ``ObjectStoragePath`` a task argument names; one Airflow cannot open fails the task at once."""
    try:
        path = object_storage_path(url, conn_id or None)
        path.fs  # noqa: B018 - resolves the filesystem and the connection now, not mid-copy
    except (ValueError, ImportError, AirflowNotFoundException) as exc:
        reason = str(exc).replace(url, display_uri(url))  # never the URL's user info
        raise ModelRouteConfigError(
            f"{field} {display_uri(url)!r} cannot be opened ({type(exc).__name__}: {reason}): use a URL "
            f"whose scheme Airflow has a filesystem for (file://, or s3://, gs://... with that "
            f"provider installed) and check {field}_conn_id"
        ) from None
    return path


def _check_upload_options(purpose: str, region: str | None, ttl_days: int | None) -> None:
    """The uploading page's options, checked when the DAG is parsed."""
    if purpose not in api.UPLOAD_PURPOSES:
        raise ModelRouteConfigError(f"purpose must be one of {list(api.UPLOAD_PURPOSES)}, got {purpose!r}")
    if region is not None and region not in api.UPLOAD_REGIONS:
        raise ModelRouteConfigError(
            f"region must be one of {list(api.UPLOAD_REGIONS)} (or None), got {region!r}"
        )
    low, high = api.TTL_DAYS_RANGE
    if ttl_days is not None and (
        isinstance(ttl_days, bool) or not isinstance(ttl_days, int) or not low <= ttl_days <= high
    ):
        raise ModelRouteConfigError(
            f"ttl_days must be a whole number of days from {low} to {high} (or None: the organization's "
            f"default), got {ttl_days!r}"
        )


def _is_deferred(value: Any) -> bool:
    """True for a value only known when the task runs: a Jinja template or an XComArg."""
    if value is None:
        return False
    return not isinstance(value, str) or "{{" in value or "{%" in value


def _extension(content_type: str) -> str:
    return api.CONTENT_TYPE_EXTENSIONS.get(content_type.split(";")[0].strip().lower(), "bin")


def _sha256_of(handle: Any, chunk_size: int) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    while chunk := handle.read(chunk_size):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


class _Progress:
    """Logs bytes, percent and MB/s at every quarter of the file or every few seconds, not per chunk."""

    def __init__(self, log: Any, label: str, total: int | None) -> None:
        self.log, self.label, self.total = log, label, total
        self.done = 0
        self.start = self.last = time.monotonic()
        self.quarter = 0

    def add(self, count: int) -> None:
        self.done += count
        now = time.monotonic()
        quarter = self.done * 4 // self.total if self.total else 0
        if (quarter > self.quarter and quarter < 4) or now - self.last >= PROGRESS_INTERVAL:
            self.quarter, self.last = max(quarter, self.quarter), now
            self.log.info("%s: %s", self.label, self.describe())

    def describe(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-6)
        rate = self.done / elapsed / 1e6
        if self.total:
            return f"{self.done} of {self.total} bytes ({100 * self.done / self.total:.0f}%), {rate:.1f} MB/s"
        return f"{self.done} bytes, {rate:.1f} MB/s"


# -- sinks: where the bytes go until they are verified and published --------------------------------


class _LocalSink:
    """A hidden temporary file next to the destination, renamed over it once verified."""

    def __init__(self, final: str) -> None:
        self.final = final
        directory, name = os.path.split(final)
        os.makedirs(directory or ".", exist_ok=True)
        self.temp = os.path.join(directory, f".{name}.{uuid.uuid4().hex[:12]}{_TEMP_SUFFIX}")
        self.handle = open(self.temp, "xb")  # noqa: SIM115 - closed in finish() or abort()

    def write(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        for start in range(0, len(view), _LOCAL_WRITE_SIZE):
            self.handle.write(view[start : start + _LOCAL_WRITE_SIZE])

    def finish(self, size: int) -> None:
        """Flush to disk (the rename must never publish bytes still in the page cache), check the size."""
        self.handle.flush()
        os.fsync(self.handle.fileno())
        staged_size = os.fstat(self.handle.fileno()).st_size
        self.handle.close()
        if staged_size != size:
            raise ModelRouteTransferError(
                f"The staged copy of {self.final} has {staged_size} bytes, not the {size} received"
            )

    def publish(self, no_clobber: bool) -> None:
        if no_clobber:
            try:
                os.link(self.temp, self.final)  # atomic "create only if absent"
            except FileExistsError:
                raise _exists_error(f"file://{self.final}") from None
            except OSError:  # no hard links on this file system: check, then rename
                if os.path.lexists(self.final):
                    raise _exists_error(f"file://{self.final}") from None
                os.replace(self.temp, self.final)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(self.temp)
        else:
            os.replace(self.temp, self.final)
        with contextlib.suppress(OSError):  # make the rename durable where the OS allows it
            fd = os.open(os.path.dirname(self.final) or ".", os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self.handle.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.temp)


class _CommitOnCloseSink:
    """An object-store upload that becomes visible only when committed (S3 multipart, GCS resumable)."""

    def __init__(self, fs: Any, final: str, block_size: int) -> None:
        self.fs, self.final = fs, final
        self.handle = fs.open(final, "wb", block_size=block_size)

    def write(self, chunk: bytes) -> None:
        self.handle.write(chunk)

    def finish(self, size: int) -> None:
        """Nothing is readable before the commit: the byte count was checked by the caller."""

    def publish(self, no_clobber: bool) -> None:
        if no_clobber and self.fs.exists(self.final):
            raise _exists_error(self.final)
        self.handle.close()  # the commit: the object appears, complete, now

    def abort(self) -> None:
        discard = getattr(self.handle, "discard", None)
        with contextlib.suppress(Exception):
            if callable(discard):
                discard()  # s3fs: abort the multipart upload; the pending bytes are dropped
        with contextlib.suppress(Exception):
            # A discarded fsspec file must not be committed later by its __del__ -> close().
            self.handle.closed = True


class _StagedSink:
    """A hidden sibling object, moved into place once verified (for stores that publish on open)."""

    def __init__(self, fs: Any, final: str, block_size: int) -> None:
        self.fs, self.final = fs, final
        parent, _, name = final.rpartition("/")
        self.temp = f"{parent}/.{name}.{uuid.uuid4().hex[:12]}{_TEMP_SUFFIX}"
        self.handle = fs.open(self.temp, "wb", block_size=block_size)

    def write(self, chunk: bytes) -> None:
        self.handle.write(chunk)

    def finish(self, size: int) -> None:
        self.handle.close()
        staged_size = int(self.fs.size(self.temp))
        if staged_size != size:
            raise ModelRouteTransferError(
                f"The staged copy of {self.final} has {staged_size} bytes, not the {size} received"
            )

    def publish(self, no_clobber: bool) -> None:
        if no_clobber and self.fs.exists(self.final):
            raise _exists_error(self.final)
        self.fs.mv(self.temp, self.final)

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self.handle.close()
        with contextlib.suppress(Exception):
            self.fs.rm(self.temp)


class _WriteBehind:
    """Writes chunks to a sink from a thread, so that disk or upload time overlaps the next network reads.

    File writes, socket reads and sha256 updates all release the GIL. At most a few chunks wait in
    memory; a failed write is raised by the next ``write`` or by ``close``.
    """

    def __init__(self, sink: _LocalSink | _CommitOnCloseSink | _StagedSink) -> None:
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


def _exists_error(shown: str) -> ModelRouteDestinationExistsError:
    return ModelRouteDestinationExistsError(
        f"The destination {shown} already exists and overwrite='fail'. Delete it, choose another "
        "destination, or set overwrite='replace' or overwrite='skip_if_identical'."
    )


@dataclass
class _Target:
    """One file to copy and where it goes."""

    download: FileDownload
    path: Any  # ObjectStoragePath
    uri: str
    existing_size: int | None  # None: nothing there yet
    identical_sha256: str | None = None  # set when the existing object equals the file


class ModelRouteToStorageOperator(BaseOperator):
    """
    Copy ModelRoute files (one file, or every output file of an execution) to any object storage.

    The bytes stream from ModelRoute to the destination chunk by chunk, with a sha256 computed on
    the way; a file is published only once its byte count matches the announced ``size_bytes``, and
    a failed copy leaves nothing behind at the destination (see the module docs for how, per store).
    The presigned download URL is never logged, returned or put in an error.

    Returns a list with one record per file: ``file_id``, ``uri`` (the destination, without
    credentials), ``size_bytes``, ``content_type`` and ``sha256``.

    :param destination: An ``ObjectStoragePath`` URL (``s3://bucket/prefix/``, ``file:///data/out/``,
        ``gs://...``). A folder (the URL ends with ``/`` or is an existing directory) receives
        ``{file_id}.{ext}`` with the extension from the content type; any other URL is the file's
        name, which only works for a single file. (templated)
    :param source_file_id: The ``file_...`` id to copy. Give this or ``execution_id``. (templated)
    :param execution_id: Copy every output file of this COMPLETED execution. (templated)
    :param destination_conn_id: The Airflow connection for the destination store (e.g. an ``aws``
        connection for ``s3://``); None uses the store's default credentials. (templated)
    :param overwrite: What to do when a destination object already exists: ``"fail"`` (default:
        fail, checked for every file before any byte is copied, unless the object already has the
        same size and sha256, which counts as done so that retries work), ``"replace"`` (always
        write; atomically), or ``"skip_if_identical"`` (leave an identical object untouched,
        replace a different one).
    :param modelroute_conn_id: The Airflow connection to ModelRoute.
    :param chunk_size: Bytes read and written at a time; also the upload part size on object stores
        (at least 5 MiB there). Bounds the memory the copy uses.
    """

    template_fields: Sequence[str] = ("source_file_id", "execution_id", "destination", "destination_conn_id")
    ui_color = "#e3ecfa"

    def __init__(
        self,
        *,
        destination: str,
        source_file_id: str | None = None,
        execution_id: str | None = None,
        destination_conn_id: str | None = None,
        overwrite: str = "fail",
        modelroute_conn_id: str = "modelroute_default",
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.destination = destination
        self.source_file_id = source_file_id
        self.execution_id = execution_id
        self.destination_conn_id = destination_conn_id
        self.overwrite = overwrite
        self.modelroute_conn_id = modelroute_conn_id
        self.chunk_size = chunk_size
        self.records: list[dict[str, Any]] | None = None
        if overwrite not in OVERWRITE_MODES:
            raise ModelRouteConfigError(
                f"overwrite must be one of {', '.join(repr(m) for m in OVERWRITE_MODES)}, got {overwrite!r}"
            )
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
            raise ModelRouteConfigError(f"chunk_size must be a positive number of bytes, got {chunk_size!r}")
        if not (_is_deferred(source_file_id) or _is_deferred(execution_id)):
            self._check_source()
        if not _is_deferred(destination):
            self._check_destination()

    @cached_property
    def hook(self) -> ModelRouteHook:
        from airflow_provider_modelroute.hooks.modelroute import ModelRouteHook

        return ModelRouteHook(self.modelroute_conn_id)

    # -- validation -----------------------------------------------------------------------------

    def _check_source(self) -> None:
        given = [name for name in ("source_file_id", "execution_id") if getattr(self, name)]
        if len(given) != 1:
            shown = "neither was given" if not given else "both were given"
            raise ModelRouteConfigError(
                f"Give exactly one of source_file_id (a 'file_...' id) or execution_id (an 'exec_...' id "
                f"to copy all its output files); {shown}"
            )

    def _check_destination(self) -> None:
        if not isinstance(self.destination, str) or not self.destination.strip():
            raise ModelRouteConfigError(
                "destination must be an object storage URL such as 's3://bucket/prefix/' or "
                f"'file:///data/out/', got {self.destination!r}"
            )

    # -- the copy -------------------------------------------------------------------------------

    def execute(self, context: Context) -> list[dict[str, Any]]:
        self.records = self.transfer()  # kept for OpenLineage
        return self.records

    # -- OpenLineage (called by apache-airflow-providers-openlineage when installed) ------------

    def get_openlineage_facets_on_start(self) -> OperatorLineage:
        from airflow_provider_modelroute.lineage import to_storage_lineage

        return to_storage_lineage(self)

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> OperatorLineage:
        from airflow_provider_modelroute.lineage import to_storage_lineage

        return to_storage_lineage(self)

    def transfer(self) -> list[dict[str, Any]]:
        """Copy the file(s) and return their records (what ``execute`` does; usable outside a task)."""
        self._check_source()
        self._check_destination()
        destination = open_storage_path(self.destination, self.destination_conn_id, "destination")
        shown = display_uri(destination)
        check_writable(destination, shown, self.destination_conn_id)
        downloads: list[FileDownload] = []
        try:
            for file_id in self._file_ids():
                downloads.append(self.hook.download_file(file_id, chunk_size=self.chunk_size))
            with storage_errors(shown, self.destination_conn_id):
                targets = self._targets(destination, downloads)
                self._compare_existing(targets)
                return [self._copy(target) for target in targets]
        finally:
            for download in downloads:  # the responses opened ahead, when a file was not copied
                download.close()

    def _compare_existing(self, targets: list[_Target]) -> None:
        """Find the destinations that already hold their file; with "fail", refuse before copying any byte.

        An object with the same size and sha256 is the copy's own result (typically from an earlier
        try that failed on a later file), so it is never a conflict: that keeps retries working.
        """
        if self.overwrite == "replace":
            return
        present = [target for target in targets if target.existing_size is not None]
        if self.overwrite == "fail":  # the cheap check first, for every file
            for target in present:
                if target.download.size_bytes is None or target.existing_size != target.download.size_bytes:
                    raise _exists_error(target.uri)
        for target in present:
            target.identical_sha256 = self._identical(target)
            if target.identical_sha256 is None and self.overwrite == "fail":
                raise _exists_error(target.uri)

    def _file_ids(self) -> list[str]:
        if self.source_file_id:
            return [str(self.source_file_id)]
        execution_id = str(self.execution_id)
        execution = self.hook.get_execution(execution_id)
        status = str(execution.get("status"))
        if status != api.ExecutionStatus.COMPLETED.value:
            error = execution.get("error") or {}
            detail = f" ({error.get('code')}: {error.get('message')})" if error else ""
            if api.is_terminal(status):
                raise ModelRouteNoFilesError(
                    f"Execution {execution_id} ended {status}{detail}: it has no files to copy"
                )
            raise ModelRouteTransferError(
                f"Execution {execution_id} is {status}, not COMPLETED: wait for it first "
                "(ModelRouteExecuteOperator with wait_for_completion=True, or ModelRouteExecutionSensor)"
            )
        files = api.result_files(execution) or api.result_files(self.hook.get_execution_result(execution_id))
        file_ids = [str(entry["file_id"]) for entry in files]
        if not file_ids:
            raise ModelRouteNoFilesError(f"Execution {execution_id} is COMPLETED but has no output files")
        self.log.info("Execution %s has %d file(s) to copy", execution_id, len(file_ids))
        return file_ids

    def _targets(self, destination: Any, downloads: list[FileDownload]) -> list[_Target]:
        fs, root = destination.fs, destination.path
        with contextlib.suppress(Exception):
            fs.invalidate_cache(root)  # a cached listing must not hide objects written since
        is_folder = self.destination.endswith("/") or fs.isdir(root)
        if not is_folder and len(downloads) > 1:
            raise ModelRouteConfigError(
                f"destination {display_uri(destination)} names a single file, but there are "
                f"{len(downloads)} files to copy: end destination with '/' to copy them into a folder"
            )
        targets = []
        for download in downloads:
            path = (
                destination / f"{download.file_id}.{_extension(download.content_type)}"
                if is_folder
                else destination
            )
            existing_size = None
            with contextlib.suppress(FileNotFoundError):
                info = path.fs.info(path.path)
                if info.get("type") == "directory":
                    raise ModelRouteConfigError(
                        f"destination {display_uri(path)} is a directory: end destination with '/' to "
                        "copy into it"
                    )
                existing_size = int(info.get("size") or 0)
            targets.append(_Target(download, path, display_uri(path), existing_size))
        return targets

    def _copy(self, target: _Target) -> dict[str, Any]:
        download, path = target.download, target.path
        record = {
            "file_id": download.file_id,
            "uri": target.uri,
            "size_bytes": download.size_bytes,
            "content_type": download.content_type,
        }
        if target.identical_sha256 is not None:
            self.log.info(
                "%s already holds file %s (same size and sha256): left untouched",
                target.uri,
                download.file_id,
            )
            return {**record, "sha256": target.identical_sha256}
        self.log.info(
            "Copying ModelRoute file %s (%s, %s bytes) to %s",
            download.file_id,
            download.content_type,
            download.size_bytes,
            target.uri,
        )
        sha256, size = self._stream(download, path, target.uri)
        metrics.bytes_transferred("download", size)
        return {**record, "size_bytes": size, "sha256": sha256}

    def _identical(self, target: _Target) -> str | None:
        """The sha256 if the existing object equals the source (streams both, writes nothing)."""
        download = target.download
        if download.size_bytes is None or target.existing_size != download.size_bytes:
            return None
        with target.path.fs.open(target.path.path, "rb", block_size=self.chunk_size) as existing:
            existing_sha, _ = _sha256_of(existing, self.chunk_size)
        digest, size = hashlib.sha256(), 0
        progress = _Progress(
            self.log, f"Comparing file {download.file_id} with {target.uri}", download.size_bytes
        )
        for chunk in download:
            digest.update(chunk)
            size += len(chunk)
            progress.add(len(chunk))
        self._check_size(download, size)
        return existing_sha if digest.hexdigest() == existing_sha else None

    def _check_size(self, download: FileDownload, size: int) -> None:
        if download.size_bytes is not None and size != download.size_bytes:
            raise ModelRouteTransferError(
                f"File {download.file_id} arrived with {size} bytes, not the announced "
                f"{download.size_bytes}: nothing was published"
            )

    def _open_sink(self, path: Any) -> _LocalSink | _CommitOnCloseSink | _StagedSink:
        protocol = str(path.protocol or "file")
        block_size = max(_MIN_BLOCK_SIZE, self.chunk_size)
        if protocol in _LOCAL_PROTOCOLS:
            return _LocalSink(str(path.path))
        if protocol in _COMMIT_ON_CLOSE_PROTOCOLS:
            return _CommitOnCloseSink(path.fs, path.path, block_size)
        return _StagedSink(path.fs, path.path, block_size)

    def _stream(self, download: FileDownload, path: Any, uri: str) -> tuple[str, int]:
        """Stream one file into the destination; publish only verified bytes, leave nothing on failure."""
        fs, final = path.fs, path.path
        existed_before = fs.exists(final)
        digest, size = hashlib.sha256(), 0
        progress = _Progress(self.log, f"Copying file {download.file_id}", download.size_bytes)
        sink = self._open_sink(path)
        writer = _WriteBehind(sink)
        try:
            for chunk in download:
                writer.write(chunk)  # written by the thread while this one hashes and reads on
                digest.update(chunk)
                size += len(chunk)
                progress.add(len(chunk))
            writer.close()
            self._check_size(download, size)
            sink.finish(size)
            sink.publish(no_clobber=self.overwrite == "fail")
        except BaseException as exc:
            writer.cancel()
            sink.abort()
            # A local copy never touches the final name before the rename; an object that someone
            # else created meanwhile (the "fail" race) is theirs, not ours to remove.
            if not isinstance(sink, _LocalSink) and not isinstance(exc, ModelRouteDestinationExistsError):
                self._remove_unless_preexisting(fs, final, existed_before, uri)
            raise
        published = fs.info(final).get("size") if not isinstance(sink, _LocalSink) else size
        if published is not None and int(published) != size:
            self._remove_unless_preexisting(fs, final, False, uri)
            raise ModelRouteTransferError(
                f"{uri} holds {published} bytes after the copy, not {size}: removed it"
            )
        sha256 = digest.hexdigest()
        self.log.info(
            "Copied file %s to %s: %s; sha256 %s", download.file_id, uri, progress.describe(), sha256
        )
        return sha256, size

    def _remove_unless_preexisting(self, fs: Any, final: str, existed_before: bool, uri: str) -> None:
        """After a failure nothing new may remain at the final path (an older object is left as it was)."""
        if existed_before:
            return
        with contextlib.suppress(Exception):
            fs.invalidate_cache(final)
        try:
            if fs.exists(final):
                fs.rm(final)
                self.log.warning("Removed the incomplete object at %s", uri)
        except Exception as exc:
            self.log.error(
                "Could not check or remove %s after the failed copy (%s): remove it by hand", uri, exc
            )


class StorageToModelRouteOperator(BaseOperator):
    """
    Upload a file from any object storage to ModelRoute, for use as an execution input.

    The file streams from the source (it is re-opened for each upload attempt, so a dropped upload
    is retried), and its ``file_...`` id is the task's return value, ready for templating:
    ``input={"image": "{{ ti.xcom_pull(task_ids='upload') }}"}``. The full record (``file_id``,
    ``content_type``, ``size_bytes``, ``filename``, ``source``) is pushed under the XCom key ``file``.

    :param source: An ``ObjectStoragePath`` URL of the file (``s3://bucket/in/photo.png``,
        ``file:///data/photo.png``). (templated)
    :param source_conn_id: The Airflow connection for the source store; None uses the store's
        default credentials. (templated)
    :param filename: The file name to give ModelRoute. Default: the source's name. (templated)
    :param content_type: The file's MIME type. Default: guessed from the file name. (templated)
    :param purpose: ``"INPUT"`` (default: a file for an execution's input) or ``"UPLOAD"``.
    :param region: Where ModelRoute stores the file: ``"US"``, ``"EU"`` or ``"APAC"``. Default: the
        account's (``US``).
    :param ttl_days: Days until the file expires, 1-365. Default: the organization's.
    :param modelroute_conn_id: The Airflow connection to ModelRoute.
    """

    template_fields: Sequence[str] = ("source", "source_conn_id", "filename", "content_type")
    ui_color = "#e3ecfa"

    def __init__(
        self,
        *,
        source: str,
        source_conn_id: str | None = None,
        filename: str | None = None,
        content_type: str | None = None,
        purpose: str = "INPUT",
        region: str | None = None,
        ttl_days: int | None = None,
        modelroute_conn_id: str = "modelroute_default",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.source = source
        self.source_conn_id = source_conn_id
        self.filename = filename
        self.content_type = content_type
        self.purpose = purpose
        self.region = region
        self.ttl_days = ttl_days
        self.modelroute_conn_id = modelroute_conn_id
        self.record: dict[str, Any] | None = None
        if not _is_deferred(source) and (not isinstance(source, str) or not source.strip()):
            raise ModelRouteConfigError(
                f"source must be an object storage URL such as 's3://bucket/in/photo.png', got {source!r}"
            )
        _check_upload_options(purpose, region, ttl_days)

    @cached_property
    def hook(self) -> ModelRouteHook:
        from airflow_provider_modelroute.hooks.modelroute import ModelRouteHook

        return ModelRouteHook(self.modelroute_conn_id)

    def execute(self, context: Context) -> str:
        self.record = record = self.upload()  # kept for OpenLineage
        context["ti"].xcom_push(key="file", value=record)
        return str(record["file_id"])

    # -- OpenLineage (called by apache-airflow-providers-openlineage when installed) ------------

    def get_openlineage_facets_on_start(self) -> OperatorLineage:
        from airflow_provider_modelroute.lineage import upload_lineage

        return upload_lineage(self)

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> OperatorLineage:
        from airflow_provider_modelroute.lineage import upload_lineage

        return upload_lineage(self)

    def upload(self) -> dict[str, Any]:
        """Upload the file and return its record (what ``execute`` does; usable outside a task)."""
        source = open_storage_path(self.source, self.source_conn_id, "source")
        shown = display_uri(source)
        try:
            stat = source.stat()
        except FileNotFoundError:
            raise ModelRouteTransferError(f"source {shown} does not exist") from None
        if stat.get("type") == "directory":
            raise ModelRouteConfigError(f"source {shown} is a directory; point source at a file")
        size = int(stat.st_size)
        if size <= 0:
            raise ModelRouteConfigError(f"source {shown} is empty; ModelRoute does not accept empty files")
        filename = self.filename or source.name
        content_type = self.content_type or mimetypes.guess_type(filename)[0] or "application/octet-stream"
        self.log.info("Uploading %s (%s, %d bytes) to ModelRoute as %s", shown, content_type, size, filename)
        started = time.monotonic()
        result = self.hook.upload_file(
            lambda: source.open("rb"),
            filename=filename,
            content_type=content_type,
            size_bytes=size,
            purpose=self.purpose,
            region=self.region,
            ttl_days=self.ttl_days,
        )
        elapsed = max(time.monotonic() - started, 1e-6)
        metrics.bytes_transferred("upload", size)
        self.log.info(
            "Uploaded %s as ModelRoute file %s (%.1f MB/s)", shown, result["file_id"], size / elapsed / 1e6
        )
        return {**result, "filename": filename, "source": shown}
