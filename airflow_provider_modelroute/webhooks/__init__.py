"""Webhook-driven completion: ModelRoute's deliveries end deferred waits; slow polling is the safety net.

``mode`` is what the operator, sensor and trigger use (settings, routes, the wait); ``receiver`` is
the Airflow 3.1+ api-server plugin that verifies deliveries and resumes tasks; ``python -m
airflow_provider_modelroute.webhooks`` registers the receiver with ModelRoute and checks it.
"""
