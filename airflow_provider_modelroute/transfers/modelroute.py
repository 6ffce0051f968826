"""Copy ModelRoute files to any Airflow object storage, and upload files from it to ModelRoute.

Cheap to import: the hook (HTTP clients) and ``ObjectStoragePath`` (fsspec) load when a task runs.
"""

from __future__ import annotations

import contextlib
import mimetypes
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow_provider_modelroute import api, metrics
from airflow_provider_modelroute.exceptions import (
    ModelRouteConfigError,
    ModelRouteTransferError,
    raise_for_execution,
)
from airflow_provider_modelroute.operators.modelroute import ModelRouteHookMixin
from airflow_provider_modelroute.transfers.publish import (
    check_writable,
    exists_error,
    identical_sha256,
    publish,
    storage_errors,
)
from airflow_provider_modelroute.utils import assets
from airflow_provider_modelroute.utils.openlineage_mixin import OpenLineageMixin
from airflow_provider_modelroute.version_compat import (
    AirflowNotFoundException,
    BaseOperator,
    object_storage_path,
)

if TYPE_CHECKING:
    from airflow_provider_modelroute.hooks.modelroute import FileDownload
    from airflow_provider_modelroute.version_compat import Context

OVERWRITE_MODES = ("fail", "replace", "skip_if_identical")
_URL = "an object storage URL such as"


def open_storage_path(url: str, conn_id: str | None, field: str) -> Any:
    """The ``ObjectStoragePath`` a task argument names; one Airflow cannot open fails the task at once."""
    try:
        path = object_storage_path(url, conn_id or None)
        path.fs  # noqa: B018 - resolves the filesystem and the connection now, not mid-copy
    except (ValueError, ImportError, AirflowNotFoundException) as exc:
        reason = str(exc).replace(url, api.display_uri(url))  # never the URL's user info
        raise ModelRouteConfigError(
            f"{field} {api.display_uri(url)!r} cannot be opened ({type(exc).__name__}: {reason}): use a URL "
            f"whose scheme Airflow has a filesystem for (file://, or s3://, gs://... with that "
            f"provider installed) and check {field}_conn_id"
        ) from None
    return path


def _is_deferred(value: Any) -> bool:
    """True for a value only known when the task runs: a Jinja template or an XComArg."""
    return value is not None and (not isinstance(value, str) or "{{" in value or "{%" in value)


def _is_url(value: Any) -> bool:
    return _is_deferred(value) or (isinstance(value, str) and bool(value.strip()))


def _is_whole(value: Any, low: int, high: float = float("inf")) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _check(*arguments: tuple[str, Any, bool, str | Sequence[Any]]) -> None:
    """Refuse the first argument (name, value, valid, what it must be or its choices) that is not valid."""
    for name, value, valid, expected in arguments:
        if not valid:
            shown = expected if isinstance(expected, str) else "one of " + ", ".join(map(repr, expected))
            raise ModelRouteConfigError(f"{name} must be {shown}, got {value!r}")


class _TransferMixin(ModelRouteHookMixin, OpenLineageMixin):
    """What both transfers share: the hook and lineage (a mixin: Airflow reads defaults from each
    ``BaseOperator.__init__`` in the MRO)."""

    ui_color = "#e3ecfa"


