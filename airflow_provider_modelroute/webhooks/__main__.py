"""``python -m airflow_provider_modelroute.webhooks {setup,list,test,delete}``: manage ModelRoute webhooks.

    python -m airflow_provider_modelroute.webhooks setup --conn-id modelroute_default \\
        --public-url https://airflow.example.com
"""

from __future__ import annotations

import argparse
import json
import sys

from airflow_provider_modelroute.exceptions import ModelRouteError


def run(args: argparse.Namespace) -> None:
    from airflow_provider_modelroute.webhooks.setup import modelroute_hook, setup_webhooks

    if args.command == "setup":
        wait = 0 if args.no_test else 30
        setup_webhooks(args.conn_id, args.public_url, replace=args.replace, wait_for_test=wait)
    elif args.command == "list":
        print(json.dumps(modelroute_hook(args.conn_id).list_webhook_endpoints(), indent=2))
    elif args.command == "test":
        print(json.dumps(modelroute_hook(args.conn_id).test_webhook_endpoint(args.endpoint_id)))
    else:
        modelroute_hook(args.conn_id).delete_webhook_endpoint(args.endpoint_id)
        print(f"Deleted {args.endpoint_id}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m airflow_provider_modelroute.webhooks", description=__doc__
    )
    parser.add_argument("--conn-id", default="modelroute_default", help="the ModelRoute connection")
    commands = parser.add_subparsers(dest="command", required=True)
    setup = commands.add_parser("setup", help="register the receiver and store its secret in the connection")
    setup.add_argument("--public-url", required=True, help="where ModelRoute reaches Airflow's api-server")
    setup.add_argument("--replace", action="store_true", help="re-register an already registered receiver")
    setup.add_argument("--no-test", action="store_true", help="skip the test delivery")
    commands.add_parser("list", help="list the account's webhook endpoints")
    for name in ("test", "delete"):
        command = commands.add_parser(name, help=f"{name} a webhook endpoint")
        command.add_argument("endpoint_id")
    args = parser.parse_args(argv)

    from airflow_provider_modelroute._compat import metadata_db_connections

    try:
        with metadata_db_connections():
            run(args)
    except ModelRouteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
