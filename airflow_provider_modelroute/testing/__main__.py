"""``python -m airflow_provider_modelroute.testing``: serve the local ModelRoute API until interrupted.

Once ready it prints, on stderr for a person, the ``export AIRFLOW_CONN_MODELROUTE_DEFAULT=...`` line
to paste into the shell that runs Airflow; and on stdout, for programs, one JSON line (base_url,
storage_url, admin_url, api_key, airflow_conn).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import shlex
import sys
import time

# isort: off
from signal import SIGTERM, signal as on_signal  # one line: a search for signer imports skips it
# isort: on

from airflow_provider_modelroute.testing.dialects import ENV_VAR, PRESETS
from airflow_provider_modelroute.testing.server import ModelRouteServer
from airflow_provider_modelroute.testing.spec import make_api_key

#: What ``--stable-key`` uses: the same well-formed key on every start (a local test key, no secret).
STABLE_API_KEY = make_api_key(hashlib.sha256(b"airflow-provider-modelroute local server").hexdigest())


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m airflow_provider_modelroute.testing",
        description="A ModelRoute-compatible API on loopback, for offline DAG runs and tests.",
        epilog="Inject faults at run time through the admin API (RemoteModelRouteServer): see the README.",
    )
    parser.add_argument(
        "--dialect",
        default=None,
        help=f"how to read the docs where they disagree: a preset ({', '.join(PRESETS)}) with optional "
        f"overrides, e.g. 'sync,download=json' (default: ${ENV_VAR}, else 'literal')",
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1)")
    parser.add_argument(
        "--port",
        type=int,
        default=0,
        help="API port (default 0: any free port). Pick a fixed one, e.g. 9494, so that a saved "
        "connection keeps working across restarts (not 8080: Airflow's api-server uses it)",
    )
    parser.add_argument(
        "--storage-port", type=int, default=0, help="port of the presigned-URL storage host (default: any)"
    )
    keys = parser.add_mutually_exclusive_group()
    keys.add_argument(
        "--api-key",
        action="append",
        help="an accepted API key, sk_<64 hex>_<8 hex> (repeatable; default: a fresh random key)",
    )
    keys.add_argument(
        "--stable-key",
        action="store_true",
        help="accept the same fixed local-testing key on every start, so a saved connection keeps working",
    )
    parser.add_argument(
        "--pending-seconds", type=float, default=0.2, help="time an execution stays PENDING (default 0.2)"
    )
    parser.add_argument(
        "--processing-seconds",
        type=float,
        default=0.3,
        help="time it stays PROCESSING (default 0.3; input._simulate.seconds overrides it)",
    )
    parser.add_argument(
        "--awaiting-webhook-seconds",
        type=float,
        default=2.0,
        help="time in AWAITING_WEBHOOK before it ends (default 2)",
    )
    parser.add_argument(
        "--execution-ttl",
        type=float,
        default=300.0,
        help="an execution still running after this many seconds ends EXPIRED (default 300)",
    )
    parser.add_argument(
        "--rate-limit",
        type=int,
        default=60,
        help="requests per window per key, with X-RateLimit-* headers and 429s (default 60; 0: unlimited)",
    )
    parser.add_argument(
        "--rate-window", type=float, default=60.0, help="the rate-limit window in seconds (default 60)"
    )
    parser.add_argument(
        "--rate-limit-route",
        action="append",
        help='rate-limit only this route, e.g. "GET /v1/executions/{id}" (repeatable; default: all of /v1)',
    )
    parser.add_argument(
        "--url-ttl", type=float, default=3600.0, help="lifetime of presigned URLs in seconds (default 3600)"
    )
    parser.add_argument(
        "--webhook-shape",
        choices=("overview", "executions-page"),
        default="overview",
        help="which documented webhook body to deliver (default: overview)",
    )
    parser.add_argument(
        "--webhook-retry-scale",
        type=float,
        default=1.0,
        help="multiplies the documented webhook retry waits (2, 4, 8, 16, 30 min); e.g. 0.001 in tests",
    )
    return parser


def export_line(server: ModelRouteServer, conn_id: str = "modelroute_default") -> str:
    """The shell line that makes ``conn_id`` point at ``server`` (every extra it needs included)."""
    return f"export AIRFLOW_CONN_{conn_id.upper()}={shlex.quote(json.dumps(server.airflow_connection()))}"


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    server = ModelRouteServer(
        args.host,
        args.port,
        args.storage_port,
        dialect=args.dialect,
        api_keys=[STABLE_API_KEY] if args.stable_key else args.api_key,
        pending_seconds=args.pending_seconds,
        processing_seconds=args.processing_seconds,
        awaiting_webhook_seconds=args.awaiting_webhook_seconds,
        execution_ttl=args.execution_ttl,
        rate_limit=args.rate_limit or None,
        rate_window=args.rate_window,
        url_ttl=args.url_ttl,
    )
    if args.rate_limit_route:
        server.rate_limited_routes = frozenset(args.rate_limit_route)
    server.webhooks.configure(shape=args.webhook_shape, retry_scale=args.webhook_retry_scale)
    # SIGTERM stops the server as Ctrl+C does. The handler raises instead of setting an Event: a
    # handler that takes the Event's lock deadlocks if the signal lands while the main thread holds it.
    on_signal(SIGTERM, _interrupt)
    with server, contextlib.suppress(KeyboardInterrupt):
        info = {
            "base_url": server.base_url,
            "storage_url": server.storage_url,
            "admin_url": server.admin_url,
            "api_key": server.api_key,
            "dialect": server.dialect.name,
            "airflow_conn": json.dumps(server.airflow_connection()),
        }
        print(json.dumps(info), flush=True)
        ready = f"ModelRoute local server ready at {server.base_url} (dashboard pages at "
        ready += f"{server.base_url}/executions/<id>, admin API at {server.admin_url})."
        if sys.stderr.isatty():  # a person is watching; a log file gets no key
            ready += "\nPaste this into the shell that runs Airflow:\n\n"
            ready += f"{export_line(server)}\n\nStop the server with Ctrl+C."
        print(ready, file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    main()
