"""The sections of a zerograph config: precision, ZeRO, offload, zerograph's own
options, activation checkpointing and pipeline parallelism."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

import annotated_types
import torch
from pydantic import BaseModel, BeforeValidator, Field, StrictBool, StrictStr, field_validator, model_validator

from zerograph.config.values import (
    _BUCKETING,
    _FROZEN,
    _Float,
    _Int,
    _PositiveInt,
    _Size,
    _expected,
    _no_effect,
    _problem,
    _whole_number,
)

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
