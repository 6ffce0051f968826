"""Transfer: ModelRoute output files (10, 50, 150 MiB) to ``file://`` and to ``s3://``.

Methods, each measured in a fresh child interpreter (peak RSS growth = the kernel's RSS high-water
mark during the copy, reset just before it, minus RSS just before it):

* ``operator``: ``ModelRouteToStorageOperator(...).transfer()`` (airflow_provider_modelroute.transfers):
  what a task runs; streams with a sha256, and verifies before publishing (local files: fsync,
  size check, rename; S3: 5 MiB multipart upload committed at the end).
* ``hook + open("wb")``: ``ModelRouteHook().download_file(file_id)`` chunks written to
  ``ObjectStoragePath.open("wb")`` with its defaults (s3fs buffers 50 MiB blocks); for S3 also with
  ``block_size=5 MiB``, what the operator passes.
* ``curl -o``: curl fetching the same presigned URL to a local file (the reference for ``file://``).
* ``requests .content``: the docs' naive ``requests.get(url).content``, then written out.

The ModelRoute server and the S3 server (moto's ``ThreadedMotoServer``) each run in their own process.

    python benchmarks/bench_transfer.py            # 10, 50, 150 MiB; median of 3 runs
    python benchmarks/bench_transfer.py --quick    # 2 MiB, one run, fewer methods: a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common

MIB = 1024 * 1024
CREDENTIALS = {"aws_access_key_id": "bench-key", "aws_secret_access_key": "bench-secret"}
LABELS = {
    "operator": "ModelRouteToStorageOperator.transfer()",
    "hook": 'hook.download_file() → open("wb")',
    "hook-5m": 'hook.download_file() → open("wb", block_size=5 MiB)',
    "curl": "curl -o (presigned URL)",
    "requests": "requests.get(url).content",
}
#: What each destination is written with (curl only writes local files; block_size only matters to S3).
CASES = {
    "file": ("operator", "hook", "curl", "requests"),
    "s3": ("operator", "hook", "hook-5m", "requests"),
}
QUICK_CASES = {"file": ("operator", "hook", "curl", "requests"), "s3": ("operator", "hook")}


# -- child: one copy in a fresh interpreter ---------------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


class _PeakRss:
    """Highest RSS during the block: the kernel's high-water mark (``VmHWM``), reset just before it.

    Exact and free (no sampler thread competing for the GIL); where the mark cannot be reset, a
    thread samples RSS every 5 ms instead.
    """

    def __init__(self) -> None:
        self.base = _status_kib("VmRSS") * 1024
        self.peak = self.base
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")  # reset VmHWM to the current RSS (Linux 4.0+)
        except OSError:
            self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _status_kib("VmRSS") * 1024)

    def __enter__(self) -> _PeakRss:
        if self._thread is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        else:
            self.peak = _status_kib("VmHWM") * 1024
        self.peak = max(self.peak, _status_kib("VmRSS") * 1024)

    @property
    def growth(self) -> int:
        return max(0, self.peak - self.base)


def child(cfg: dict[str, Any]) -> dict[str, Any]:
    method, dest, file_id = cfg["method"], cfg["dest"], cfg["file_id"]
    os.environ["AIRFLOW_CONN_MODELROUTE_BENCH"] = cfg["airflow_conn"]
    os.environ["AIRFLOW_CONN_AWS_BENCH"] = json.dumps(
        {
            "conn_type": "aws",
            "login": CREDENTIALS["aws_access_key_id"],
            "password": CREDENTIALS["aws_secret_access_key"],
            "extra": {"endpoint_url": cfg.get("s3_endpoint"), "region_name": "us-east-1"},
        }
    )
    url = cfg["url"]
    if dest == "file":
        uri, conn_id = f"file://{cfg['workdir']}/{uuid.uuid4().hex}.bin", None
    else:
        uri, conn_id = f"s3://{cfg['bucket']}/{uuid.uuid4().hex}.bin", "aws_bench"

    if method == "curl":
        local = uri.removeprefix("file://")
        started = time.perf_counter()
        subprocess.run(["curl", "-sS", "-f", "-o", local, url], check=True)
        elapsed = time.perf_counter() - started
        written = os.path.getsize(local)
        os.unlink(local)
        maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        return {"elapsed": elapsed, "written": written, "rss_growth": None, "curl_maxrss": maxrss}

    import requests

    from airflow_provider_modelroute._compat import object_storage_path
    from airflow_provider_modelroute.hooks.modelroute import ModelRouteHook
    from airflow_provider_modelroute.transfers.modelroute import ModelRouteToStorageOperator

    path = object_storage_path(uri, conn_id)
    fs = path.fs
    # Warm up what a process pays once, not per byte: the filesystem (for S3 the botocore client),
    # and Airflow's lineage collector that ObjectStoragePath.open() files report every write to.
    scratch = object_storage_path(f"{uri}.warm-up", conn_id)
    with scratch.open("wb") as handle:
        handle.write(b"warm-up")
    scratch.unlink()
    hook = ModelRouteHook("modelroute_bench")
    hook.core  # noqa: B018 - warm up: the connection lookup
    operator = ModelRouteToStorageOperator(
        task_id="bench",
        destination=uri,
        source_file_id=file_id,
        destination_conn_id=conn_id,
        overwrite="replace",
        modelroute_conn_id="modelroute_bench",
    )
    with _PeakRss() as rss:
        started = time.perf_counter()
        if method == "operator":
            operator.transfer()
        elif method in ("hook", "hook-5m"):
            download = hook.download_file(file_id)
            options = {"block_size": 5 * MIB} if method == "hook-5m" else {}
            with path.open("wb", **options) as handle:
                for chunk in download:
                    handle.write(chunk)
        else:
            data = requests.get(url, timeout=300).content
            if dest == "file":
                with open(path.path, "wb") as handle:
                    handle.write(data)
            else:
                path.write_bytes(data)
            del data
        elapsed = time.perf_counter() - started
    fs.invalidate_cache()
    written = int(fs.size(path.path))
    fs.rm(path.path)
    return {"elapsed": elapsed, "written": written, "rss_growth": rss.growth}


# -- parent -------------------------------------------------------------------------------------------


def _moto_main() -> None:
    """``--moto``: serve S3 on loopback in this process until SIGTERM; print the endpoint."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    print(json.dumps({"endpoint": f"http://{host}:{port}"}), flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    server.stop()


