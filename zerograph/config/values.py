"""Building blocks of the config schema: :class:`ConfigError`, strict value types,
custom validation errors, the field metadata that says how each DeepSpeed key is
treated (works, has no effect yet, rejected unless a no-op value, other names),
and :class:`Section`, the base of every section, which enforces it."""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from collections.abc import Iterable
from typing import Annotated, Any, Optional

import annotated_types
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, ValidationInfo, field_validator
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


@dataclasses.dataclass(frozen=True)
class _Between(AfterValidator):
    """A range check whose error names both ends of the range (and the
    generated reference in docs/config.md shows it)."""

    low: float = 0
    high: float = 0


def _between(low: float, high: float, unit: str = "") -> _Between:
    def check(value: Any) -> Any:
        if not low <= value <= high:
            raise _problem(f"{{key}}: got {show(value)}; must be between {low} and {high}{unit}")
        return value

    return _Between(check, low=low, high=high)


MAX_COUNT = 2**63 - 1  # element counts and bytes: int64 (DeepSpeed writes sys.maxsize for "no limit")
_Int = Annotated[int, BeforeValidator(_whole_number)]
_PositiveInt = Annotated[int, BeforeValidator(_whole_number), annotated_types.Ge(1)]
_Size = Annotated[int, BeforeValidator(_whole_number), _between(0, MAX_COUNT)]
_Float = Annotated[float, BeforeValidator(_finite_number)]

_FROZEN = ConfigDict(frozen=True, extra="forbid")


# ---------------------------------------------------------------------------
# Field metadata (``json_schema_extra``): how a DeepSpeed key is treated. The
# generated references (docs/config.md, docs/from_deepspeed.md) read it too.

NO_EFFECT = "no_effect_yet"  # reason: accepted; a value other than the default changes nothing yet
UNSUPPORTED = "unsupported"  # message: rejected unless the value is one of ALLOWED (the no-op values)
ALLOWED = "allowed"
ALIASES = "aliases"  # DeepSpeed's other names for the key (renamed on load)
DEPRECATED = "deprecated_aliases"  # DeepSpeed's deprecated names for the key (renamed on load, logged)
FOREIGN = "foreign"  # a whole DeepSpeed section zerograph lacks: {"feature": ..., "instead": ... | NO_EFFECT: ...}
ZEROGRAPH_ONLY = "zerograph_only"  # a key of zerograph's own, not in DeepSpeed
KEEPS_AUTO = "keeps_auto"  # "auto" stays in the field until resolved (no default stands in for it)


def meta(
    *,
    no_effect: str | None = None,
    unsupported: str | None = None,
    allowed: Iterable[Any] = (),
    aliases: Iterable[str] = (),
    deprecated: Iterable[str] = (),
    zerograph_only: bool = False,
    keeps_auto: bool = False,
) -> dict[str, Any]:
    """``json_schema_extra`` for a field: see the constants above."""
    out: dict[str, Any] = {}
    if no_effect:
        out[NO_EFFECT] = no_effect
    if unsupported:
        out[UNSUPPORTED] = unsupported
        out[ALLOWED] = list(allowed)
    if aliases:
        out[ALIASES] = list(aliases)
    if deprecated:
        out[DEPRECATED] = list(deprecated)
    if zerograph_only:
        out[ZEROGRAPH_ONLY] = True
    if keeps_auto:
        out[KEEPS_AUTO] = True
    return out


def foreign(feature: str, *, instead: str | None = None, no_effect: str | None = None,
            keys: Iterable[str] = ()) -> dict[str, Any]:
    """``json_schema_extra`` for a DeepSpeed section zerograph does not have.

    With ``instead`` the section is rejected while it is on (an ``enabled`` key
    that is not false, or any content without one) and accepted when off; with
    ``no_effect`` it is always accepted and listed as having no effect.
    ``keys``: its documented sub-keys (so they are known by name)."""
    info: dict[str, Any] = {"feature": feature, "keys": list(keys)}
    if instead:
        info["instead"] = instead
    if no_effect:
        info[NO_EFFECT] = no_effect
    return {FOREIGN: info}


def field_extra(field: Any) -> dict[str, Any]:
    """The metadata dict of a pydantic ``FieldInfo`` (empty when it has none)."""
    extra = field.json_schema_extra
    return extra if isinstance(extra, dict) else {}


def section_is_on(value: Any) -> bool:
    """Whether a DeepSpeed section asks for its feature: ``enabled`` not false,
    or, without an ``enabled`` key, any content at all."""
    if value is None:
        return False
    if isinstance(value, dict):
        if "enabled" in value:
            return value["enabled"] not in (False, None)
        return bool(value)
    return True


def show(value: Any) -> str:
    """A value as JSON (falling back to repr), shortened to 80 characters."""
    try:
        text = json.dumps(list(value) if isinstance(value, tuple) else value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


ForeignSection = Optional[dict[str, Any]]


class Section(BaseModel):
    """Base of every config section: frozen, unknown keys rejected, and the
    DeepSpeed metadata above enforced for each field that was given."""

    model_config = _FROZEN

    @field_validator("*", mode="after")
    @classmethod
    def _deepspeed_rules(cls, value: Any, info: ValidationInfo) -> Any:
        extra = field_extra(cls.model_fields[info.field_name])
        if UNSUPPORTED in extra and value not in extra[ALLOWED]:
            raise _problem("{key}=" + show(value).replace("{", "(").replace("}", ")") + ": " + extra[UNSUPPORTED])
        section = extra.get(FOREIGN)
        if section is not None:
            if "instead" in section and section_is_on(value):
                raise _problem(
                    "{key} is a DeepSpeed feature zerograph does not have (" + section["feature"] + "): "
                    + section["instead"]
                )
            if NO_EFFECT not in section and not section_is_on(value):
                return None  # switched off: the same as leaving it out
        return value


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The BaseModel class inside ``annotation`` (unwrapping Optional/Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _section_model(arg)
        if found is not None:
            return found
    return None
