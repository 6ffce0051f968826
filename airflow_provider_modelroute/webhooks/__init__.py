"""Webhook mode: ModelRoute's deliveries end deferred waits (``mode``: the wait; ``receiver``: the
api-server plugin; ``python -m airflow_provider_modelroute.webhooks``: setup and checks)."""
