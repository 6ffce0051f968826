"""The OpenLineage methods every operator of the provider shares; cheap to import (OpenLineage is not)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from airflow.providers.openlineage.extractors import OperatorLineage


class OpenLineageMixin:
    """Lineage at start and on completion alike, built by ``utils.openlineage.<openlineage_builder>``."""

    openlineage_builder: ClassVar[str]

    def get_openlineage_facets_on_start(self) -> OperatorLineage:
        from airflow_provider_modelroute.utils import openlineage

        return getattr(openlineage, self.openlineage_builder)(self)

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> OperatorLineage:
        return self.get_openlineage_facets_on_start()
