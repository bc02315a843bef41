"""zerograph's configuration: the DeepSpeed ds_config.json keys that carry over.

A config is loaded with :meth:`Config.load` from a JSON file path, a dict, an
existing :class:`Config`, or ``None`` (all defaults). Every section rejects
unknown keys, and every problem is reported as a :class:`ConfigError` with one
line per problem that names the dotted key. (Constructing the models directly,
e.g. ``Config(**kwargs)``, validates the same way but raises pydantic's
``ValidationError``.)

Some keys are accepted only so that existing DeepSpeed configs load; they have
no effect yet. :meth:`Config.inactive_settings` lists the ones a config changes.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import annotated_types
import torch
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

__all__ = [
    "ConfigError",
    "Config",
    "FP16Config",
    "BF16Config",
    "ZeroConfig",
    "OffloadConfig",
    "ZerographOptions",
    "PipelineConfig",
    "reference_markdown",
]

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


# ---------------------------------------------------------------------------
# Sections


class FP16Config(BaseModel):
    """The ``fp16`` section: float16 mixed precision with loss scaling."""

    model_config = _FROZEN

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


class BF16Config(BaseModel):
    """The ``bf16`` section: bfloat16 mixed precision."""

    model_config = _FROZEN

    enabled: StrictBool = Field(
        False,
        description="Compute in bfloat16 (no loss scaling needed). DeepSpeed: `bf16.enabled`.",
    )


class OffloadConfig(BaseModel):
    """``zero_optimization.offload_optimizer`` / ``offload_param`` (ZeRO-Offload)."""

    model_config = _FROZEN

    device: Literal["none", "cpu", "nvme"] = Field(
        "none",
        description="Where to offload to: \"none\", or \"cpu\" (host memory); \"nvme\" is "
        "rejected. DeepSpeed: same key.",
    )
    pin_memory: StrictBool = Field(
        False, description="Use pinned host memory for offloaded buffers (only where an accelerator exists; "
        "CPU builds cannot pin). DeepSpeed: same key."
    )
    nvme_path: Optional[StrictStr] = Field(
        None, description="Directory for NVMe offload files. DeepSpeed: same key."
    )
    buffer_count: _PositiveInt = Field(
        4, description="Number of staging buffers for NVMe offload. DeepSpeed: same key."
    )
    fast_init: StrictBool = Field(
        False, description="Fast optimizer initialization for NVMe offload. DeepSpeed: same key."
    )


class ZeroConfig(BaseModel):
    """The ``zero_optimization`` section: what is sharded and how."""

    model_config = _FROZEN

    stage: Annotated[Literal[0, 1, 2, 3], BeforeValidator(_whole_number)] = Field(
        0,
        description="0: plain data parallel; 1: shard optimizer state; 2: also shard gradients; "
        "3: also shard parameters. DeepSpeed: same key.",
    )
    overlap_comm: StrictBool = Field(
        True,
        description="Overlap collectives with computation (the schedule_collectives pass: "
        "prefetch the next gather, defer reduction waits); false runs every collective on demand. "
        "DeepSpeed: same key.",
    )
    contiguous_gradients: StrictBool = Field(
        True,
        description="Copy gradients into one contiguous buffer as they are produced. "
        "DeepSpeed: same key.",
        json_schema_extra=_BUCKETING,
    )
    reduce_scatter: StrictBool = Field(
        True,
        description="Reduce gradients with reduce-scatter rather than all-reduce. "
        "DeepSpeed: same key.",
        json_schema_extra=_BUCKETING,
    )
    stage3_gather_16bit_weights_on_model_save: StrictBool = Field(
        False,
        description="Gather full 16-bit weights when the model is saved. zerograph.export_pretrained and "
        "zerograph.full_state_dict always gather the full weights. DeepSpeed: same key.",
        json_schema_extra=_no_effect("zerograph.export_pretrained and full_state_dict always gather full weights"),
    )
    sub_group_size: _Size = Field(
        1_000_000_000,
        description="Elements per optimizer sub-group step (DeepSpeed's offload granularity). "
        "DeepSpeed: same key.",
        json_schema_extra=_no_effect("the optimizer steps each parameter's shard; there are no sub-groups"),
    )
    round_robin_gradients: StrictBool = Field(
        False,
        description="Stage 1/2 offload: interleave gradient copies across ranks. DeepSpeed: same key.",
        json_schema_extra=_no_effect("gradients are reduced in the compiled backward's order"),
    )
    ignore_unused_parameters: StrictBool = Field(
        True,
        description="Stage 1/2: allow parameters that get no gradient. zerograph always does "
        "(the optimizer skips them). DeepSpeed: same key.",
        json_schema_extra=_no_effect("parameters without a gradient are always allowed and skipped by the optimizer"),
    )
    reduce_bucket_size: _Size = Field(
        500_000_000,
        description="At most this many elements per fused gradient reduction. Buckets never span "
        "two blocks (one reduction per transformer block); 0 turns bucketing off. DeepSpeed: same key.",
    )
    allgather_bucket_size: _Size = Field(
        500_000_000,
        description="At most this many elements per fused parameter all-gather. Buckets never span "
        "two blocks (one gather per transformer block); 0 turns bucketing off. DeepSpeed: same key.",
    )
    stage3_max_live_parameters: _Size = Field(
        1_000_000_000,
        description="Most gathered (unsharded) parameter elements held at once in stage 3: a "
        "gather is started ahead of its use (prefetched) only if it and the buckets still in use "
        "fit within this bound; a larger bucket or parameter is gathered on demand. "
        "DeepSpeed: same key.",
    )
    stage3_max_reuse_distance: _Size = Field(
        0,
        description="Stage 3: keep a gathered parameter from the forward into the backward (no backward "
        "re-gather) when fewer than this many elements of other parameters are used between its last "
        "forward use and its first backward use (the last layers); kept parameters count against "
        "stage3_max_live_parameters. zerograph's default is 0 (re-gather every parameter, like FSDP2); "
        "DeepSpeed's default is 1e9. DeepSpeed: same key.",
    )
    stage3_prefetch_bucket_size: _Size = Field(
        50_000_000,
        description="A gather bucket of at most this many elements is started one bucket ahead of "
        "its use; larger buckets are gathered on demand. DeepSpeed: same key.",
    )
    stage3_param_persistence_threshold: _Size = Field(
        0,
        description="Parameters of at most this many elements stay unsharded (replicated) in stage 3: "
        "they are never gathered and their gradients are all-reduced. zerograph's default is 0, so "
        "every parameter is sharded (like FSDP2); DeepSpeed's default is 1e5.",
    )
    offload_optimizer: OffloadConfig = Field(
        default_factory=OffloadConfig,
        description="ZeRO-Offload of optimizer state; null means no offload. Device \"cpu\": fp32 master "
        "shards and optimizer states on the host, the step runs there (build the optimizer with "
        "zerograph.make_optimizer); \"nvme\" is rejected. DeepSpeed: same key.",
    )
    offload_param: OffloadConfig = Field(
        default_factory=OffloadConfig,
        description="ZeRO-Offload of parameters (stage 3 only); null means no offload. Device \"cpu\": each "
        "rank's parameter shards live in host memory and the compiled graphs copy each one to the device "
        "ahead of its all-gather (prefetched with it); gradient shards are copied back to the host, where "
        "the optimizer step runs, with or without offload_optimizer (zerograph.make_optimizer steps the "
        "shards in place, with no second master copy). Parameters under stage3_param_persistence_threshold stay on the device. "
        "\"nvme\" is rejected. DeepSpeed: same key.",
    )

    @field_validator("offload_optimizer", "offload_param", mode="before")
    @classmethod
    def _null_is_no_offload(cls, value: Any) -> Any:
        return {} if value is None else value

    @field_validator("offload_optimizer", "offload_param", mode="after")
    @classmethod
    def _no_nvme(cls, value: OffloadConfig, info: Any) -> OffloadConfig:
        if value.device == "nvme":
            raise _problem('{key}.device="nvme" (ZeRO-Infinity) is not supported; use device "cpu" (host memory)')
        return value

    @model_validator(mode="after")
    def _param_offload_needs_stage3(self) -> "ZeroConfig":
        if self.offload_param.device == "cpu" and self.stage != 3:
            raise _problem(
                f'zero_optimization.offload_param.device="cpu" needs zero_optimization.stage 3 (now {self.stage}): '
                "only stage 3 gathers parameters from shards, so only there can they live on the host; "
                'set stage to 3, or use offload_optimizer.device "cpu" (optimizer states on the host) instead'
            )
        return self


class ZerographOptions(BaseModel):
    """The ``zerograph`` section: options of zerograph itself (not in DeepSpeed)."""

    model_config = _FROZEN

    compiler: Literal["eager", "inductor"] = Field(
        "eager",
        description="What executes the final FX graphs: \"eager\" runs them as plain PyTorch ops, "
        "\"inductor\" compiles them with TorchInductor.",
    )
    disabled_passes: tuple[StrictStr, ...] = Field(
        (), description="Names of graph passes to skip (for debugging)."
    )
    memory_limit_bytes: Optional[_Size] = Field(
        None,
        description="Per-rank memory the training step may use. When set, each compiled region is planned "
        "(model states + the liveness analysis' step peak, plus, with graph breaks, what the regions that ran "
        "before it hold for their backward) as its backward graph is compiled, and "
        "zerograph.MemoryBudgetError is raised before the step runs if the total is over the limit, naming "
        "the largest consumer and the config keys that shrink it. null: no check (an out-of-memory error "
        "still gets the same advice).",
    )
    debug: StrictBool = Field(False, description="Log per-pass timing and node diffs.")
    track_memory: StrictBool = Field(
        False,
        description="Run the compiled graphs through a measuring interpreter that records the live "
        "gathered-parameter bytes after every node and the collectives run (checks the liveness "
        "analysis; slow, for tests and debugging; see docs/planner.md).",
    )
    fusion: StrictBool = Field(
        False,
        description="Rewrite attention, RMSNorm/LayerNorm, GELU/SwiGLU and cross-entropy subgraphs of the "
        "Dynamo graph into zerograph's fused kernels (Triton on CUDA, pure-torch references elsewhere). "
        "Disable one family with `disabled_passes` (`fuse_attention`, `fuse_norms`, `fuse_mlp_activation`, "
        "`fuse_cross_entropy`); see docs/passes.md.",
    )
    verify_graphs: StrictBool = Field(
        False, description="Run graph verification after every pass (slow; for debugging)."
    )
    collective_timeout_s: Annotated[_Float, annotated_types.Gt(0)] = Field(
        300.0, description="Timeout in seconds for collective operations. Set on the data-parallel process "
        "group (also one you initialized); a collective waiting longer, e.g. on a dead rank, fails with a "
        "RankFailureError naming that rank (docs/troubleshooting.md#a-rank-died)."
    )
    seed_from_rank0: StrictBool = Field(
        True,
        description="Broadcast the initial parameters from rank 0 so all ranks start identical.",
    )
    nonfinite_grads: Literal["raise", "skip", "ignore"] = Field(
        "raise",
        description="bf16/fp32 gradients with nan/inf at an optimizer step: \"raise\" a FloatingPointError "
        "naming the step and parameters, \"skip\" the step (gradients dropped, as fp16 overflow does), or "
        "\"ignore\" (no check). The check reads each gradient once (an fp32 sum) and all-reduces one flag per "
        "step. fp16 always skips and lowers the loss scale.",
    )
    device: Optional[Annotated[StrictStr, annotated_types.MinLen(3)]] = Field(
        None,
        description="Where parameter shards and compute live (\"cpu\", \"cuda\", \"cuda:1\"). Default: "
        "the process group's device (NCCL: the current CUDA device, gloo: cpu); without a group, or with "
        "another backend, the device the model's parameters are on.",
    )

    @field_validator("device")
    @classmethod
    def _known_device(cls, value):
        if value is None:
            return value
        try:
            torch.device(value)
        except RuntimeError:
            raise _expected('a torch device such as "cpu", "cuda" or "cuda:0"') from None
        return value


class ActivationCheckpointingConfig(BaseModel):
    """The ``activation_checkpointing`` section: what the forward saves for the backward
    (see docs/activations.md). DeepSpeed's keys of this section are accepted where they
    map onto a policy and rejected otherwise, with the zerograph equivalent named."""

    model_config = _FROZEN

    policy: Literal["none", "per_layer", "selective", "memory_budget"] = Field(
        "none",
        description="\"none\": save what eager autograd saves; \"per_layer\": recompute everything "
        "inside each block, saving only block outputs; \"selective\": save matmul/attention outputs, "
        "recompute pointwise ops; \"memory_budget\": save the fewest activation bytes a minimum cut "
        "allows within memory_budget, recomputing as few matmuls as it can. Random ops (dropout) are "
        "always saved, never recomputed.",
    )
    memory_budget: Optional[Union[float, int]] = Field(
        None,
        description="For policy \"memory_budget\": a float in [0, 1] (fraction of the activation "
        "bytes policy \"none\" saves; parameters and inputs, held anyway, do not count) or an int >= 2 "
        "(activation bytes). Required by that policy, rejected by the others.",
    )
    offload_activations: StrictBool = Field(
        False,
        description="Copy the tensors the forward saves for the backward to host memory after the "
        "forward and back to the device at the start of the backward (pinned, non-blocking on CUDA; "
        "plain copies on CPU). DeepSpeed: cpu_checkpointing.",
    )
    block_pattern: Optional[StrictStr] = Field(
        None,
        description="Regex matched (re.search) against a node's module path; the matched text names "
        "its block for \"per_layer\". Default: the path up to its first integer (\"transformer.h.3\").",
    )
    partition_activations: StrictBool = Field(
        False, description="DeepSpeed key; true is rejected: activations are per-rank already (data parallel)."
    )
    cpu_checkpointing: StrictBool = Field(
        False, description="DeepSpeed key; true means offload_activations: true."
    )
    number_checkpoints: Optional[_PositiveInt] = Field(
        None, description="DeepSpeed key; rejected: use block_pattern to choose the blocks."
    )
    contiguous_memory_optimization: StrictBool = Field(
        False, description="DeepSpeed key; true is rejected: the partitioner lays out saved tensors."
    )
    synchronize_checkpoint_boundary: StrictBool = Field(
        False, description="DeepSpeed key; accepted, no effect (graphs need no synchronization)."
    )
    profile: StrictBool = Field(
        False, description="DeepSpeed key; accepted, no effect (use zerograph.inspect)."
    )

    @model_validator(mode="after")
    def _deepspeed_keys(self) -> "ActivationCheckpointingConfig":
        fixes = {
            "partition_activations": "remove it: with data parallelism each rank saves only its own batch",
            "number_checkpoints": "set block_pattern to a regex naming the blocks to checkpoint",
            "contiguous_memory_optimization": "remove it: saved tensors are laid out by the partitioner",
        }
        for key, fix in fixes.items():
            if getattr(self, key) not in (False, None):
                raise _problem(f"activation_checkpointing.{key} is not supported; {fix}")
        if self.cpu_checkpointing:
            object.__setattr__(self, "offload_activations", True)
        budget = self.memory_budget
        if self.policy == "memory_budget":
            if budget is None or isinstance(budget, bool):
                raise _problem('activation_checkpointing.policy="memory_budget" needs memory_budget: '
                               'a fraction such as 0.5 or a number of bytes')
            if isinstance(budget, float) and not 0.0 <= budget <= 1.0:
                raise _problem(f"activation_checkpointing.memory_budget={budget} is a fraction outside [0, 1]; "
                               "give a fraction in [0, 1] or an int number of bytes")
            if isinstance(budget, int) and budget in (0, 1):
                raise _problem(f"activation_checkpointing.memory_budget={budget} is ambiguous; write "
                               f"{float(budget)} for a fraction (ints are bytes)")
            if isinstance(budget, int) and budget < 0:
                raise _problem(f"activation_checkpointing.memory_budget={budget} is negative; give bytes >= 2")
        elif budget is not None:
            raise _problem(f'activation_checkpointing.memory_budget is set but policy is "{self.policy}"; '
                           'set policy: "memory_budget" or remove memory_budget')
        if self.block_pattern is not None:
            import re

            try:
                re.compile(self.block_pattern)
            except re.error as err:
                raise _problem(f"activation_checkpointing.block_pattern is not a valid regex ({err}); fix the pattern")
        return self


class PipelineConfig(BaseModel):
    """The ``pipeline`` section: pipeline parallelism (zerograph's own; see docs/pipeline.md)."""

    model_config = _FROZEN

    stages: _PositiveInt = Field(
        1,
        description="Pipeline stages p; 1 turns pipelining off. The world size must be p x the "
        "data-parallel size; each stage is ZeRO-sharded over its own data-parallel group.",
    )
    micro_batches: Optional[_PositiveInt] = Field(
        None,
        description="Micro-batches per train_step; null uses gradient_accumulation_steps. The batch "
        "given to train_step must split evenly into them.",
    )
    schedule: Literal["1f1b", "gpipe", "interleaved_1f1b"] = Field(
        "1f1b",
        description="\"1f1b\": at most p micro-batches in flight per stage; \"gpipe\": all forwards, "
        "then all backwards; \"interleaved_1f1b\": the model is cut into stages x virtual_stages "
        "stages, rank r holds stages r, r+p, ... (Megatron-LM's virtual pipeline stages); "
        "micro-batches must be a multiple of stages.",
    )
    virtual_stages: Optional[_PositiveInt] = Field(
        None,
        description="Model stages per rank for \"interleaved_1f1b\" (>= 2; null: 2). Must be 1 (or null) "
        "for the other schedules. The bubble is (p-1)/(v*m+p-1) of a step instead of (p-1)/(m+p-1).",
    )
    split_points: tuple[StrictStr, ...] = Field(
        (),
        description="Module names that start stages 1..p-1 (1..p*v-1 with virtual stages; e.g. "
        "[\"transformer.h.2\"]); empty: "
        "balance the stages by a cost model (FLOPs + parameter bytes). The loss is always computed "
        "on the last stage.",
    )

    @model_validator(mode="after")
    def _virtual_stages(self) -> "PipelineConfig":
        v = self.virtual_stages
        if self.schedule != "interleaved_1f1b":
            if v not in (None, 1):
                raise _problem(
                    f'pipeline.virtual_stages={v} needs pipeline.schedule="interleaved_1f1b"; '
                    f'schedule "{self.schedule}" runs one stage per rank (remove virtual_stages or set it to 1)'
                )
            return self
        if v == 1:
            raise _problem(
                'pipeline.virtual_stages=1 with schedule "interleaved_1f1b": interleaving needs at least 2 '
                'stages per rank; set virtual_stages >= 2, or use schedule "1f1b"'
            )
        if self.stages < 2:
            raise _problem(
                'pipeline.schedule="interleaved_1f1b" needs pipeline.stages >= 2 (the number of pipeline '
                f"ranks); got stages={self.stages}"
            )
        if self.micro_batches is not None and self.micro_batches % self.stages:
            up = (self.micro_batches // self.stages + 1) * self.stages
            raise _problem(
                f'pipeline.schedule="interleaved_1f1b" needs pipeline.micro_batches to be a multiple of '
                f"pipeline.stages={self.stages}; got {self.micro_batches}: set micro_batches to {up}"
            )
        return self

    @property
    def chunks(self) -> int:
        """Model stages per rank: ``virtual_stages`` for interleaved 1F1B (default 2), else 1."""
        if self.schedule != "interleaved_1f1b":
            return 1
        return self.virtual_stages or 2


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
            return _validate(dict(source), None)
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
            return _validate(data, str(path))
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
# Error messages


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


def _validate(data: dict[str, Any], source: str | None) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError([_describe(err) for err in e.errors()], source) from None


def _dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The BaseModel class inside ``annotation`` (unwrapping Optional/Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _section_model(arg)
        if found is not None:
            return found
    return None


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] | None = Config
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


def _allowed(loc: tuple[Any, ...], ctx: dict[str, Any]) -> str:
    model = _model_at(loc[:-1])
    field = model.model_fields.get(loc[-1]) if model is not None and loc else None
    values = _literal_values(field.annotation) if field is not None else ()
    if not values:
        return f"allowed: {ctx.get('expected', '?')}"
    return "allowed: " + ", ".join(json.dumps(v) for v in values)


def _unknown_key(loc: tuple[Any, ...]) -> str:
    key, section = loc[-1], loc[:-1]
    if not section and key in _REMOVED_SECTIONS:
        return f"unknown config key '{key}': {_REMOVED_SECTIONS[key]}"
    model = _model_at(section)
    valid = list(model.model_fields) if model is not None else []
    close = difflib.get_close_matches(str(key), valid, n=1)
    hint = f"did you mean '{close[0]}'?" if close else "valid keys: " + ", ".join(valid)
    return f"unknown config key '{_dotted(loc)}'; {hint}"


def _requirement(err: Any) -> str:
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
        return _allowed(loc, ctx)
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


def _describe(err: Any) -> str:
    """One line for one pydantic error."""
    kind, loc = err["type"], tuple(err["loc"])
    key = _dotted(loc)
    if kind == "extra_forbidden":
        return _unknown_key(loc)
    if kind == _PROBLEM:
        return err["ctx"]["template"].replace("{key}", key)
    value = err.get("input")
    requirement = _requirement(err)
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


# ---------------------------------------------------------------------------
# Markdown reference


def _constraint_text(metadata: Iterable[Any]) -> str:
    parts = []
    for m in metadata:
        for attr, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if isinstance(m, getattr(annotated_types, attr.capitalize())):
                parts.append(f"{op} {getattr(m, attr)}")
    return " and ".join(parts)


def _type_text(annotation: Any, metadata: Iterable[Any] = ()) -> str:
    metadata = list(metadata)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return _type_text(args[0], list(annotation.__metadata__) + metadata)
    if origin is Union or origin is types.UnionType:
        inner = [a for a in args if a is not type(None)]
        text = " or ".join(_type_text(a, metadata) for a in inner)
        return text + (", or null" if len(inner) < len(args) else "")
    if origin is Literal:
        return "one of " + ", ".join(json.dumps(a) for a in args)
    if origin is tuple:
        return f"list of {_type_text(args[0])}s"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    names = {bool: "boolean", int: "integer", float: "number", str: "string"}
    text = names.get(annotation, getattr(annotation, "__name__", str(annotation)))
    constraint = _constraint_text(metadata)
    return f"{text} {constraint}" if constraint else text


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _sections() -> list[tuple[list[str], type[BaseModel]]]:
    """(dotted paths, model) for every section, depth first; a shared model once."""
    found: list[tuple[list[str], type[BaseModel]]] = []

    def visit(path: str, model: type[BaseModel]) -> None:
        for paths, seen in found:
            if seen is model:
                paths.append(path)
                return
        found.append(([path] if path else [], model))
        for name, field in model.model_fields.items():
            sub = _section_model(field.annotation)
            if sub is not None:
                visit(f"{path}.{name}" if path else name, sub)

    visit("", Config)
    return found


def reference_markdown() -> str:
    """A markdown reference of every config key, generated from the models."""
    out = [
        '<!-- Generated by `python -c "import zerograph.config as c; print(c.reference_markdown())"`;'
        " do not edit by hand. -->",
        "",
        "## Reference",
    ]
    for paths, model in _sections():
        title = " / ".join(f"`{p}`" for p in paths) if paths else "Top level"
        doc = (model.__doc__ or "").strip().splitlines()[0]
        out += ["", f"### {title}", "", doc, ""]
        out.append("| key | type | default | DeepSpeed equivalent / notes |")
        out.append("| --- | --- | --- | --- |")
        for name, field in model.model_fields.items():
            sub = _section_model(field.annotation)
            notes = field.description or ""
            if sub is not None:
                first = ".".join(filter(None, [paths[0] if paths else "", name]))
                notes += f" See the `{first}` table."
                default = "see table"
            else:
                default = f"`{json.dumps(_jsonable(field.get_default(call_default_factory=True)))}`"
            extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
            if extra.get("no_effect_yet"):
                notes += f" **No effect yet** ({extra['no_effect_yet']})."
            type_text = _type_text(field.annotation, field.metadata)
            out.append(f"| `{name}` | {_cell(type_text)} | {_cell(default)} | {_cell(notes)} |")
    return "\n".join(out)


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
