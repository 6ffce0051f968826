"""``@task.modelroute``: the function returns an execution's request; the task runs it and returns its result.

The function returns the model's input as a dict, e.g. ``{"prompt": "a red fox"}``, or a dict of
``input`` and any of ``model``, ``metadata``, ``webhook_url`` (use this form when the input itself has an
``input`` or ``model`` field). The rest is ``ModelRouteExecuteOperator``'s (its parameters are the
decorator's), waiting deferrably by default. A retry re-attaches only if the function returns the same
request again: return it from the task's arguments, not from the clock or a random source.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from airflow_provider_modelroute.exceptions import ModelRouteConfigError
from airflow_provider_modelroute.operators.modelroute import ModelRouteExecuteOperator
from airflow_provider_modelroute.version_compat import taskflow

if TYPE_CHECKING:
    from airflow_provider_modelroute.version_compat import Context

DecoratedOperator, task_decorator_factory, determine_kwargs = taskflow()
#: What the function may return beside ``input``: the execution's other request fields.
OPTIONS = ("model", "metadata", "webhook_url")


def request_from(returned: Any, function: str) -> dict[str, Any]:
    """The request a ``@task.modelroute`` function returned: its input alone, or input and options."""
    if not isinstance(returned, dict):
        problem = f"{type(returned).__name__}, not a dict"
    elif not {"input", "model"} & returned.keys():
        return {"input": returned}
    elif not isinstance(returned.get("input"), dict):
        problem = f"a dict of {sorted(returned)} without an 'input' dict"
    elif unknown := sorted(returned.keys() - {"input", *OPTIONS}):
        problem = f"unknown fields {unknown} beside 'input'"
    else:
        return returned
    raise ModelRouteConfigError(
        f"@task.modelroute function {function!r} returned {problem}: return the execution's input as a dict "
        f"(e.g. {{'prompt': 'a red fox'}}), or a dict of 'input' (that dict) and any of {', '.join(OPTIONS)}"
    )


class _ModelRouteDecoratedOperator(DecoratedOperator, ModelRouteExecuteOperator):  # type: ignore[misc,valid-type]
    """Runs the execution its function returns (see the module's docstring)."""

    template_fields: Sequence[str] = (
        *DecoratedOperator.template_fields,
        *ModelRouteExecuteOperator.template_fields,
    )
    template_fields_renderers = {
        **DecoratedOperator.template_fields_renderers,
        **ModelRouteExecuteOperator.template_fields_renderers,
    }
    custom_operator_name = "@task.modelroute"

    def __init__(self, *, model: str = "", deferrable: bool = True, **kwargs: Any) -> None:
        super().__init__(model=model, input={}, deferrable=deferrable, **kwargs)

    def execute(self, context: Context) -> Any:
        context.update(self.op_kwargs)  # as Airflow's own decorators do
        kwargs = determine_kwargs(self.python_callable, self.op_args, context)
        returned = self.python_callable(*self.op_args, **kwargs)
        for name, value in request_from(returned, self.python_callable.__name__).items():
            setattr(self, name, value)
        # not through DecoratedOperator.execute: it adds nothing to this result, and fails on Airflow 3.0
        return ModelRouteExecuteOperator.execute(self, context)


def modelroute_task(python_callable: Callable[..., Any] | None = None, **kwargs: Any) -> Any:
    """``@task.modelroute``: takes ``ModelRouteExecuteOperator``'s parameters; returns (XCom) its result."""
    return task_decorator_factory(
        python_callable=python_callable,
        multiple_outputs=False,  # the result is one XCom, whatever the function's annotation says
        decorated_operator_class=_ModelRouteDecoratedOperator,
        **kwargs,
    )
