"""TaskFlow decorators (``@task.modelroute``)."""
