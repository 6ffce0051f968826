"""A ModelRoute-compatible server on loopback, for tests, demos, benchmarks and your own DAG tests.

    from airflow_provider_modelroute.testing import ModelRouteServer

    with ModelRouteServer() as server:
        os.environ.update(server.airflow_connection_env())  # modelroute_default -> this server
        server.add_fault("GET /v1/executions/{id}", "rate_limit", count=3)
        ...
        assert server.stats()["executions_created"] == 1

Run it standalone with ``python -m airflow_provider_modelroute.testing`` (``--help`` for its flags).
"""

from airflow_provider_modelroute.testing.remote import RemoteModelRouteServer
from airflow_provider_modelroute.testing.server import ModelRouteServer

__all__ = ["ModelRouteServer", "RemoteModelRouteServer"]
