"""What the benchmark scripts share: an isolated Airflow home, the local server in its own process,
fresh-interpreter children that report JSON, interleaved and paired comparisons, and Markdown tables.

Every measurement runs in a child interpreter (``python <script> --child <json>``) so imports, RSS and
CPU time of one case never leak into the next; the parent only orchestrates and prints.

Comparisons are interleaved and paired: each round runs every case once, in a fresh random order
(:func:`interleaved`), so drift on a shared machine hits all cases alike; ours and its baseline from
the same round form a pair, and a comparison is the median of the per-pair ratios
(:class:`Paired`), never a ratio of medians taken per side.
"""

from __future__ import annotations

import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULT_PREFIX = "BENCH-RESULT "


def airflow_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """Point Airflow at a throwaway home (before anything imports airflow); returns the variables set."""
    target = os.environ if env is None else env
    if "AIRFLOW_HOME" not in target or "modelroute-bench-" not in target["AIRFLOW_HOME"]:
        target["AIRFLOW_HOME"] = tempfile.mkdtemp(prefix="modelroute-bench-")
    target["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
    # This environment sets PYTHONDONTWRITEBYTECODE and the venv holds no bytecode, so every fresh
    # interpreter would compile Airflow from source (~3 s). Keep bytecode in a cache outside the
    # venv instead, as a deployment with compiled bytecode imports it.
    target.pop("PYTHONDONTWRITEBYTECODE", None)
    target.setdefault("PYTHONPYCACHEPREFIX", os.path.join(tempfile.gettempdir(), "modelroute-bench-pycache"))
    target["AIRFLOW__LOGGING__LOGGING_LEVEL"] = "CRITICAL"  # neither side of a comparison pays for logs
    return dict(target)


@contextmanager
def local_server(*args: str) -> Iterator[dict[str, Any]]:
    """``python -m airflow_provider_modelroute.testing`` in its own process (its own GIL and core).

    Yields the JSON line the server prints (base_url, storage_url, admin_url, api_key, airflow_conn).
    """
    env = airflow_env(dict(os.environ))
    # as measured before the server read the docs literally: no rate limit, no AWAITING_WEBHOOK pause
    defaults = ["--rate-limit", "0", "--awaiting-webhook-seconds", "0"]
    process = subprocess.Popen(
        [sys.executable, "-m", "airflow_provider_modelroute.testing", *defaults, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        cwd=REPO,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(f"the local ModelRoute server did not start (exit code {process.wait()})")
        info = json.loads(line)
        info["pid"] = process.pid
        yield info
    finally:
        stop(process)


def stop(process: subprocess.Popen[Any]) -> None:
    """SIGTERM a server process, and SIGKILL it if it has not exited 15 s later."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def run_child(script: str, config: dict[str, Any], timeout: float = 900) -> dict[str, Any]:
    """Run ``script --child <config>`` in a fresh interpreter and return the JSON it reports."""
    env = airflow_env(dict(os.environ))
    completed = subprocess.run(
        [sys.executable, script, "--child", json.dumps(config)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=timeout,
    )
    for line in reversed(completed.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            # Progress on stderr: a run that dies midway still leaves what it measured.
            print(
                f"[bench] {config.get('case') or config.get('impl')}: {line[len(RESULT_PREFIX) :]}",
                file=sys.stderr,
            )
            return dict(json.loads(line[len(RESULT_PREFIX) :]))
    shown = {k: v for k, v in config.items() if "key" not in k and "conn" not in k}  # no API keys
    raise RuntimeError(
        f"benchmark child failed (exit {completed.returncode}) for {config.get('case', shown)}:\n"
        f"{completed.stderr[-3000:]}"
    )


def report(result: dict[str, Any]) -> None:
    """Called by a child: hand the result to the parent."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (``fraction`` in 0..1); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[index]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (numbers already formatted by the caller)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def interleaved(cases: Sequence[Any], rounds: int, seed: int | None = None) -> Iterator[tuple[int, Any]]:
    """(round, case) for every case once per round, each round in a fresh random order."""
    rng = random.Random(seed)
    for round_index in range(rounds):
        order = list(cases)
        rng.shuffle(order)
        for case in order:
            yield round_index, case


@dataclass
class Paired:
    """One comparison: ours and the baseline measured in the same rounds (``ours[i]`` with ``theirs[i]``)."""

    ours: list[float]
    theirs: list[float]

    @property
    def ratios(self) -> list[float]:
        """ours ÷ baseline for each round's pair."""
        return [a / b if b else float("nan") for a, b in zip(self.ours, self.theirs, strict=True)]

    @property
    def ratio(self) -> float:
        """The median of the per-pair ratios: what a comparison reports."""
        return median(self.ratios)

    def shown(self) -> str:
        """The median ratio and, with more than one pair, every pair's ratio: ``0.85x (0.81, 0.85, 0.9)``."""
        text = f"{self.ratio:.2f}x"
        if len(self.ratios) > 1:
            text += f" ({', '.join(f'{r:.2f}' for r in self.ratios)})"
        return text


async def first_event(trigger: Any) -> Any:
    """Run a trigger until its first event, as a triggerer would, and return the event's payload."""
    generator = trigger.run()
    try:
        async for event in generator:
            return event.payload
    finally:
        await generator.aclose()
    return None


def ratio(ours: float, theirs: float) -> str:
    if not theirs or theirs != theirs or ours != ours:
        return "n/a"
    return f"{ours / theirs:.2f}x"


def verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def goal(text: str, met: bool, detail: str) -> str:
    """One goal's line, as every bench prints it: ``- <goal>: met|MISSED (<figures>)``."""
    return f"- {text}: {verdict(met)} ({detail})"


def print_goals(lines: Sequence[str], quick: bool) -> None:
    """The goals, each met or missed; a quick run says its verdicts are only a smoke test."""
    print("Goals" + (" (quick run: a smoke test, not a measurement)" if quick else "") + ":\n")
    print("\n".join(lines))


def machine() -> str:
    """One line about the machine, for the head of every table."""
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions = []
    for dist in ("apache-airflow", "apache-airflow-providers-http", "httpx", "aiohttp"):
        try:
            from importlib.metadata import version

            versions.append(f"{dist} {version(dist)}")
        except Exception:
            continue
    return (
        f"{os.cpu_count()} CPUs ({model}), Python {platform.python_version()}, {', '.join(versions)}; "
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}, load average {load()}, commit {commit()}"
    )


def load() -> str:
    """The 1/5/15-minute load averages: how busy the (shared) machine was."""
    try:
        return " / ".join(f"{value:.1f}" for value in os.getloadavg())
    except OSError:
        return "unknown"


def commit() -> str:
    """The checked-out commit, marked when the work tree has changes."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return (
        f"{head} (with uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no") else head
    )


def header(title: str, quick: bool) -> str:
    return f"### {title}{' (quick)' if quick else ''}\n\n{machine()}\n"
