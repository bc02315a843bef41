"""Error wording: pydantic validation errors turned into one line per problem,
with the dotted key, what was expected, and a fix or a "did you mean" hint."""

from __future__ import annotations

import difflib
import json
import typing
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from zerograph.config.values import _EXPECTED, _PROBLEM, ConfigError, _section_model

_REMOVED_SECTIONS = {
    "optimizer": "zerograph does not build the optimizer from the config: create it yourself with "
    "zerograph.make_optimizer(model, torch.optim.AdamW, lr=...) (or torch.optim.AdamW(model.parameters(), ...)), "
    "and delete the 'optimizer' section",
    "scheduler": "zerograph does not build the LR scheduler: create a plain torch scheduler "
    "yourself on your optimizer, and delete the 'scheduler' section",
    "amp": "NVIDIA Apex AMP is not supported: use the 'bf16' or 'fp16' section, and delete the 'amp' section",
    "communication_data_type": "zerograph communicates in the compute dtype (fp32, or the 'bf16'/'fp16' "
    "section's): delete 'communication_data_type'",
    "elasticity": "elastic training is not supported: launch with a fixed world size and resume from a "
    "checkpoint at another world size (zerograph.load_checkpoint reshards), and delete the 'elasticity' section",
}


def _validate(root: type[BaseModel], data: dict[str, Any], source: str | None) -> Any:
    """``root.model_validate(data)``, with every problem reported in one :class:`ConfigError`."""
    try:
        return root.model_validate(data)
    except ValidationError as e:
        raise ConfigError([_describe(err, root) for err in e.errors()], source) from None


def _dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


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
    if not section and key in _REMOVED_SECTIONS:
        return f"unknown config key '{key}': {_REMOVED_SECTIONS[key]}"
    model = _model_at(root, section)
    valid = list(model.model_fields) if model is not None else []
    close = difflib.get_close_matches(str(key), valid, n=1)
    hint = f"did you mean '{close[0]}'?" if close else "valid keys: " + ", ".join(valid)
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


def _describe(err: Any, root: type[BaseModel]) -> str:
    """One line for one pydantic error."""
    kind, loc = err["type"], tuple(err["loc"])
    key = _dotted(loc)
    if kind == "extra_forbidden":
        return _unknown_key(root, loc)
    if kind == _PROBLEM:
        return err["ctx"]["template"].replace("{key}", key)
    value = err.get("input")
    requirement = _requirement(err, root)
    if isinstance(value, str) and value == "auto":
        if kind.startswith("bool_"):
            need = "true or false"
        elif kind == "literal_error":
            need = "an explicit value (" + requirement + ")"
        else:
            need = "the number"
        return (
            f'{key}: got "auto"; "auto" is filled in by the Hugging Face Trainer, '
            f"and zerograph needs {need}"
        )
    prefix = f"{key}: " if key else ""
    if kind.startswith("value_error") or kind == "assertion_error":
        return prefix + err["msg"]
    return f"{prefix}got {_show(value)}; {requirement}"
