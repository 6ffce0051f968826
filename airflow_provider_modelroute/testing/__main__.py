"""``python -m airflow_provider_modelroute.testing``: serve the local ModelRoute API until interrupted.

Prints one JSON line (base_url, storage_url, admin_url, api_key, airflow_conn) once it is ready.
"""

from __future__ import annotations

import argparse
import json
import signal
import threading

from airflow_provider_modelroute.testing.dialects import ENV_VAR, PRESETS
from airflow_provider_modelroute.testing.server import ModelRouteServer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--dialect",
        default=None,
        help=f"how to read the docs where they disagree: a preset ({', '.join(PRESETS)}) with optional "
        f"overrides, e.g. 'sync,download=json' (default: ${ENV_VAR}, else 'literal')",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="API port (0: any free port)")
    parser.add_argument("--storage-port", type=int, default=0, help="presigned storage port")
    parser.add_argument("--api-key", action="append", help="accepted key (repeatable; default: a fresh one)")
    parser.add_argument("--pending-seconds", type=float, default=0.2)
    parser.add_argument("--processing-seconds", type=float, default=0.3)
    parser.add_argument("--awaiting-webhook-seconds", type=float, default=2.0)
    parser.add_argument("--execution-ttl", type=float, default=300.0)
    parser.add_argument(
        "--rate-limit", type=int, default=60, help="requests per window per key (0: unlimited, no headers)"
    )
    parser.add_argument("--rate-window", type=float, default=60.0)
    parser.add_argument("--url-ttl", type=float, default=3600.0)
    parser.add_argument("--webhook-shape", choices=("overview", "executions-page"), default="overview")
    parser.add_argument("--webhook-retry-scale", type=float, default=1.0, help="x the documented retry waits")
    args = parser.parse_args(argv)

    server = ModelRouteServer(
        args.host,
        args.port,
        args.storage_port,
        dialect=args.dialect,
        api_keys=args.api_key,
        pending_seconds=args.pending_seconds,
        processing_seconds=args.processing_seconds,
        awaiting_webhook_seconds=args.awaiting_webhook_seconds,
        execution_ttl=args.execution_ttl,
        rate_limit=args.rate_limit or None,
        rate_window=args.rate_window,
        url_ttl=args.url_ttl,
    )
    server.webhooks.configure(shape=args.webhook_shape, retry_scale=args.webhook_retry_scale)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    with server:
        info = {
            "base_url": server.base_url,
            "storage_url": server.storage_url,
            "admin_url": server.admin_url,
            "api_key": server.api_key,
            "dialect": server.dialect.name,
            "airflow_conn": json.dumps(server.airflow_connection()),
        }
        print(json.dumps(info), flush=True)
        stop.wait()


if __name__ == "__main__":
    main()
