"""The precision sections: ``fp16``, ``bf16`` and ``data_types``."""

from __future__ import annotations

from typing import Annotated, Literal, Optional

import annotated_types
from pydantic import Field, StrictBool

from zerograph.config.values import _Float, _Int, _PositiveInt, Section, meta

_MASTERS = (
    "zerograph keeps fp32 master weights, gradients and optimizer states; 16-bit masters are not supported yet "
    "(remove the key or set it to false)"
)


class FP16Config(Section):
    """The ``fp16`` section: float16 mixed precision with loss scaling."""

    enabled: StrictBool = Field(
        False, description="Compute in float16 with loss scaling. DeepSpeed: `fp16.enabled`."
    )
    loss_scale: Annotated[_Float, annotated_types.Ge(0)] = Field(
        0.0,
        description="0 selects dynamic loss scaling; a positive value is a fixed (static) scale. "
        "DeepSpeed: same key.",
    )
    initial_scale_power: Annotated[_Int, annotated_types.Ge(0), annotated_types.Le(64)] = Field(
        16, description="Dynamic scaling starts at 2**initial_scale_power. DeepSpeed: same key."
    )
    loss_scale_window: _PositiveInt = Field(
        1000,
        description="Overflow-free steps before the dynamic scale is raised. DeepSpeed: same key.",
    )
    hysteresis: _PositiveInt = Field(
        2,
        description="Overflows tolerated before the dynamic scale is lowered (delayed shift). "
        "DeepSpeed: same key.",
    )
    min_loss_scale: Annotated[_Float, annotated_types.Gt(0)] = Field(
        1.0, description="Lower bound of the dynamic scale. DeepSpeed: same key."
    )
    auto_cast: StrictBool = Field(
        True,
        description="Cast floating-point inputs to float16. zerograph always casts them to the compute dtype "
        "(DeepSpeed's default is false).",
        json_schema_extra=meta(no_effect="zerograph always casts floating-point inputs to the compute dtype"),
    )
    consecutive_hysteresis: StrictBool = Field(
        False,
        description="Refill the hysteresis after every overflow-free step.",
        json_schema_extra=meta(
            unsupported="consecutive hysteresis is not supported yet: the loss scaler refills the hysteresis only "
            "when it raises the scale (remove the key or set it to false)",
            allowed=[False],
        ),
    )
    fp16_master_weights_and_grads: StrictBool = Field(
        False,
        description="Keep master weights and gradients in float16.",
        json_schema_extra=meta(unsupported=_MASTERS, allowed=[False]),
    )


class BF16Config(Section):
    """The ``bf16`` section (DeepSpeed's older name: ``bfloat16``): bfloat16 mixed precision."""

    enabled: StrictBool = Field(
        False,
        description="Compute in bfloat16 (no loss scaling needed). DeepSpeed: `bf16.enabled`.",
    )
    immediate_grad_update: StrictBool = Field(
        False,
        description="DeepSpeed: apply each gradient to its fp32 master as soon as it is reduced.",
        json_schema_extra=meta(no_effect="gradients are reduced into their fp32 shards by the compiled backward"),
    )
    check_grad_overflow: StrictBool = Field(
        True,
        description="Check bf16 gradients for inf/nan before the step. zerograph's check is "
        "`zerograph.nonfinite_grads`.",
        json_schema_extra=meta(
            no_effect="zerograph.nonfinite_grads decides what a non-finite bf16 gradient does",
            aliases=["check_overflow"],
        ),
    )
    bf16_master_weights_and_grads: StrictBool = Field(
        False,
        description="Keep master weights and gradients in bfloat16.",
        json_schema_extra=meta(unsupported=_MASTERS, allowed=[False]),
    )
    bf16_optimizer_states: StrictBool = Field(
        False,
        description="Keep optimizer states in bfloat16.",
        json_schema_extra=meta(unsupported=_MASTERS, allowed=[False]),
    )


_FP32_ONLY = (
    "zerograph reduces and accumulates gradients in fp32 (the master dtype); other dtypes are not supported yet "
    '(remove the key or set it to "fp32")'
)


class DataTypesConfig(Section):
    """The ``data_types`` section: the dtypes of gradient accumulation, parameters and buffers."""

    grad_accum_dtype: Optional[Literal["fp32", "fp16", "bf16"]] = Field(
        None,
        description="Dtype gradients are accumulated in; zerograph always uses fp32 (null: fp32).",
        json_schema_extra=meta(unsupported=_FP32_ONLY, allowed=[None, "fp32"]),
    )
    param_dtype: Optional[Literal["fp32", "fp16", "bf16"]] = Field(
        None,
        description="DeepSpeed: cast the model's parameters to this dtype. zerograph keeps the model's dtype "
        "(its shards are the masters).",
        json_schema_extra=meta(
            unsupported="zerograph keeps the parameters in the model's dtype (the fp32 masters) and computes in the "
            "fp16/bf16 section's dtype; remove the key", allowed=[None, "fp32"]),
    )
    buffer_dtype: Optional[Literal["fp32", "fp16", "bf16"]] = Field(
        None,
        description="DeepSpeed: cast the model's buffers to this dtype. zerograph keeps the buffers' dtypes.",
        json_schema_extra=meta(
            unsupported="zerograph keeps buffers in their own dtype; cast them in the model, and remove the key",
            allowed=[None],
        ),
    )
