"""The whole config, :class:`Config`: loading, ``"auto"`` values, derived
values, and the settings that are changed or have no effect yet."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, PrivateAttr

from zerograph.config.messages import validate
from zerograph.config.normalize import AUTO, normalize
from zerograph.config.toplevel import ConfigKeys
from zerograph.config.values import FOREIGN, NO_EFFECT, ConfigError, field_extra, show

log = logging.getLogger(__name__)

# top-level keys and sections that change nothing the backend runs: built on request (optimizer, scheduler),
# read by zerograph.initialize's engine (monitors, its data loader), or accepted only when they ask for nothing
# zerograph lacks
_INERT_SECTIONS = ("optimizer", "scheduler", "data_types", "hybrid_engine", "checkpoint",
                   "compile", "tensorboard", "wandb", "comet", "csv_monitor", "flops_profiler", "comms_logger",
                   "steps_per_print", "wall_clock_breakdown", "dataloader_drop_last")


class Config(ConfigKeys):
    """A whole zerograph config: DeepSpeed's ds_config keys plus ``zerograph``.

    Every key of DeepSpeed's config reference is known: it works, or it is
    accepted and has no effect yet (:meth:`inactive_settings`), or it is
    rejected with a message naming the feature and what to use instead."""

    _auto: tuple[str, ...] = PrivateAttr(default=())  # the "auto" keys not resolved yet

    # -- loading ------------------------------------------------------------

    @classmethod
    def load(cls, source: Config | Mapping[str, Any] | str | os.PathLike[str] | None = None) -> Config:
        """A Config from a Config (returned as is), a dict, a JSON file path, or None.

        ``"auto"`` values (the Hugging Face Trainer's placeholders) take the
        key's default, logged in one line; :meth:`resolve_auto` fills them from
        a trainer's arguments instead."""
        if isinstance(source, Config):
            return source
        if source is None:
            return cls()
        if isinstance(source, Mapping):
            return cls._from_dict(dict(source), None)
        if isinstance(source, (str, os.PathLike)):
            path = Path(source)
            try:
                text = path.read_text()
            except FileNotFoundError:
                raise ConfigError(f"config file not found: {path}") from None
            except OSError as e:
                raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise ConfigError(f"line {e.lineno} column {e.colno}: invalid JSON: {e.msg}", str(path)) from None
            if not isinstance(data, dict):
                raise ConfigError(f"expected a JSON object at the top level; got {type(data).__name__}", str(path))
            return cls._from_dict(data, str(path))
        raise ConfigError(
            f"cannot load a config from {type(source).__name__}; "
            "pass a JSON file path, a dict, a Config, or None"
        )

    @classmethod
    def _from_dict(cls, data: dict[str, Any], source: str | None) -> Config:
        norm = normalize(cls, data)
        cfg = validate(cls, norm.data, source, norm.problems)
        cfg._auto = tuple(norm.auto + norm.kept_auto)
        for line in norm.renamed:
            log.info("zerograph config: %s (DeepSpeed's other name for the key)", line)
        if norm.auto or norm.kept_auto:
            chosen = [f"{key}={show(cfg.get(key))}" for key in norm.auto]
            chosen += [f'{key} stays "auto" until resolved' for key in norm.kept_auto]
            log.info('zerograph config: "auto" values (Config.resolve_auto fills them from a trainer): %s',
                     ", ".join(chosen))
        return cfg

    @property
    def auto_keys(self) -> tuple[str, ...]:
        """Dotted keys the config set to ``"auto"`` that are not resolved yet."""
        return self._auto

    def resolve_auto(self, values: Mapping[str, Any]) -> Config:
        """A copy with the ``"auto"`` keys taken from ``values`` (dotted keys,
        e.g. ``{"train_micro_batch_size_per_gpu": 8, "optimizer.params.lr": 3e-5}``),
        as a trainer integration fills them from its arguments.

        A key that was not ``"auto"`` must already hold the value given (else a
        mismatch is reported, as the Hugging Face Trainer does); ``"auto"`` keys
        missing from ``values`` keep their default. Every problem is reported
        in one :class:`ConfigError`; the values chosen are logged in one line."""
        data = self.model_dump(exclude_unset=True)  # the keys given, under zerograph's names
        problems: list[str] = []
        filled: list[str] = []
        for key, value in values.items():
            if key in self._auto:
                _set_dotted(data, key, value)
                filled.append(f"{key}={show(value)}")
                continue
            try:
                current = self.get(key)
            except KeyError:
                problems.append(f"resolve_auto: unknown config key '{key}'")
                continue
            if isinstance(current, BaseModel) or _jsonable(current) != _jsonable(value):
                problems.append(f"resolve_auto: {key} is {show(_jsonable(current))} in the config, not \"auto\", "
                                f"but the trainer has {show(value)}; make them agree or set {key} to \"auto\"")
        if problems:
            raise ConfigError(problems)
        cfg = validate(type(self), data, None, [])
        cfg._auto = tuple(key for key in self._auto if key not in values)
        if filled:
            log.info('zerograph config: "auto" values resolved: %s', ", ".join(filled))
        return cfg

    def get(self, key: str) -> Any:
        """The value of a dotted key, e.g. ``cfg.get("zero_optimization.stage")``; KeyError if there is none."""
        value: Any = self
        for part in key.split("."):
            if not isinstance(value, BaseModel) or part not in type(value).model_fields:
                raise KeyError(key)
            value = getattr(value, part)
        return value

    def to_dict(self) -> dict[str, Any]:
        """Every setting, defaults included, as a JSON-compatible dict."""
        return self.model_dump(mode="json")

    # -- derived values -----------------------------------------------------

    @property
    def stage(self) -> int:
        """The ZeRO stage (0-3)."""
        return self.zero_optimization.stage

    @property
    def compute_dtype(self) -> Any:
        """torch.float16, torch.bfloat16 or torch.float32, from the fp16/bf16 sections."""
        import torch

        if self.fp16.enabled:
            return torch.float16
        if self.bf16.enabled:
            return torch.bfloat16
        return torch.float32

    @property
    def micro_batches(self) -> int:
        """Micro-batches per pipeline step: ``pipeline.micro_batches`` or ``gradient_accumulation_steps``."""
        return self.pipeline.micro_batches or self.gradient_accumulation_steps

    @property
    def dynamic_loss_scale(self) -> bool:
        """True when fp16 is enabled with dynamic loss scaling (loss_scale == 0)."""
        return self.fp16.enabled and self.fp16.loss_scale == 0

    def resolve_batch(self, world_size: int) -> tuple[Optional[int], Optional[int], int]:
        """(train_batch_size, micro_batch, grad_accum) for ``world_size`` ranks.

        Follows DeepSpeed's rule ``train_batch_size == micro * gas * world_size``:
        values that are given are checked, a missing one is derived. The gradient
        accumulation steps count as given only when set explicitly, so a config
        with both batch sizes derives them. With no batch size at all the two
        batch sizes are None.
        """
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ConfigError(f"world_size must be a positive integer; got {world_size!r}")
        train = self.train_batch_size
        micro = self.train_micro_batch_size_per_gpu
        gas = self.gradient_accumulation_steps
        gas_given = "gradient_accumulation_steps" in self.model_fields_set

        if train is not None and micro is not None:
            if gas_given:
                if train != micro * gas * world_size:
                    raise ConfigError(
                        f"train_batch_size ({train}) != train_micro_batch_size_per_gpu ({micro}) * "
                        f"gradient_accumulation_steps ({gas}) * world_size ({world_size}) = "
                        f"{micro * gas * world_size}; the batch sizes must satisfy "
                        "train_batch_size == train_micro_batch_size_per_gpu * "
                        "gradient_accumulation_steps * world_size"
                    )
                return train, micro, gas
            per_step = micro * world_size
            if train % per_step:
                raise ConfigError(
                    f"cannot derive gradient_accumulation_steps: train_batch_size ({train}) is not "
                    f"divisible by train_micro_batch_size_per_gpu ({micro}) * world_size "
                    f"({world_size}) = {per_step}"
                )
            return train, micro, train // per_step
        if train is not None:
            per_micro = gas * world_size
            if train % per_micro:
                raise ConfigError(
                    f"cannot derive train_micro_batch_size_per_gpu: train_batch_size ({train}) is "
                    f"not divisible by gradient_accumulation_steps ({gas}) * world_size "
                    f"({world_size}) = {per_micro}"
                )
            return train, train // per_micro, gas
        if micro is not None:
            return micro * gas * world_size, micro, gas
        return None, None, gas

    def with_resolved_batch(self, world_size: int) -> "Config":
        """This config with the batch sizes and accumulation steps that
        :meth:`resolve_batch` checks or derives for ``world_size`` data-parallel
        ranks filled in (``train_batch_size: 64`` with ``micro 8`` at 4 ranks
        runs 2 accumulation steps); the same config when nothing changes."""
        train, micro, gas = self.resolve_batch(world_size)
        updates = {key: value for key, value in (("train_batch_size", train),
                                                 ("train_micro_batch_size_per_gpu", micro),
                                                 ("gradient_accumulation_steps", gas))
                   if value is not None and getattr(self, key) != value}
        return self.model_copy(update=updates) if updates else self

    def changed_settings(self, *, skip: tuple[str, ...] = ()) -> list[str]:
        """Dotted names of the settings whose value differs from the default and
        that change what zerograph does (settings without effect and the
        sections built on request, such as ``optimizer``, are left out), also
        leaving out the top-level keys and sections named in ``skip``."""
        out: list[str] = []
        _collect_changed(self, Config(), "", skip + _INERT_SECTIONS, out)
        return out

    def inactive_settings(self) -> list[str]:
        """One line, ``<key>=<value>: no effect yet: <why>``, for each setting
        the config changes that has no effect yet."""
        lines: list[str] = []
        _collect_inactive(self, "", lines)
        return lines


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    *sections, last = key.split(".")
    for part in sections:
        data = data.setdefault(part, {})
    data[last] = value


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=list)) if not isinstance(value, BaseModel) else value


def _no_effect_reason(field: Any) -> Optional[str]:
    extra = field_extra(field)
    return extra.get(NO_EFFECT) or (extra.get(FOREIGN) or {}).get(NO_EFFECT)


def _collect_changed(model: BaseModel, default: BaseModel, prefix: str, skip: tuple[str, ...],
                     out: list[str]) -> None:
    for name, field in type(model).model_fields.items():
        if (not prefix and name in skip) or _no_effect_reason(field):
            continue
        value, base = getattr(model, name), getattr(default, name, None)
        if isinstance(value, BaseModel) and isinstance(base, BaseModel):
            _collect_changed(value, base, f"{prefix}{name}.", skip, out)
        elif value != base:
            out.append(prefix + name)


def _collect_inactive(model: BaseModel, prefix: str, lines: list[str]) -> None:
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        key = prefix + name
        if isinstance(value, BaseModel):
            _collect_inactive(value, key + ".", lines)
            continue
        reason = _no_effect_reason(field)
        if reason and value != field.get_default(call_default_factory=True) and value != AUTO:
            lines.append(f"{key}={show(value)}: no effect yet: {reason}")
