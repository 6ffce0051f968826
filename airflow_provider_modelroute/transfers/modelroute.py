"""Copy ModelRoute files to any Airflow object storage, and upload files from it to ModelRoute.

Downloads stream chunk by chunk from the presigned URL (the hook resumes with ``Range`` and refreshes
an expired URL) into the destination while a sha256 is computed; memory does not grow with the file,
and nothing is published until the byte count matches ``size_bytes`` (see ``publish.py``).

Cheap to import (DAG files import it at every parse): the hook (HTTP clients) and
``ObjectStoragePath`` (fsspec) are imported only when a task runs.
"""

from __future__ import annotations

import contextlib
import mimetypes
import time
from collections.abc import Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow_provider_modelroute import api, metrics
from airflow_provider_modelroute.exceptions import (
    ModelRouteConfigError,
    ModelRouteTransferError,
    raise_for_execution,
)
from airflow_provider_modelroute.transfers.publish import (
    Target,
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
    from airflow_provider_modelroute.hooks.modelroute import FileDownload, ModelRouteHook
    from airflow_provider_modelroute.version_compat import Context

#: What ``overwrite`` accepts.
OVERWRITE_MODES = ("fail", "replace", "skip_if_identical")
DEFAULT_CHUNK_SIZE = 5 * 1024 * 1024


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


def _check_choice(name: str, value: Any, choices: Sequence[Any], *, optional: bool = False) -> None:
    if value not in choices and not (optional and value is None):
        shown = ", ".join(repr(choice) for choice in choices) + (" (or None)" if optional else "")
        raise ModelRouteConfigError(f"{name} must be one of {shown}, got {value!r}")


def _is_whole(value: Any, low: int, high: float = float("inf")) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _is_deferred(value: Any) -> bool:
    """True for a value only known when the task runs: a Jinja template or an XComArg."""
    if value is None:
        return False
    return not isinstance(value, str) or "{{" in value or "{%" in value


class _TransferMixin(OpenLineageMixin):
    """What both transfers share: the ModelRoute hook, built when the task runs.

    A plain mixin, not a ``BaseOperator``: Airflow reads the operator arguments' defaults from the
    ``__init__`` of every ``BaseOperator`` subclass in the MRO, and would take ``BaseOperator``'s.
    """

    ui_color = "#e3ecfa"
    modelroute_conn_id: str

    @cached_property
    def hook(self) -> ModelRouteHook:
        from airflow_provider_modelroute.hooks.modelroute import ModelRouteHook

        return ModelRouteHook(self.modelroute_conn_id)


class ModelRouteToStorageOperator(_TransferMixin, BaseOperator):
    """
    Copy ModelRoute files (one file, or every output file of an execution) to any object storage.

    The bytes stream from ModelRoute to the destination chunk by chunk, with a sha256 computed on
    the way; a file is published only once its byte count matches the announced ``size_bytes``, and
    a failed copy leaves nothing behind at the destination (``publish.py`` says how, per store).
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
        self.records: list[dict[str, Any]] | None = None  # kept for OpenLineage
        _check_choice("overwrite", overwrite, OVERWRITE_MODES)
        if not _is_whole(chunk_size, 1):
            raise ModelRouteConfigError(f"chunk_size must be a positive number of bytes, got {chunk_size!r}")
        if not (_is_deferred(source_file_id) or _is_deferred(execution_id)):
            self._check_source()
        if not _is_deferred(destination):
            self._check_destination()

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

    def execute(self, context: Context) -> list[dict[str, Any]]:
        self.records = self.transfer()
        assets.record_landed_files(context, self.execution_id, self.records)
        return self.records

    def transfer(self) -> list[dict[str, Any]]:
        """Copy the file(s) and return their records (what ``execute`` does; usable outside a task)."""
        self._check_source()
        self._check_destination()
        destination = open_storage_path(self.destination, self.destination_conn_id, "destination")
        shown = api.display_uri(destination)
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

    def _targets(self, destination: Any, downloads: list[FileDownload]) -> list[Target]:
        fs, root = destination.fs, destination.path
        with contextlib.suppress(Exception):
            fs.invalidate_cache(root)  # a cached listing must not hide objects written since
        is_folder = self.destination.endswith("/") or fs.isdir(root)
        if not is_folder and len(downloads) > 1:
            raise ModelRouteConfigError(
                f"destination {api.display_uri(destination)} names a single file, but there are "
                f"{len(downloads)} files to copy: end destination with '/' to copy them into a folder"
            )
        targets = []
        for download in downloads:
            media_type = download.content_type.split(";")[0].strip().lower()
            extension = api.CONTENT_TYPE_EXTENSIONS.get(media_type, "bin")
            path = destination / f"{download.file_id}.{extension}" if is_folder else destination
            existing_size = None
            with contextlib.suppress(FileNotFoundError):
                info = path.fs.info(path.path)
                if info.get("type") == "directory":
                    raise ModelRouteConfigError(
                        f"destination {api.display_uri(path)} is a directory: end destination with '/' to "
                        "copy into it"
                    )
                existing_size = int(info.get("size") or 0)
            targets.append(Target(download, path, api.display_uri(path), existing_size))
        return targets

    def _compare_existing(self, targets: list[Target]) -> None:
        """Find the destinations that already hold their file; with "fail", refuse before copying any byte.

        An object with the same size and sha256 is the copy's own result (typically from an earlier
        try that failed on a later file), so it is never a conflict: that keeps retries working.
        """
        if self.overwrite == "replace":
            return
        present = [target for target in targets if target.existing_size is not None]
        if self.overwrite == "fail":  # the cheap check first, for every file
            for target in present:
                if target.existing_size != target.download.size_bytes:
                    raise exists_error(target.uri)
        for target in present:
            target.identical_sha256 = identical_sha256(target, chunk_size=self.chunk_size, log=self.log)
            if target.identical_sha256 is None and self.overwrite == "fail":
                raise exists_error(target.uri)

    def _copy(self, target: Target) -> dict[str, Any]:
        download = target.download
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
        no_clobber = self.overwrite == "fail"
        sha256, size = publish(target, no_clobber=no_clobber, chunk_size=self.chunk_size, log=self.log)
        metrics.bytes_transferred("download", size)
        return {**record, "size_bytes": size, "sha256": sha256}


class StorageToModelRouteOperator(_TransferMixin, BaseOperator):
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
        if not _is_deferred(source) and (not isinstance(source, str) or not source.strip()):
            raise ModelRouteConfigError(
                f"source must be an object storage URL such as 's3://bucket/in/photo.png', got {source!r}"
            )
        _check_choice("purpose", purpose, api.UPLOAD_PURPOSES)
        _check_choice("region", region, api.UPLOAD_REGIONS, optional=True)
        low, high = api.TTL_DAYS_RANGE
        if ttl_days is not None and not _is_whole(ttl_days, low, high):
            raise ModelRouteConfigError(
                f"ttl_days must be a whole number of days from {low} to {high} (or None: the organization's "
                f"default), got {ttl_days!r}"
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
        elapsed = max(time.monotonic() - started, 1e-6)
        metrics.bytes_transferred("upload", size)
        self.log.info(
            "Uploaded %s as ModelRoute file %s (%.1f MB/s)", shown, result["file_id"], size / elapsed / 1e6
        )
        return {**result, "filename": filename, "source": shown}
