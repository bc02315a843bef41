"""Error wording: pydantic validation errors turned into one line per problem,
with the dotted key, what was expected, and a fix or a "did you mean" hint."""

from __future__ import annotations

import difflib
import functools
import json
import typing
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from zerograph.config.normalize import AUTO, aliases
from zerograph.config.values import (
    _EXPECTED,
    _PROBLEM,
    ALIASES,
    DEPRECATED,
    FOREIGN,
    ConfigError,
    _section_model,
    field_extra,
)

def validate(root: type[BaseModel], data: dict[str, Any], source: str | None, problems: list[str]) -> Any:
    """``root.model_validate(data)``, with every problem (pydantic's, and the
    ``problems`` found before validation) reported in one :class:`ConfigError`."""
    try:
        model = root.model_validate(data)
    except ValidationError as e:
        lines = [line for err in e.errors() for line in _describe(err, root)]
        raise ConfigError(lines + problems, source) from None
    if problems:
        raise ConfigError(problems, source)
    return model


@functools.cache
def key_homes(root: type[BaseModel]) -> dict[str, tuple[str, ...]]:
    """Every key name of the schema (names, DeepSpeed's other names, and the
    documented keys of DeepSpeed sections zerograph lacks) -> the dotted
    sections it belongs to ("" is the top level)."""
    homes: dict[str, list[str]] = {}

    def visit(model: type[BaseModel], path: str, seen: tuple[type[BaseModel], ...]) -> None:
        for name, field in model.model_fields.items():
            extra = field_extra(field)
            for key in [name, *extra.get(ALIASES, ()), *extra.get(DEPRECATED, ())]:
                homes.setdefault(key, []).append(path)
            here = f"{path}.{name}" if path else name
            for key in (extra.get(FOREIGN) or {}).get("keys", ()):
                homes.setdefault(key, []).append(here)
            sub = _section_model(field.annotation)
            if sub is not None and sub not in seen:
                visit(sub, here, seen + (sub,))

    visit(root, "", (root,))
    return {key: tuple(dict.fromkeys(paths)) for key, paths in homes.items()}


def _dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _where(path: str) -> str:
    return f"the '{path}' section" if path else "the top level"


def _model_at(root: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] | None = root
    for part in loc:
        field = model.model_fields.get(part) if model is not None and isinstance(part, str) else None
        if field is None:
            return None
        model = _section_model(field.annotation)
    return model


def _literal_values(annotation: Any) -> tuple[Any, ...]:
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    for arg in typing.get_args(annotation):
        found = _literal_values(arg)
        if found:
            return found
    return ()


def _allowed(root: type[BaseModel], loc: tuple[Any, ...], ctx: dict[str, Any]) -> str:
    model = _model_at(root, loc[:-1])
    field = model.model_fields.get(loc[-1]) if model is not None and loc else None
    values = _literal_values(field.annotation) if field is not None else ()
    if not values:
        return f"allowed: {ctx.get('expected', '?')}"
    return "allowed: " + ", ".join(json.dumps(v) for v in values)


def _unknown_key(root: type[BaseModel], loc: tuple[Any, ...]) -> str:
    key, section = loc[-1], loc[:-1]
    here = ".".join(str(part) for part in section)
    homes = [path for path in key_homes(root).get(str(key), ()) if path != here]
    if homes:  # a real key, in the wrong place: never "did you mean" another key
        return (f"unknown config key '{_dotted(loc)}': '{key}' is a key of "
                + " and of ".join(_where(path) for path in homes[:3]) + "; move it there")
    model = _model_at(root, section)
    valid = list(model.model_fields) if model is not None else []
    known = valid + (list(aliases(model)) if model is not None else [])
    close = difflib.get_close_matches(str(key), known, n=1)
    if close:
        target = aliases(model).get(close[0], (close[0],))[0] if model is not None else close[0]
        hint = f"did you mean '{target}'?"
    else:
        hint = "valid keys: " + ", ".join(valid)
    return f"unknown config key '{_dotted(loc)}'; {hint}"


def _requirement(err: Any, root: type[BaseModel]) -> str:
    """What the value should have been, e.g. ``must be >= 1`` or ``expected a boolean``."""
    kind, ctx, loc = err["type"], err.get("ctx") or {}, err["loc"]
    bounds = {
        "greater_than_equal": ">=",
        "greater_than": ">",
        "less_than_equal": "<=",
        "less_than": "<",
    }
    if kind in bounds:
        op = bounds[kind]
        return f"must be {op} {next(iter(ctx.values()))}"
    if kind == _EXPECTED:
        return f"expected {ctx['expected']}"
    if kind == "literal_error":
        return _allowed(root, loc, ctx)
    if kind.startswith("bool_"):
        return "expected a boolean (true or false)"
    if kind.startswith("string_"):
        return "expected a string"
    if kind.startswith(("tuple_", "list_")):
        return "expected a list"
    if kind.startswith(("model_", "dict_")):
        return "expected a section (a JSON object)"
    if kind.startswith("int_"):
        return "expected an integer"
    if kind.startswith("float_"):
        return "expected a number"
    return err["msg"]


def _describe(err: Any, root: type[BaseModel]) -> list[str]:
    """The problem lines of one pydantic error."""
    kind, loc = err["type"], tuple(err["loc"])
    key = _dotted(loc)
    if kind == "extra_forbidden":
        return [_unknown_key(root, loc)]
    if kind == _PROBLEM:
        return err["ctx"]["template"].replace("{key}", key).split("\n")
    value = err.get("input")
    requirement = _requirement(err, root)
    if isinstance(value, str) and value == AUTO:
        return [f'{key}: got "auto", which this key does not take; {requirement}']
    prefix = f"{key}: " if key else ""
    if kind.startswith("value_error") or kind == "assertion_error":
        return [prefix + err["msg"]]
    if kind == "missing":
        return [f"{key}: missing; this section needs it"]
    return [f"{prefix}got {_show(value)}; {requirement}"]