@contextmanager
def moto_server() -> Iterator[str]:
    process = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--moto"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=common.airflow_env(dict(os.environ)),
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line:
            raise RuntimeError("the moto S3 server did not start")
        yield str(json.loads(line)["endpoint"])
    finally:
        common.stop(process)


def _make_file(server: dict[str, Any], size: int) -> tuple[str, str]:
    """A COMPLETED ``test-file`` execution's output: (file_id, presigned URL). The URL is never printed."""
    import requests

    with requests.Session() as session:
        session.headers["Authorization"] = f"Bearer {server['api_key']}"
        body = {"model": "test-file", "input": {"size_bytes": size, "_simulate": {"seconds": 0}}}
        execution_id = session.post(f"{server['base_url']}/v1/executions", json=body, timeout=30).json()["id"]
        for _ in range(200):
            execution = session.get(f"{server['base_url']}/v1/executions/{execution_id}", timeout=30).json()
            if execution["status"] == "COMPLETED":
                break
            time.sleep(0.05)
        file_id = execution["result"]["file_id"]
        url = session.get(f"{server['base_url']}/v1/files/{file_id}/url", timeout=30).json()["url"]
    return file_id, url


def parent(quick: bool) -> int:
    import boto3

    script = os.path.abspath(__file__)
    sizes = [2 * MIB] if quick else [10 * MIB, 50 * MIB, 150 * MIB]
    runs = 1 if quick else 3
    workdir = tempfile.mkdtemp(prefix="modelroute-bench-transfer-")
    print(common.header("Transfer: ModelRoute file → file:// and s3://", quick))
    print(f"Throughput is the median of {runs} run(s); RSS growth is the worst run.\n")
    results: list[dict[str, Any]] = []
    try:
        with (
            # the presigned-URL reading of /download, as measured: the same URL for curl and for us
            common.local_server(
                "--pending-seconds", "0", "--processing-seconds", "0", "--dialect", "presigned"
            ) as server,
            moto_server() as endpoint,
        ):
            bucket = f"bench-{uuid.uuid4().hex[:10]}"
            boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **CREDENTIALS).create_bucket(
                Bucket=bucket
            )
            for size in sizes:
                file_id, url = _make_file(server, size)
                for dest, methods in (QUICK_CASES if quick else CASES).items():
                    for method in methods:
                        cfg = {
                            "method": method,
                            "dest": dest,
                            "size": size,
                            "file_id": file_id,
                            "url": url,
                            "workdir": workdir,
                            "bucket": bucket,
                            "s3_endpoint": endpoint,
                            "airflow_conn": server["airflow_conn"],
                            "case": f"{method} {dest} {size}",
                        }
                        runs_of = [common.run_child(script, cfg) for _ in range(runs)]
                        for run in runs_of:
                            if run["written"] != size:
                                raise RuntimeError(
                                    f"{method} to {dest} wrote {run['written']} of {size} bytes"
                                )
                        elapsed = common.median([r["elapsed"] for r in runs_of])
                        growths = [r["rss_growth"] for r in runs_of if r["rss_growth"] is not None]
                        results.append(
                            {
                                "method": method,
                                "dest": dest,
                                "size": size,
                                "mib_s": size / MIB / elapsed,
                                "rss_growth": max(growths) if growths else None,
                                "curl_maxrss": runs_of[0].get("curl_maxrss"),
                            }
                        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    def curl_speed(size: int) -> float:
        return next(r["mib_s"] for r in results if r["method"] == "curl" and r["size"] == size)

    rows = []
    for r in results:
        growth = (
            f"{r['rss_growth'] / MIB:.1f}"
            if r["rss_growth"] is not None
            else f"(curl's own max RSS {r['curl_maxrss'] / MIB:.0f} MiB)"
        )
        rows.append(
            [
                f"{r['size'] // MIB} MiB",
                f"{r['dest']}://",
                LABELS[r["method"]],
                f"{r['mib_s']:.0f}",
                common.ratio(r["mib_s"], curl_speed(r["size"])),
                growth,
            ]
        )
    print(common.table(["size", "to", "method", "MiB/s", "÷ curl", "peak RSS growth MiB"], rows))
    print()

    goals = []
    for method in ("operator", "hook", "hook-5m"):
        if not any(r["method"] == method for r in results):
            continue
        ratios = [
            r["mib_s"] / curl_speed(r["size"])
            for r in results
            if r["method"] == method and r["dest"] == "file"
        ]
        line = f"- {LABELS[method]}:"
        if ratios:
            line += (
                f" ≥ 0.8x curl to file:// {common.verdict(min(ratios) >= 0.8)} (worst {min(ratios):.2f}x);"
            )
        for dest in ("file", "s3"):
            growths = [r["rss_growth"] / MIB for r in results if r["method"] == method and r["dest"] == dest]
            if growths:
                line += (
                    f" RSS growth < 32 MiB to {dest}:// {common.verdict(max(growths) < 32)} "
                    f"({' / '.join(f'{g:.1f}' for g in growths)} MiB by size);"
                )
        goals.append(line.rstrip(";"))
    print("\n".join(goals))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: one 2 MiB file, one run")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--moto", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.moto:
        _moto_main()
        return 0
    if args.child:
        common.report(child(json.loads(args.child)))
        return 0
    return parent(args.quick)


if __name__ == "__main__":
    sys.exit(main())
