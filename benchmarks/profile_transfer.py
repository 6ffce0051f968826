"""Where the transfer operator's time goes: its copy to ``file://`` with one piece changed at a time.

Each variant of ``ModelRouteToStorageOperator(...).transfer()`` is paired with ``curl -o`` + fsync of the
same presigned URL, the two in a random order, each after the same pause (see bench_transfer.py for
why); a variant's figure is the median of its per-pair ratios. The variants patch
``transfers/publish.py`` for the duration of one copy: its local write size, its writer thread
(replaced by writing inline), its sha256 (replaced by nothing) or fsync.
Only the shipped operator keeps every guarantee; the others only show what each piece costs.

    python benchmarks/profile_transfer.py            # 150 MiB, 5 rounds
    python benchmarks/profile_transfer.py --quick    # 2 MiB, one round: a smoke run
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from functools import partial
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common
import bench_transfer

MIB = 1024 * 1024


class _Inline:
    """The writer thread's executor interface, writing in the caller's thread."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __enter__(self) -> _Inline:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def submit(self, write: Callable[..., Any], *args: Any) -> Future[Any]:
        future: Future[Any] = Future()
        future.set_result(write(*args))
        return future


class _NoHash:
    def update(self, chunk: bytes) -> None:
        pass

    def hexdigest(self) -> str:
        return ""


@contextmanager
def _patched(module: Any, write_size: int | None, inline: bool, sha256: bool, fsync: bool) -> Iterator[None]:
    saved = (module._LOCAL_WRITE_SIZE, module.ThreadPoolExecutor, module.hashlib, os.fsync)
    if write_size:
        module._LOCAL_WRITE_SIZE = write_size
    if inline:
        module.ThreadPoolExecutor = _Inline
    if not sha256:
        module.hashlib = types.SimpleNamespace(sha256=_NoHash)
    if not fsync:
        os.fsync = lambda fd: None
    try:
        yield
    finally:
        module._LOCAL_WRITE_SIZE, module.ThreadPoolExecutor, module.hashlib, os.fsync = saved


#: label -> (local write size or None for the shipped one, inline writes, sha256, fsync)
VARIANTS: dict[str, tuple[int | None, bool, bool, bool]] = {
    "as shipped (writer thread, 128 KiB writes)": (None, False, True, True),
    "1 MiB writes, no writer thread": (MIB, True, True, True),
    "1 MiB writes": (MIB, False, True, True),
    "no writer thread": (None, True, True, True),
    "no sha256": (None, False, False, True),
    "no fsync (of the file and its directory)": (None, False, True, False),
}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 MiB, one round, no pause")
    parser.add_argument("--size", type=int, default=150, help="file size in MiB (default: 150)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (default: 5)")
    parser.add_argument("--settle", type=float, default=3.0, help="pause before each copy, s (default: 3)")
    args = parser.parse_args()
    size, rounds, settle = (2 * MIB, 1, 0.0) if args.quick else (args.size * MIB, args.rounds, args.settle)
    common.airflow_env()
    print(common.header("Transfer: where the operator's time goes (to file://)", args.quick))
    workdir = tempfile.mkdtemp(prefix="modelroute-bench-profile-")
    local = os.path.join(workdir, "copy.bin")
    speeds: dict[str, list[float]] = {label: [] for label in VARIANTS}
    curl_speeds: dict[str, list[float]] = {label: [] for label in VARIANTS}
    with common.local_server("--pending-seconds", "0", "--processing-seconds", "0") as server:
        os.environ["AIRFLOW_CONN_MODELROUTE_BENCH"] = server["airflow_conn"]
        from airflow_provider_modelroute.transfers import modelroute as transfers
        from airflow_provider_modelroute.transfers import publish
        from airflow_provider_modelroute.version_compat import object_storage_path

        file_id = bench_transfer._make_file(server, size)
        object_storage_path(f"file://{local}", None).fs  # noqa: B018 - warm up: the filesystem registry

        def ours(variant: tuple[int | None, bool, bool, bool]) -> float:
            operator = transfers.ModelRouteToStorageOperator(
                task_id="profile",
                destination=f"file://{local}",
                source_file_id=file_id,
                overwrite="replace",
                modelroute_conn_id="modelroute_bench",
            )
            with _patched(publish, *variant):
                started = time.perf_counter()
                operator.transfer()
                return time.perf_counter() - started

        def curl() -> float:
            url = bench_transfer._presigned_url(server, file_id)
            out = subprocess.run(
                ["curl", "-sS", "-f", "-o", local, "-w", "%{time_total}", url],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            started = time.perf_counter()
            fd = os.open(local, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            return float(out) + time.perf_counter() - started

        for _, label in common.interleaved(list(VARIANTS), rounds):
            sides: dict[str, Callable[[], float]] = {"ours": partial(ours, VARIANTS[label]), "curl": curl}
            elapsed = {}
            for side in random.sample(list(sides), 2):
                time.sleep(settle)
                elapsed[side] = sides[side]()
                os.unlink(local)
            speeds[label].append(size / MIB / elapsed["ours"])
            curl_speeds[label].append(size / MIB / elapsed["curl"])
    os.rmdir(workdir)
    print(
        f"{size // MIB} MiB, {rounds} round(s), every variant once per round in a random order, each "
        f"paired with curl + fsync (random order, {settle:g} s pause before each copy). MiB/s: the "
        "median run; ÷ curl + fsync: the median of the per-pair ratios (each pair's in brackets).\n"
    )
    paired = {label: common.Paired(speeds[label], curl_speeds[label]) for label in VARIANTS}
    rows = [[label, f"{common.median(speeds[label]):.0f}", paired[label].shown()] for label in VARIANTS]
    print(common.table(["operator", "MiB/s", "÷ curl + fsync"], rows))
    print()
    shipped = paired[next(iter(VARIANTS))].ratio
    goal = bench_transfer.OPERATOR_GOAL
    common.print_goals(
        [common.goal(f"the shipped operator ≥ {goal}x curl + fsync", shipped >= goal, f"{shipped:.2f}x")],
        args.quick,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
