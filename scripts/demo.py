"""`make demo`: start the local ModelRoute server, run one execution through the hook, save the PNG."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from airflow_provider_modelroute import api
from airflow_provider_modelroute.hooks.modelroute import ModelRouteHook
from airflow_provider_modelroute.testing import ModelRouteServer


def main() -> None:
    with ModelRouteServer() as server:
        os.environ.update(server.airflow_connection_env())
        hook = ModelRouteHook()
        execution = hook.create_execution("flux-1.1-pro", {"prompt": "a lighthouse at dawn"})
        while not api.is_terminal(execution["status"]):
            time.sleep(0.2)
            execution = hook.get_execution(execution["id"])
        file_id = api.result_files(execution)[0]["file_id"]
        target = Path(tempfile.mkdtemp(prefix="modelroute-demo-")) / f"{file_id}.png"
        with target.open("wb") as out:
            for chunk in hook.download_file(file_id):
                out.write(chunk)
    print(
        f"Execution {execution['id']} {execution['status']}: wrote {target} ({target.stat().st_size} bytes)"
    )


if __name__ == "__main__":
    main()