class ModelRouteToStorageOperator(_TransferMixin, BaseOperator):
    """
    Copy ModelRoute files (one file, or every output file of an execution) to any object storage.

    Each file streams to the destination with its sha256 computed on the way, and is published only
    once complete (``publish.py``); the presigned URL is never logged, returned or put in an error.
    Returns one record per file: ``file_id``, ``uri`` (without credentials), ``size_bytes``,
    ``content_type`` and ``sha256``.

    :param destination: An ``ObjectStoragePath`` URL. A folder (ends with ``/`` or is an existing
        directory) receives ``{file_id}.{ext}``; any other URL names the one file. (templated)
    :param source_file_id: The ``file_...`` id to copy. Give this or ``execution_id``. (templated)
    :param execution_id: Copy every output file of this COMPLETED execution. (templated)
    :param destination_conn_id: The Airflow connection for the destination store; None uses the
        store's default credentials. (templated)
    :param overwrite: When the destination exists: ``"fail"`` (unless it already holds the same
        bytes, so that retries work), ``"replace"`` or ``"skip_if_identical"``.
    :param modelroute_conn_id: The Airflow connection to ModelRoute.
    :param chunk_size: Bytes read and written at a time; also the upload part size on object stores.
    """

    template_fields: Sequence[str] = ("source_file_id", "execution_id", "destination", "destination_conn_id")
    openlineage_builder = "to_storage_lineage"

    def __init__(
        self,
        *,
        destination: str,
        source_file_id: str | None = None,
        execution_id: str | None = None,
        destination_conn_id: str | None = None,
        overwrite: str = "fail",
        modelroute_conn_id: str = "modelroute_default",
        chunk_size: int = 5 * 1024 * 1024,
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
        self.records: list[dict[str, Any]] | None = None  # kept for OpenLineage
        self._check_arguments()

    def _check_arguments(self) -> None:
        sources = (self.source_file_id, self.execution_id)
        if not any(map(_is_deferred, sources)) and sum(map(bool, sources)) != 1:
            raise ModelRouteConfigError(
                "Give exactly one of source_file_id (a 'file_...' id) or execution_id (an 'exec_...' id "
                f"to copy all its output files); {'both were' if all(sources) else 'neither was'} given"
            )
        _check(
            ("overwrite", self.overwrite, self.overwrite in OVERWRITE_MODES, OVERWRITE_MODES),
            ("chunk_size", self.chunk_size, _is_whole(self.chunk_size, 1), "a positive number of bytes"),
            ("destination", self.destination, _is_url(self.destination), f"{_URL} 's3://bucket/out/'"),
        )

    def execute(self, context: Context) -> list[dict[str, Any]]:
        self.records = self.transfer()
        assets.record_landed_files(context, self.execution_id, self.records)
        return self.records

    def transfer(self) -> list[dict[str, Any]]:
        """Copy the file(s) and return their records (what ``execute`` does; usable outside a task)."""
        self._check_arguments()
        destination = open_storage_path(self.destination, self.destination_conn_id, "destination")
        shown = api.display_uri(destination)
        check_writable(destination, shown, self.destination_conn_id)
        downloads: list[FileDownload] = []
        try:
            for file_id in self._file_ids():
                downloads.append(self.hook.download_file(file_id, chunk_size=self.chunk_size))
            with storage_errors(shown, self.destination_conn_id):
                plan = self._plan(destination, downloads)
                return [self._copy(download, path, done) for download, path, done in plan]
        finally:
            for download in downloads:  # the responses opened ahead, when a file was not copied
                download.close()

    def _file_ids(self) -> list[str]:
        if self.source_file_id:
            return [str(self.source_file_id)]
        execution_id = str(self.execution_id)
        execution = self.hook.get_execution(execution_id)
        status = str(execution.get("status"))
        if status != api.ExecutionStatus.COMPLETED.value:
            raise_for_execution(execution, final=True)  # ended without files: no retry can change that
            raise ModelRouteTransferError(
                f"Execution {execution_id} is {status}, not COMPLETED: wait for it first "
                "(ModelRouteExecuteOperator with wait_for_completion=True, or ModelRouteExecutionSensor)"
            )
        files = api.result_files(execution) or api.result_files(self.hook.get_execution_result(execution_id))
        if not files:
            raise ModelRouteConfigError(f"Execution {execution_id} is COMPLETED but has no output files")
        self.log.info("Execution %s has %d file(s) to copy", execution_id, len(files))
        return [str(entry["file_id"]) for entry in files]

    def _plan(
        self, destination: Any, downloads: list[FileDownload]
    ) -> list[tuple[FileDownload, Any, str | None]]:
        """Each file's path and the sha256 of an identical object already there; with "fail", any other
        object there fails the task before a byte is copied."""
        fs = destination.fs
        with contextlib.suppress(Exception):
            fs.invalidate_cache(destination.path)  # a cached listing must not hide objects written since
        is_folder = self.destination.endswith("/") or fs.isdir(destination.path)
        if not is_folder and len(downloads) > 1:
            raise ModelRouteConfigError(
                f"destination {api.display_uri(destination)} names a single file, but there are "
                f"{len(downloads)} files to copy: end destination with '/' to copy them into a folder"
            )
        plan = []
        for download in downloads:
            extension = api.CONTENT_TYPE_EXTENSIONS.get(download.content_type.lower(), "bin")
            path = destination / f"{download.file_id}.{extension}" if is_folder else destination
            identical = None
            with contextlib.suppress(FileNotFoundError):  # nothing there yet
                if self.overwrite != "replace" and fs.info(path.path).get("size") == download.size_bytes:
                    identical = identical_sha256(download, path, self.chunk_size)
                if identical is None and self.overwrite == "fail":
                    raise exists_error(api.display_uri(path))
            plan.append((download, path, identical))
        return plan

    def _copy(self, download: FileDownload, path: Any, identical: str | None) -> dict[str, Any]:
        uri = api.display_uri(path)
        record = {"file_id": download.file_id, "uri": uri, "content_type": download.content_type}
        if identical is not None:
            self.log.info("%s already holds file %s (same size and sha256): kept", uri, download.file_id)
            return {**record, "size_bytes": download.size_bytes, "sha256": identical}
        self.log.info("Copying file %s (%s bytes) to %s", download.file_id, download.size_bytes, uri)
        started = time.monotonic()
        no_clobber = self.overwrite == "fail"
        sha256, size = publish(download, path, uri, no_clobber=no_clobber, chunk_size=self.chunk_size)
        metrics.bytes_transferred("download", size)
        rate = size / max(time.monotonic() - started, 1e-6) / 1e6
        self.log.info("Copied file %s to %s (%.1f MB/s); sha256 %s", download.file_id, uri, rate, sha256)
        return {**record, "size_bytes": size, "sha256": sha256}


class StorageToModelRouteOperator(_TransferMixin, BaseOperator):
    """
    Upload a file from any object storage to ModelRoute, for use as an execution input.

    The source is re-opened for each upload attempt. Returns the ``file_...`` id, e.g. for
    ``input={"image": "{{ ti.xcom_pull(task_ids='upload') }}"}``; the full record (``file_id``,
    ``content_type``, ``size_bytes``, ``filename``, ``source``) goes to the XCom key ``file``.

    :param source: An ``ObjectStoragePath`` URL of the file (``s3://bucket/in/photo.png``). (templated)
    :param source_conn_id: The Airflow connection for the source store; None uses the store's
        default credentials. (templated)
    :param filename: The file name to give ModelRoute. Default: the source's name. (templated)
    :param content_type: The file's MIME type. Default: guessed from the file name. (templated)
    :param purpose: ``"INPUT"`` (default) or ``"UPLOAD"``.
    :param region: ``"US"``, ``"EU"`` or ``"APAC"``. Default: the account's (``US``).
    :param ttl_days: Days until the file expires, 1-365. Default: the organization's.
    :param modelroute_conn_id: The Airflow connection to ModelRoute.
    """

    template_fields: Sequence[str] = ("source", "source_conn_id", "filename", "content_type")
    openlineage_builder = "upload_lineage"

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
        self.record: dict[str, Any] | None = None  # kept for OpenLineage
        low, high = api.TTL_DAYS_RANGE
        ttl_ok = ttl_days is None or _is_whole(ttl_days, low, high)
        _check(
            ("source", source, _is_url(source), f"{_URL} 's3://bucket/in/photo.png'"),
            ("purpose", purpose, purpose in api.UPLOAD_PURPOSES, api.UPLOAD_PURPOSES),
            ("region", region, region is None or region in api.UPLOAD_REGIONS, (*api.UPLOAD_REGIONS, None)),
            ("ttl_days", ttl_days, ttl_ok, f"a whole number of days from {low} to {high}, or None"),
        )

    def execute(self, context: Context) -> str:
        self.record = record = self.upload()
        context["ti"].xcom_push(key="file", value=record)
        return str(record["file_id"])

    def upload(self) -> dict[str, Any]:
        """Upload the file and return its record (what ``execute`` does; usable outside a task)."""
        source = open_storage_path(self.source, self.source_conn_id, "source")
        shown = api.display_uri(source)
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
        metrics.bytes_transferred("upload", size)
        rate = size / max(time.monotonic() - started, 1e-6) / 1e6
        self.log.info("Uploaded %s as ModelRoute file %s (%.1f MB/s)", shown, result["file_id"], rate)
        return {**result, "filename": filename, "source": shown}
