"""What happens to a config dict before validation: DeepSpeed's other names for
a key are renamed to zerograph's (:func:`aliases`), ``"auto"`` values are taken
out (the key's default stands in, unless :meth:`Config.resolve_auto` fills it),
and comment keys (a leading ``_`` or ``//``, JSON's usual stand-ins for
comments and for switched-off keys) are dropped."""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

from pydantic import BaseModel

from zerograph.config.values import ALIASES, DEPRECATED, KEEPS_AUTO, _section_model, field_extra, show

log = logging.getLogger(__name__)

AUTO = "auto"


@dataclasses.dataclass
class Normalized:
    """A config dict ready for validation, and what was done to get there."""

    data: dict[str, Any]
    auto: list[str] = dataclasses.field(default_factory=list)  # dotted keys whose "auto" was taken out
    kept_auto: list[str] = dataclasses.field(default_factory=list)  # dotted keys that keep "auto" (KEEPS_AUTO)
    renamed: list[str] = dataclasses.field(default_factory=list)  # "old -> new" for each renamed key
    problems: list[str] = dataclasses.field(default_factory=list)


@functools.cache
def aliases(model: type[BaseModel]) -> dict[str, tuple[str, bool]]:
    """DeepSpeed's other names for the keys of ``model``: name -> (key, deprecated)."""
    out: dict[str, tuple[str, bool]] = {}
    for name, field in model.model_fields.items():
        extra = field_extra(field)
        for alias in extra.get(ALIASES, ()):
            out[alias] = (name, False)
        for alias in extra.get(DEPRECATED, ()):
            out[alias] = (name, True)
    return out


def is_comment(key: Any) -> bool:
    """A key JSON configs use as a comment or to switch a key off: ``_comment``, ``_offload_param``, ``// ...``."""
    return isinstance(key, str) and (key.startswith("_") or key.startswith("//"))


def normalize(root: type[BaseModel], data: dict[str, Any]) -> Normalized:
    """``data`` with aliases renamed, ``"auto"`` taken out and comments dropped (see the module docstring)."""
    out = Normalized({})
    out.data = _walk(root, data, "", out)
    return out


def _walk(model: type[BaseModel], raw: dict[str, Any], prefix: str, out: Normalized) -> dict[str, Any]:
    names = aliases(model)
    clean: dict[str, Any] = {}
    given_as: dict[str, str] = {}
    for key, value in raw.items():
        if is_comment(key):
            continue
        name = key
        if isinstance(key, str) and key in names:
            name, deprecated = names[key]
            out.renamed.append(f"{prefix}{key} -> {prefix}{name}" + (" (deprecated name)" if deprecated else ""))
        if name in given_as:
            if clean.get(name) != value:
                out.problems.append(
                    f"{prefix}{given_as[name]} and {prefix}{key} are the same key (DeepSpeed has both names) with "
                    f"different values ({show(clean.get(name))} and {show(value)}); keep one")
            continue
        given_as[name] = key
        field = model.model_fields.get(name) if isinstance(name, str) else None
        if field is not None and isinstance(value, str) and value == AUTO:
            if field_extra(field).get(KEEPS_AUTO):
                out.kept_auto.append(prefix + name)
            else:
                out.auto.append(prefix + name)
                continue
        sub = _section_model(field.annotation) if field is not None else None
        if sub is not None and isinstance(value, dict):
            value = _walk(sub, value, f"{prefix}{name}.", out)
        clean[name] = value
    return clean
