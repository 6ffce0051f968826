"""Transfer: ModelRoute output files (10, 50, 150 MiB) to ``file://`` and to ``s3://``.

Methods, each measured in a fresh child interpreter (peak RSS growth = the kernel's RSS high-water
mark during the copy, reset just before it, minus RSS just before it):

* ``operator``: ``ModelRouteToStorageOperator(...).transfer()`` (airflow_provider_modelroute.transfers):
  what a task runs; streams with a sha256, and verifies before publishing (local files: fsync,
  size check, rename; S3: 5 MiB multipart upload committed at the end).
* ``hook + open("wb")``: ``ModelRouteHook().download_file(file_id)`` chunks written to
  ``ObjectStoragePath.open("wb")`` with its defaults (s3fs buffers 50 MiB blocks); for S3 also with
  ``block_size=5 MiB``, what the operator passes.
* ``curl -o``: curl fetching the same presigned URL to a local file, timed by curl itself
  (``%{time_total}``: from the start of the transfer to its end, so its process start is not counted,
  as the interpreter start is not counted on our side); ``curl -o + fsync`` adds an ``fsync`` of the
  file right after, timed alone: the same work as the operator's (which must fsync before it
  publishes), less its sha256 and rename.
* ``requests .content``: the docs' naive ``requests.get(url).content``, then written out.

Each round runs every case of one size once, in a fresh random order; each of ours is paired with
its baseline from the same round, and its ratio is the median of the per-pair ratios. Every child
waits ``--settle`` seconds before its copy starts, so that each copy finds memory in the same state:
on this VM a write into page-cache pages freed seconds earlier is several times faster than into
memory the kernel has meanwhile handed back to the host (free page reporting), and without the pause
whichever case ran right after another one's file was deleted got the fast pages.

The ModelRoute server and the S3 server (moto's ``ThreadedMotoServer``) each run in their own process.

    python benchmarks/bench_transfer.py            # 10, 50, 150 MiB; 5 rounds
    python benchmarks/bench_transfer.py --sizes 150 --dest file --rounds 7
    python benchmarks/bench_transfer.py --quick    # 2 MiB, one round, three cases: a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common

MIB = 1024 * 1024
CREDENTIALS = {"aws_access_key_id": "bench-key", "aws_secret_access_key": "bench-secret"}
#: label, the work each does besides fetching and writing the bytes (by destination), and the baseline
#: it is paired with: the curl run in the same child (curl writes only local files).
METHODS: dict[str, tuple[str, dict[str, str], str | None]] = {
    "operator": (
        "ModelRouteToStorageOperator.transfer()",
        {
            "file": "API call for the URL; sha256; fsync; size check; rename; directory fsync",
            "s3": "API call for the URL; sha256; 5 MiB parts, committed at the end",
        },
        "curl+fsync",
    ),
    "hook": (
        'hook.download_file() → open("wb")',
        {"file": "API call for the URL; no fsync", "s3": "API call for the URL; s3fs's 50 MiB parts"},
        "curl",
    ),
    "hook-5m": ('hook.download_file() → open("wb", block_size=5 MiB)', {"s3": "API call for the URL"}, None),
    "curl": ("curl -o (presigned URL)", {"file": "no fsync"}, None),
    "curl+fsync": ("curl -o, then fsync", {"file": "fsync"}, None),
    "requests": (
        "requests.get(url).content",
        {"file": "whole file in memory, then written; no fsync", "s3": "whole file in memory, then written"},
        "curl",
    ),
}
#: What each destination is written with (block_size only matters to S3); every local case runs curl too.
CASES = {
    "file": ("operator", "hook", "requests"),
    "s3": ("operator", "hook", "hook-5m", "requests"),
}
QUICK_CASES = {"file": ("operator", "hook"), "s3": ("operator",)}
OPERATOR_GOAL = 0.8
RSS_GOAL_MIB = 32


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


def _curl(local: str, url: str) -> dict[str, Any]:
    """curl's own transfer time, then an fsync of its file timed alone (process start not counted)."""
    started = time.perf_counter()
    completed = subprocess.run(
        ["curl", "-sS", "-f", "-o", local, "-w", "%{time_total}", url],
        check=True,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - started
    synced = time.perf_counter()
    fd = os.open(local, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync = time.perf_counter() - synced
    written = os.path.getsize(local)
    os.unlink(local)
    return {
        "elapsed": float(completed.stdout),
        "fsync": fsync,
        "process_wall": wall,
        "written": written,
    }


def child(cfg: dict[str, Any]) -> dict[str, Any]:
    """One of ours and, for local files, its curl baseline right before or after it (random order)."""
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

    import requests

    from airflow_provider_modelroute.hooks.modelroute import ModelRouteHook
    from airflow_provider_modelroute.transfers.modelroute import ModelRouteToStorageOperator
    from airflow_provider_modelroute.version_compat import object_storage_path

    path = object_storage_path(uri, conn_id)
    fs = path.fs
    # Warm up what a process pays once, not per byte: the filesystem (for S3 the botocore client),
    # and Airflow's lineage collector that ObjectStoragePath.open() files report every write to.
    scratch = object_storage_path(f"{uri}.warm-up", conn_id)
    with scratch.open("wb") as handle:
        handle.write(b"warm-up")
    scratch.unlink()
    hook = ModelRouteHook("modelroute_bench")
    hook.transport  # noqa: B018 - warm up: the connection lookup
    operator = ModelRouteToStorageOperator(
        task_id="bench",
        destination=uri,
        source_file_id=file_id,
        destination_conn_id=conn_id,
        overwrite="replace",
        modelroute_conn_id="modelroute_bench",
    )

    def ours() -> dict[str, Any]:
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

    sides = {"ours": ours}
    if dest == "file":
        sides["curl"] = lambda: _curl(f"{path.path}.curl", url)
    result = {}
    for side in random.sample(list(sides), len(sides)):
        time.sleep(float(cfg["settle"]))  # the same memory state for both: see the module docs
        result[side] = sides[side]()
    return result


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


def _make_file(server: dict[str, Any], size: int) -> str:
    """A COMPLETED ``test-file`` execution's output file of ``size`` bytes; returns its file id."""
    import requests

    with requests.Session() as session:
        session.headers["Authorization"] = f"Bearer {server['api_key']}"
        body = {"model": "test-file", "input": {"size_bytes": size, "_simulate": {"seconds": 0}}}
        execution_id = session.post(f"{server['base_url']}/v1/executions", json=body, timeout=30).json()["id"]
        for _ in range(200):
            execution = session.get(f"{server['base_url']}/v1/executions/{execution_id}", timeout=30).json()
            if execution["status"] == "COMPLETED":
                return str(execution["result"]["file_id"])
            time.sleep(0.05)
    raise RuntimeError(f"execution {execution_id} did not complete")


def _presigned_url(server: dict[str, Any], file_id: str) -> str:
    """A fresh presigned URL for the baselines (never printed: it carries a signature)."""
    import requests

    response = requests.get(
        f"{server['base_url']}/v1/files/{file_id}/url",
        headers={"Authorization": f"Bearer {server['api_key']}"},
        timeout=30,
    )
    return str(response.json()["url"])


Runs = dict[tuple[int, str, str], list[dict[str, Any]]]  # (size, dest, method) -> one result per round


def _measure(args: argparse.Namespace, sizes: list[int], cases: dict[str, tuple[str, ...]]) -> Runs:
    """Every case of every size, ``args.rounds`` interleaved rounds per size.

    A local case's child also runs curl: its result ``{"ours": ..., "curl": ...}`` is one pair.
    """
    import boto3

    script = os.path.abspath(__file__)
    workdir = tempfile.mkdtemp(prefix="modelroute-bench-transfer-")
    runs: Runs = {}
    try:
        with (
            # the presigned-URL reading of /download, as measured: the same URL for curl and for us
            common.local_server(
                "--pending-seconds", "0", "--processing-seconds", "0", "--dialect", "presigned"
            ) as server,
            moto_server() if "s3" in cases else nullcontext("") as endpoint,
        ):
            bucket = f"bench-{uuid.uuid4().hex[:10]}"
            if endpoint:
                boto3.client(
                    "s3", endpoint_url=endpoint, region_name="us-east-1", **CREDENTIALS
                ).create_bucket(Bucket=bucket)
            for size in sizes:
                file_id = _make_file(server, size)
                size_cases = [(dest, method) for dest, methods in cases.items() for method in methods]
                for _, (dest, method) in common.interleaved(size_cases, args.rounds):
                    cfg = {
                        "method": method,
                        "dest": dest,
                        "file_id": file_id,
                        "url": _presigned_url(server, file_id),
                        "workdir": workdir,
                        "bucket": bucket,
                        "s3_endpoint": endpoint,
                        "airflow_conn": server["airflow_conn"],
                        "settle": args.settle,
                        "case": f"{method} {dest} {size}",
                    }
                    result = common.run_child(script, cfg)
                    for side, run in result.items():
                        if run["written"] != size:
                            raise RuntimeError(
                                f"{side} ({method} to {dest}) wrote {run['written']} of {size} bytes"
                            )
                    runs.setdefault((size, dest, method), []).append(result)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return runs


def _speed(size: int, run: dict[str, Any], with_fsync: bool = False) -> float:
    return size / MIB / (run["elapsed"] + (run["fsync"] if with_fsync else 0.0))


def parent(args: argparse.Namespace) -> int:
    quick = args.quick
    sizes = [2 * MIB] if quick else [int(mib) * MIB for mib in args.sizes.split(",")]
    cases = {
        dest: methods for dest, methods in (QUICK_CASES if quick else CASES).items() if dest in args.dest
    }
    print(common.header("Transfer: ModelRoute file → file:// and s3://", quick))
    print(
        f"{args.rounds} round(s) per size, every case once per round in a random order. Each local case's "
        "child also runs curl, right before or after it (random order): that is the case's pair. Every "
        f"copy starts after a {args.settle:g} s pause. MiB/s: the median run; ÷ baseline: the median of "
        "the per-pair ratios (each pair's in brackets); RSS growth: the worst run. curl's time is its own "
        "`%{time_total}` (its process start excluded, as the interpreter start is on our side); "
        "curl + fsync adds the time of an fsync of its file right after.\n"
    )
    runs = _measure(args, sizes, cases)

    rows, paired = [], {}
    for (size, dest, method), done in runs.items():
        label, work, baseline = METHODS[method]
        speeds = [_speed(size, result["ours"]) for result in done]
        versus = "—"
        if dest == "file" and baseline:
            curl = [_speed(size, result["curl"], baseline == "curl+fsync") for result in done]
            paired[(size, dest, method)] = common.Paired(speeds, curl)
            versus = f"{paired[(size, dest, method)].shown()} {METHODS[baseline][0]}"
        growth = f"{max(result['ours']['rss_growth'] for result in done) / MIB:.1f}"
        order = (size, dest != "file", list(METHODS).index(method))
        rows.append(
            [
                order,
                f"{size // MIB} MiB",
                f"{dest}://",
                label,
                work[dest],
                f"{common.median(speeds):.0f}",
                versus,
                growth,
            ]
        )
    curl_runs: dict[int, list[dict[str, Any]]] = {}
    for (size, _, _), done in runs.items():
        curl_runs.setdefault(size, []).extend(result["curl"] for result in done if "curl" in result)
    for size, done in curl_runs.items():
        for method, with_fsync in (("curl", False), ("curl+fsync", True)):
            label, work, _ = METHODS[method]
            mib_s = common.median([_speed(size, r, with_fsync) for r in done])
            order = (size, False, list(METHODS).index(method))
            rows.append(
                [
                    order,
                    f"{size // MIB} MiB",
                    "file://",
                    label,
                    work["file"],
                    f"{mib_s:.0f}",
                    "baseline",
                    "—",
                ]
            )
    rows = [row[1:] for row in sorted(rows)]
    headers = ["size", "to", "method", "work besides the copy", "MiB/s", "÷ baseline", "peak RSS growth MiB"]
    print(common.table(headers, rows))
    every_curl = [r for done in curl_runs.values() for r in done]
    if every_curl:
        overhead = common.median([1000 * (r["process_wall"] - r["elapsed"]) for r in every_curl])
        fsync_share = common.median([r["fsync"] / (r["elapsed"] + r["fsync"]) for r in every_curl])
        print(
            f"\n({len(every_curl)} curl runs; their process start and exit, not counted above: "
            f"{overhead:.0f} ms median; the fsync: {100 * fsync_share:.0f} % of curl + fsync, median.)"
        )
    print()

    goals = []
    for method in ("operator", "hook", "hook-5m"):
        ratios = {size: pair for (size, dest, m), pair in paired.items() if m == method and dest == "file"}
        if method == "operator" and ratios:
            worst = min(pair.ratio for pair in ratios.values())
            goals.append(
                common.goal(
                    f"{METHODS[method][0]} ≥ {OPERATOR_GOAL}x curl + fsync to file://",
                    worst >= OPERATOR_GOAL,
                    ", ".join(f"{size // MIB} MiB: {pair.ratio:.2f}x" for size, pair in ratios.items()),
                )
            )
        for dest in ("file", "s3"):
            growths = [
                max(result["ours"]["rss_growth"] for result in done) / MIB
                for (size, d, m), done in runs.items()
                if m == method and d == dest
            ]
            if growths:
                goals.append(
                    common.goal(
                        f"{METHODS[method][0]}: peak RSS growth < {RSS_GOAL_MIB} MiB to {dest}://",
                        max(growths) < RSS_GOAL_MIB,
                        " / ".join(f"{g:.1f}" for g in growths) + " MiB by size",
                    )
                )
    common.print_goals(goals, quick)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: one 2 MiB file, one round")
    parser.add_argument("--sizes", default="10,50,150", help="file sizes in MiB (default: 10,50,150)")
    parser.add_argument("--dest", default="file,s3", help="destinations (default: file,s3)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per size (default: 5)")
    parser.add_argument("--settle", type=float, default=3.0, help="pause before each copy, s (default: 3)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--moto", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.moto:
        _moto_main()
        return 0
    if args.child:
        common.report(child(json.loads(args.child)))
        return 0
    if args.quick:
        args.rounds, args.settle = 1, 0.0
    args.dest = args.dest.split(",")
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())
