"""The OpenLineage methods every operator of the provider shares; cheap to import.

``apache-airflow-providers-openlineage`` calls them when it is installed. OpenLineage is optional and
slow to import, so :mod:`airflow_provider_modelroute.utils.openlineage` is imported only then.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from airflow.providers.openlineage.extractors import OperatorLineage


class OpenLineageMixin:
    """Lineage at start and on completion alike, from what the task knows at the time.

    ``openlineage_builder``: the name of the function in ``utils/openlineage.py`` that builds it.
    """

    openlineage_builder: ClassVar[str]

    def get_openlineage_facets_on_start(self) -> OperatorLineage:
        from airflow_provider_modelroute.utils import openlineage

        builder = getattr(openlineage, self.openlineage_builder)
        return builder(self)

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> OperatorLineage:
        return self.get_openlineage_facets_on_start()
