"""Destination storage errors, said in the task's terms: the URI, ``destination_conn_id`` and what to do.

A missing bucket or denied access will not fix itself: those fail the task without retries, and
are checked before any byte is downloaded. Other storage errors (timeouts, throttling) stay
retryable.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from airflow_provider_modelroute._compat import AirflowFailException
from airflow_provider_modelroute.exceptions import ModelRouteError, ModelRouteTransferError

#: Object stores whose first path segment is a bucket (or container) that must already exist.
_BUCKET_PROTOCOLS = frozenset({"s3", "s3a", "s3n", "gs", "gcs", "abfs", "abfss", "az", "adl"})


class ModelRouteStorageError(ModelRouteTransferError):
    """The destination store failed; a retry may succeed."""


class ModelRouteStorageAccessError(ModelRouteStorageError, AirflowFailException):
    """The destination's bucket does not exist or access is denied: no retry can fix that."""


def _describe(uri: str, conn_id: str | None) -> str:
    via = (
        f"destination_conn_id={conn_id!r}"
        if conn_id
        else "the store's default credentials (no destination_conn_id)"
    )
    return f"destination {uri} (through {via})"


@contextmanager
def storage_errors(uri: str, conn_id: str | None) -> Iterator[None]:
    """Turn the store's own errors into ones that name the destination, the connection and the fix."""
    try:
        yield
    except ModelRouteError:
        raise
    except FileNotFoundError as exc:
        raise ModelRouteStorageAccessError(
            f"Cannot write to {_describe(uri, conn_id)}: {exc}. Create the bucket (or container) or fix "
            "the destination URL."
        ) from exc
    except PermissionError as exc:
        raise ModelRouteStorageAccessError(
            f"Cannot write to {_describe(uri, conn_id)}: access denied ({exc}). Give that connection's "
            "credentials write access (e.g. s3:PutObject), or set destination_conn_id to one that has it."
        ) from exc
    except OSError as exc:
        raise ModelRouteStorageError(
            f"Writing to {_describe(uri, conn_id)} failed: {type(exc).__name__}: {exc}. Check that the "
            "store is reachable with that connection; the task's retries will try again."
        ) from exc


def check_writable(path: Any, uri: str, conn_id: str | None) -> None:
    """Before any download: the bucket (or the nearest existing local directory) is there and writable."""
    with storage_errors(uri, conn_id):
        protocol = str(path.protocol or "file")
        if protocol in ("file", "local"):
            directory = str(path.path)
            while directory and not os.path.isdir(directory):
                directory = os.path.dirname(directory.rstrip("/")) or "/"
            if not os.access(directory, os.W_OK | os.X_OK):
                raise PermissionError(f"{directory} is not writable by this worker")
        elif protocol in _BUCKET_PROTOCOLS and getattr(path, "bucket", None):
            # Airflow 2.11's path keeps the connection id in it: "conn@bucket"
            bucket = str(path.bucket).rpartition("@")[2]
            try:
                path.fs.info(bucket)  # FileNotFoundError: no such bucket; PermissionError: denied
            except FileNotFoundError:
                path.fs.ls(bucket)  # older s3fs (Airflow 3.0's) cannot head some buckets: list it
