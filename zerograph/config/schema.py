"""The whole config, :class:`Config`: loading, derived values, changed and inactive settings."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Optional

import annotated_types
from pydantic import BaseModel, Field, StrictBool, model_validator

from zerograph.config.messages import _validate
from zerograph.config.sections import (
    ActivationCheckpointingConfig,
    BF16Config,
    FP16Config,
    PipelineConfig,
    ZeroConfig,
    ZerographOptions,
)
from zerograph.config.values import _FROZEN, ConfigError, _Float, _no_effect, _PositiveInt, _problem

class Config(BaseModel):
    """A whole zerograph config: the carried-over DeepSpeed keys plus ``zerograph``."""

    model_config = _FROZEN

    train_batch_size: Optional[_PositiveInt] = Field(
        None,
        description="Samples per optimizer step over all ranks; must equal micro batch * "
        "gradient accumulation steps * world size. DeepSpeed: same key.",
    )
    train_micro_batch_size_per_gpu: Optional[_PositiveInt] = Field(
        None, description="Samples per rank per forward/backward. DeepSpeed: same key."
    )
    gradient_accumulation_steps: _PositiveInt = Field(
        1,
        description="Micro-batches per optimizer step; derived from the two batch sizes when "
        "only they are given. DeepSpeed: same key.",
    )
    gradient_clipping: Annotated[_Float, annotated_types.Ge(0)] = Field(
        0.0,
        description="Clip the global gradient norm to this value; 0 disables clipping. "
        "DeepSpeed: same key.",
    )
    steps_per_print: Optional[_PositiveInt] = Field(
        None,
        description="Logging only: log progress every this many steps. DeepSpeed: same key.",
    )
    zero_allow_untested_optimizer: StrictBool = Field(
        False,
        description="Allow optimizers DeepSpeed has not tested with ZeRO. zerograph takes any torch "
        "optimizer (zerograph.make_optimizer). DeepSpeed: same key.",
        json_schema_extra=_no_effect("any torch optimizer works with zerograph"),
    )
    wall_clock_breakdown: StrictBool = Field(
        False, description="Logging only: log a timing breakdown. DeepSpeed: same key."
    )
    fp16: FP16Config = Field(
        default_factory=FP16Config, description="float16 mixed precision. DeepSpeed: same section."
    )
    bf16: BF16Config = Field(
        default_factory=BF16Config, description="bfloat16 mixed precision. DeepSpeed: same section."
    )
    zero_optimization: ZeroConfig = Field(
        default_factory=ZeroConfig, description="ZeRO sharding. DeepSpeed: same section."
    )
    zerograph: ZerographOptions = Field(
        default_factory=ZerographOptions,
        description="zerograph's own options; not in DeepSpeed.",
    )
    activation_checkpointing: ActivationCheckpointingConfig = Field(
        default_factory=ActivationCheckpointingConfig,
        description="Activation checkpointing policy. DeepSpeed: same section; its keys map onto policies.",
    )
    pipeline: PipelineConfig = Field(
        default_factory=PipelineConfig,
        description="Pipeline parallelism; zerograph's own (DeepSpeed configures it in code).",
    )

    @model_validator(mode="after")
    def _one_precision(self) -> Config:
        if self.fp16.enabled and self.bf16.enabled:
            raise _problem("fp16.enabled and bf16.enabled are both true; enable at most one")
        return self

    # -- loading ------------------------------------------------------------

    @classmethod
    def load(cls, source: Config | Mapping[str, Any] | str | os.PathLike[str] | None = None) -> Config:
        """A Config from a Config (returned as is), a dict, a JSON file path, or None."""
        if isinstance(source, Config):
            return source
        if source is None:
            return cls()
        if isinstance(source, Mapping):
            return _validate(cls, dict(source), None)
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
            return _validate(cls, data, str(path))
        raise ConfigError(
            f"cannot load a config from {type(source).__name__}; "
            "pass a JSON file path, a dict, a Config, or None"
        )

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

    def changed_settings(self, *, skip: tuple[str, ...] = ()) -> list[str]:
        """Dotted names of the settings whose value differs from the default,
        leaving out the top-level keys and sections named in ``skip``."""
        out: list[str] = []
        _collect_changed(self.to_dict(), Config().to_dict(), "", skip, out)
        return out

    def inactive_settings(self) -> list[str]:
        """One line for each changed setting that has no effect yet."""
        lines: list[str] = []
        _collect_inactive(self, "", lines)
        return lines


def _collect_changed(value: Any, default: Any, prefix: str, skip: tuple[str, ...], out: list[str]) -> None:
    if isinstance(value, dict) and isinstance(default, dict):
        for key, sub in value.items():
            if prefix or key not in skip:
                _collect_changed(sub, default.get(key), f"{prefix}{key}" if not prefix else f"{prefix}.{key}", skip, out)
    elif value != default:
        out.append(prefix)


# ---------------------------------------------------------------------------
# Settings that have no effect yet


def _collect_inactive(model: BaseModel, prefix: str, lines: list[str]) -> None:
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        key = prefix + name
        if isinstance(value, BaseModel):
            _collect_inactive(value, key + ".", lines)
            continue
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        reason = extra.get("no_effect_yet")
        if reason and value != field.get_default(call_default_factory=True):
            lines.append(
                f"{key}={json.dumps(value)} has no effect yet ({reason}); "
                "it is accepted so DeepSpeed configs load"
            )
