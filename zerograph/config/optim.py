"""The ``optimizer`` and ``scheduler`` sections: DeepSpeed's optimizer and LR
schedule, parsed into typed fields. ``zerograph.runtime.ds_optim`` builds the
torch optimizer and scheduler from them (``build_optimizer``, ``build_scheduler``)."""

from __future__ import annotations

import difflib
from typing import Annotated, Any, Literal, Optional, Union

import annotated_types
from pydantic import BeforeValidator, Field, StrictBool, StrictStr, field_validator, model_validator

from zerograph.config.values import (
    Section,
    _Float,
    _Int,
    _PositiveInt,
    _problem,
    _expected,
    _Size,
    _whole_number,
    meta,
)

_Rate = Annotated[_Float, annotated_types.Ge(0)]
_Fraction = Annotated[_Float, annotated_types.Ge(0), annotated_types.Le(1)]
_Beta = Annotated[_Float, annotated_types.Ge(0), annotated_types.Lt(1)]

# ---------------------------------------------------------------------------
# optimizer

#: optimizer types built from the config: lower-case name -> canonical name
OPTIMIZERS = {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD", "adagrad": "Adagrad", "rmsprop": "RMSprop"}

#: DeepSpeed's own optimizers zerograph does not have: lower-case name -> what it is
DEEPSPEED_ONLY_OPTIMIZERS = {
    "lamb": "LAMB (DeepSpeed's FusedLamb)",
    "onebitadam": "1-bit Adam (compressed communication)",
    "zerooneadam": "0/1 Adam (compressed communication)",
    "onebitlamb": "1-bit LAMB (compressed communication)",
    "lion": "Lion (DeepSpeed's FusedLion)",
    "muadam": "muP Adam (the mup package)",
    "muadamw": "muP AdamW (the mup package)",
    "musgd": "muP SGD (the mup package)",
    "muon": "Muon with an auxiliary Adam (DeepSpeed's MuonWithAuxAdam)",
}

_ADAM = ("lr", "betas", "eps", "weight_decay", "amsgrad", "bias_correction", "adam_w_mode", "torch_adam",
         "fp32_optimizer_states")
#: the ``optimizer.params`` keys each built type takes
OPTIMIZER_PARAMS = {
    "Adam": _ADAM,
    "AdamW": _ADAM,
    "SGD": ("lr", "momentum", "dampening", "weight_decay", "nesterov"),
    "Adagrad": ("lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps"),
    "RMSprop": ("lr", "alpha", "eps", "weight_decay", "momentum", "centered"),
}

_MAKE_YOURSELF = ("build it yourself with zerograph.make_optimizer(model, OptimizerClass, ...) and delete the "
                  "'optimizer' section")


def _optimizer_type(value: Any) -> Any:
    """The canonical name of a built optimizer type, or a problem naming the alternative."""
    if not isinstance(value, str):
        return value  # the str type check reports it
    key = value.lower()
    if key in OPTIMIZERS:
        return OPTIMIZERS[key]
    built = ", ".join(OPTIMIZERS.values())
    if key in DEEPSPEED_ONLY_OPTIMIZERS:
        raise _problem(f'{{key}}="{value}": {DEEPSPEED_ONLY_OPTIMIZERS[key]} is a DeepSpeed optimizer zerograph '
                       f"does not have; {_MAKE_YOURSELF}")
    import torch

    found = getattr(torch.optim, value, None)
    if isinstance(found, type) and issubclass(found, torch.optim.Optimizer):
        raise _problem(f'{{key}}="{value}": torch.optim.{value} is not built from the config yet (built: {built}); '
                       f"build it with zerograph.make_optimizer(model, torch.optim.{value}, ...) and delete the "
                       "'optimizer' section")
    close = difflib.get_close_matches(key, list(OPTIMIZERS) + list(DEEPSPEED_ONLY_OPTIMIZERS), n=1)
    hint = f'did you mean "{OPTIMIZERS.get(close[0], close[0])}"? ' if close else ""
    raise _problem(f'{{key}}="{value}": unknown optimizer type; {hint}zerograph builds {built}')


class OptimizerParams(Section):
    """``optimizer.params``: the optimizer's arguments (which keys each type takes: see ``optimizer.type``)."""

    lr: Optional[_Rate] = Field(
        None, description="Learning rate; null: the type's default (Adam/AdamW/SGD 0.001, Adagrad/RMSprop 0.01)."
    )
    betas: Optional[tuple[_Beta, _Beta]] = Field(None, description="Adam/AdamW: [beta1, beta2]; null: [0.9, 0.999].")
    eps: Optional[Annotated[_Float, annotated_types.Ge(0)]] = Field(
        None, description="Term added to the denominator; null: the type's default (1e-8; Adagrad 1e-10)."
    )
    weight_decay: _Rate = Field(
        0.0, description="Weight decay (decoupled for AdamW). 0 for every type, as in DeepSpeed (torch's AdamW "
        "default is 0.01)."
    )
    amsgrad: StrictBool = Field(False, description="Adam/AdamW: the AMSGrad variant.")
    bias_correction: StrictBool = Field(
        True, description="Adam/AdamW: bias-correct the moments.",
        json_schema_extra=meta(unsupported="torch's Adam always corrects the moments' bias; remove the key or set it "
                               "to true", allowed=[True]),
    )
    adam_w_mode: StrictBool = Field(
        True, description="Adam/AdamW: decoupled weight decay. As in DeepSpeed, type \"Adam\" builds torch.optim.AdamW "
        "unless this is false (then torch.optim.Adam, L2 regularization)."
    )
    torch_adam: StrictBool = Field(
        False, description="DeepSpeed: use torch's Adam instead of its fused Adam.",
        json_schema_extra=meta(no_effect="zerograph always builds torch.optim.Adam/AdamW"),
    )
    fp32_optimizer_states: Optional[StrictBool] = Field(
        None, description="DeepSpeed's CPU Adam: keep its states in fp32.",
        json_schema_extra=meta(no_effect="optimizer states are kept in the masters' dtype (fp32)"),
    )
    momentum: _Rate = Field(0.0, description="SGD/RMSprop: momentum factor.")
    dampening: _Rate = Field(0.0, description="SGD: dampening for momentum.")
    nesterov: StrictBool = Field(False, description="SGD: Nesterov momentum.")
    lr_decay: _Rate = Field(0.0, description="Adagrad: learning-rate decay.")
    initial_accumulator_value: _Rate = Field(0.0, description="Adagrad: initial value of the sum of squares.")
    alpha: _Fraction = Field(0.99, description="RMSprop: smoothing constant.")
    centered: StrictBool = Field(False, description="RMSprop: normalize by the estimated variance.")
    max_grad_norm: Optional[_Rate] = Field(
        None, description="Rejected (DeepSpeed rejects it too): use the top-level gradient_clipping.",
        json_schema_extra=meta(unsupported="not an optimizer parameter; use the top-level gradient_clipping",
                               allowed=[None]),
    )


class OptimizerConfig(Section):
    """The ``optimizer`` section: the optimizer :func:`zerograph.build_optimizer` builds."""

    type: Annotated[StrictStr, annotated_types.MinLen(1)] = Field(
        description="Adam, AdamW, SGD, Adagrad or RMSprop (any case). Adam/AdamW build torch.optim.AdamW (Adam with "
        "adam_w_mode false: torch.optim.Adam). DeepSpeed's own optimizers (Lamb, OneBitAdam, ZeroOneAdam, "
        "OneBitLamb, Lion, MuAdam, Muon, ...) are rejected, naming the alternative."
    )
    params: OptimizerParams = Field(default_factory=OptimizerParams, description="The optimizer's arguments.")
    legacy_fusion: StrictBool = Field(
        False, description="DeepSpeed's legacy fused fp16 optimizer.",
        json_schema_extra=meta(no_effect="zerograph builds a plain torch optimizer"),
    )

    @model_validator(mode="before")
    @classmethod
    def _params_of_other_types_unchecked(cls, data: Any) -> Any:
        """A type zerograph does not build gets one message; its params are not checked."""
        if isinstance(data, dict) and isinstance(data.get("type"), str) and data["type"].lower() not in OPTIMIZERS:
            data = {k: v for k, v in data.items() if k != "params"}
        return data

    @field_validator("type")
    @classmethod
    def _known_type(cls, value: str) -> str:
        return _optimizer_type(value)

    @model_validator(mode="after")
    def _params_of_type(self) -> "OptimizerConfig":
        takes = OPTIMIZER_PARAMS[self.type]
        extra = [k for k in OptimizerParams.model_fields if k in self.params.model_fields_set and k not in takes
                 and k != "max_grad_norm"]
        if extra:
            names = ", ".join(extra)
            are = "is not a parameter" if len(extra) == 1 else "are not parameters"
            raise _problem(f"optimizer.params: {names} {are} of {self.type}; it takes {', '.join(takes)}")
        return self


# ---------------------------------------------------------------------------
# scheduler


def _positive_or_auto(value: Any) -> Any:
    if isinstance(value, str) and value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _expected('a positive integer or "auto"')
    value = _whole_number(value)
    if value < 1:
        raise _expected('a positive integer or "auto"')
    return value

#: the ``scheduler.params`` keys each type takes (all of them take last_batch_iteration)
SCHEDULER_PARAMS = {
    "WarmupLR": ("warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type"),
    "WarmupDecayLR": ("total_num_steps", "warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type"),
    "WarmupCosineLR": ("total_num_steps", "warmup_min_ratio", "warmup_num_steps", "cos_min_ratio", "warmup_type"),
    "OneCycle": ("cycle_min_lr", "cycle_max_lr", "decay_lr_rate", "cycle_first_step_size", "cycle_second_step_size",
                 "cycle_first_stair_count", "cycle_second_stair_count", "decay_step_size", "cycle_momentum",
                 "cycle_min_mom", "cycle_max_mom", "decay_mom_rate"),
    "LRRangeTest": ("lr_range_test_min_lr", "lr_range_test_step_size", "lr_range_test_step_rate",
                    "lr_range_test_staircase"),
}
#: keys a type cannot do without
SCHEDULER_REQUIRED = {
    "WarmupDecayLR": ("total_num_steps",),
    "WarmupCosineLR": ("total_num_steps",),
    "OneCycle": ("cycle_min_lr", "cycle_max_lr"),
}


class SchedulerParams(Section):
    """``scheduler.params``: the LR schedule's arguments (which keys each type takes: see ``scheduler.type``)."""

    warmup_min_lr: _Rate = Field(0.0, description="WarmupLR/WarmupDecayLR: learning rate at the start of warmup.")
    warmup_max_lr: Optional[_Rate] = Field(
        None, description="WarmupLR/WarmupDecayLR: learning rate at the end of warmup; null: the optimizer's lr "
        "(WarmupLR) or 0.001 (WarmupDecayLR), as in DeepSpeed."
    )
    warmup_num_steps: _PositiveInt = Field(1000, description="Warmup steps (at least 2 are used, as in DeepSpeed).")
    warmup_type: Literal["log", "linear"] = Field("log", description="Warmup curve: logarithmic or linear.")
    total_num_steps: Optional[Annotated[Union[int, str], BeforeValidator(_positive_or_auto)]] = Field(
        None, description="WarmupDecayLR/WarmupCosineLR (required): total training steps. \"auto\" stays until "
        "Config.resolve_auto or build_scheduler(total_num_steps=...) gives the number.",
        json_schema_extra=meta(keeps_auto=True),
    )
    warmup_min_ratio: _Fraction = Field(0.0, description="WarmupCosineLR: lr ratio at the start of warmup.")
    cos_min_ratio: _Fraction = Field(0.0001, description="WarmupCosineLR: lr ratio at the end of the cosine decay.")
    cycle_min_lr: Optional[_Rate] = Field(None, description="OneCycle (required): lower lr of the cycle.")
    cycle_max_lr: Optional[_Rate] = Field(None, description="OneCycle (required): upper lr of the cycle.")
    decay_lr_rate: _Rate = Field(0.0, description="OneCycle: lr decay rate after the cycle.")
    cycle_first_step_size: _PositiveInt = Field(2000, description="OneCycle: steps of the increasing half.")
    cycle_second_step_size: Optional[_Size] = Field(
        None, description="OneCycle: steps of the decreasing half; null: cycle_first_step_size."
    )
    cycle_first_stair_count: _Size = Field(0, description="OneCycle: stairs in the first half; 0: continuous.")
    cycle_second_stair_count: Optional[_Size] = Field(
        None, description="OneCycle: stairs in the second half; null: cycle_first_stair_count."
    )
    decay_step_size: _Size = Field(0, description="OneCycle: steps per decay interval after the cycle; 0: no decay.")
    cycle_momentum: StrictBool = Field(
        True, description="OneCycle: cycle beta1 inversely to the lr (optimizers with betas only; beta2 is set to "
        "0.99, as in DeepSpeed)."
    )
    cycle_min_mom: _Beta = Field(0.8, description="OneCycle: lower beta1 of the cycle.")
    cycle_max_mom: _Beta = Field(0.9, description="OneCycle: upper beta1 of the cycle.")
    decay_mom_rate: _Rate = Field(0.0, description="OneCycle: beta1 decay rate after the cycle.")
    lr_range_test_min_lr: _Rate = Field(0.001, description="LRRangeTest: starting lr.")
    lr_range_test_step_size: _PositiveInt = Field(2000, description="LRRangeTest: steps per lr increase.")
    lr_range_test_step_rate: _Rate = Field(1.0, description="LRRangeTest: lr increase per interval.")
    lr_range_test_staircase: StrictBool = Field(False, description="LRRangeTest: increase in stairs.")
    last_batch_iteration: _Int = Field(
        -1, description="Resume index of DeepSpeed's schedules; -1: start.",
        json_schema_extra=meta(unsupported="not supported; resume a schedule with scheduler.load_state_dict, and "
                               "remove the key", allowed=[-1]),
    )


class SchedulerConfig(Section):
    """The ``scheduler`` section: the LR schedule :func:`zerograph.build_scheduler` builds."""

    type: Literal["WarmupLR", "WarmupDecayLR", "WarmupCosineLR", "OneCycle", "LRRangeTest"] = Field(
        description="DeepSpeed's LR schedules (any case). The schedule is stepped once per optimizer step; the lr of "
        "each step equals DeepSpeed's."
    )
    params: SchedulerParams = Field(default_factory=SchedulerParams, description="The schedule's arguments.")

    @field_validator("type", mode="before")
    @classmethod
    def _any_case(cls, value: Any) -> Any:
        if isinstance(value, str):
            for name in SCHEDULER_PARAMS:
                if name.lower() == value.lower():
                    return name
        return value

    @model_validator(mode="after")
    def _params_of_type(self) -> "SchedulerConfig":
        takes = SCHEDULER_PARAMS[self.type] + ("last_batch_iteration",)
        given = self.params.model_fields_set
        lines = []
        extra = [k for k in SchedulerParams.model_fields if k in given and k not in takes]
        if extra:
            are = "is not a parameter" if len(extra) == 1 else "are not parameters"
            lines.append(f"scheduler.params: {', '.join(extra)} {are} of {self.type}; it takes {', '.join(takes)}")
        missing = [k for k in SCHEDULER_REQUIRED.get(self.type, ()) if getattr(self.params, k) is None]
        if missing:
            lines.append(f"scheduler.params: {self.type} needs {', '.join(missing)}")
        if lines:
            raise _problem("\n".join(lines))
        return self
