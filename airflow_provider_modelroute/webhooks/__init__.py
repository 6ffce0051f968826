"""Webhook-driven completion: ModelRoute's deliveries end deferred waits; slow polling is the safety net.

Pure parts (no Airflow server imports): ``signing`` (verify/sign), ``events`` (both body shapes),
``routing`` (per-execution URLs and tokens), ``config`` (the connection's webhook extras). The
receiver (``receiver``, an Airflow 3.1+ api-server plugin: ``plugin``) and the setup CLI
(``python -m airflow_provider_modelroute.webhooks``) import Airflow's server side on use.
"""
