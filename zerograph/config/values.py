"""Building blocks of the config schema: :class:`ConfigError`, strict value types,
custom validation errors, and field metadata for keys that have no effect yet."""

from __future__ import annotations

import math
import typing
from collections.abc import Iterable
from typing import Annotated, Any

import annotated_types
from pydantic import BaseModel, BeforeValidator, ConfigDict
from pydantic_core import PydanticCustomError

class ConfigError(ValueError):
    """An invalid zerograph config; ``problems`` holds one line per problem."""

    def __init__(self, problems: str | Iterable[str], source: str | None = None) -> None:
        self.problems: tuple[str, ...] = (problems,) if isinstance(problems, str) else tuple(problems)
        self.source = source
        header = [f"invalid zerograph config file {source}:"] if source else []
        super().__init__("\n".join(header + list(self.problems)))


# ---------------------------------------------------------------------------
# Value types. pydantic's lax mode would accept "10" for an int and "yes" for a
# bool; a config file should say what it means, so these are stricter. Whole
# floats (JSON ``5e8``) are accepted for integers because DeepSpeed configs
# write sizes that way.

_EXPECTED = "zerograph_expected"  # error type: "<key>: got <value>; expected <what>"
_PROBLEM = "zerograph_problem"  # error type: a full sentence; "{key}" is the dotted key


def _expected(what: str) -> PydanticCustomError:
    return PydanticCustomError(_EXPECTED, "expected {expected}", {"expected": what})


def _problem(template: str) -> PydanticCustomError:
    return PydanticCustomError(_PROBLEM, "{template}", {"template": template})


def _whole_number(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _expected("an integer")
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise _expected("a whole number")
        return int(value)
    return value


def _finite_number(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _expected("a number")
    if not math.isfinite(value):
        raise _expected("a finite number")
    return float(value)


_Int = Annotated[int, BeforeValidator(_whole_number)]
_PositiveInt = Annotated[int, BeforeValidator(_whole_number), annotated_types.Ge(1)]
_Size = Annotated[int, BeforeValidator(_whole_number), annotated_types.Ge(0)]
_Float = Annotated[float, BeforeValidator(_finite_number)]

_FROZEN = ConfigDict(frozen=True, extra="forbid")


def _no_effect(reason: str) -> dict[str, str]:
    """Field metadata for keys that are accepted but not implemented yet."""
    return {"no_effect_yet": reason}


_BUCKETING = _no_effect("zerograph picks the reduction per stage and lays gradients out in its bucket buffers")

def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The BaseModel class inside ``annotation`` (unwrapping Optional/Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _section_model(arg)
        if found is not None:
            return found
    return None
