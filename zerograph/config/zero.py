"""The ``zero_optimization`` section: ZeRO stages, buckets, prefetching and offload."""

from __future__ import annotations

import logging
import sys
from typing import Annotated, Any, Literal, Optional

import annotated_types
from pydantic import BeforeValidator, Field, StrictBool, StrictStr, field_validator, model_validator

from zerograph.config.values import (
    ForeignSection,
    Section,
    _Float,
    _Int,
    _PositiveInt,
    _problem,
    _Size,
    _whole_number,
    foreign,
    meta,
)

log = logging.getLogger(__name__)

_BUCKETING = "zerograph picks the reduction per stage and lays gradients out in its bucket buffers"
_NO_HOOKS = "zerograph traces the model and gathers parameters per bucket; there are no ZeRO-3 module hooks"
_ZEROPP = " not supported yet; remove the key or set it to "
_WITH_NVME = " Used with device \"nvme\" only."


class OffloadConfig(Section):
    """``zero_optimization.offload_optimizer`` / ``offload_param`` (ZeRO-Offload): the keys both have."""

    device: Literal["none", "cpu", "nvme"] = Field(
        "none",
        description="Where to offload to: \"none\", \"cpu\" (host memory) or \"nvme\" (files under "
        "nvme_path, ZeRO-Infinity; docs/nvme_offload.md). DeepSpeed: same key.",
    )
    pin_memory: StrictBool = Field(
        False, description="Use pinned host memory for offloaded buffers (only where an accelerator exists; "
        "CPU builds cannot pin). DeepSpeed: same key (DeepSpeed's default is true)."
    )
    nvme_path: Optional[StrictStr] = Field(
        None, description="Directory (on a local NVMe drive) for the offload files; each rank makes its own "
        "sub-directory there, fresh per run, removed at a clean exit. Required with device \"nvme\". "
        "DeepSpeed: same key.",
    )
    buffer_count: _PositiveInt = Field(
        4, description="Host buffers of one optimizer sub-group each that the NVMe swap cycles through "
        "(reads ahead, steps, writes behind)." + _WITH_NVME + " DeepSpeed: same key.",
    )

    @model_validator(mode="after")
    def _nvme_needs_a_path(self) -> "OffloadConfig":
        if self.device == "nvme" and not self.nvme_path:
            raise _problem('{key}.device is "nvme" but {key}.nvme_path is not set: set it to a directory on a '
                           "local NVMe drive (each rank writes its offloaded states there)")
        return self


class OffloadParamConfig(OffloadConfig):
    """``zero_optimization.offload_param``: parameter offload (stage 3)."""

    buffer_count: _PositiveInt = Field(
        5, description="Parameter shards read ahead at once: the compiled graphs request each file shard's read "
        "(read_ahead nodes) so that at most buffer_count shards, of at most buffer_count * buffer_size elements, "
        "are requested and not yet copied to the compute device; the read-ahead pages are the memory-mapped "
        "parameter file's, in the page cache (docs/nvme_offload.md)." + _WITH_NVME + " DeepSpeed: same key "
        "(DeepSpeed's pool of read buffers).",
    )
    buffer_size: _Size = Field(
        100_000_000, description="Elements per read-ahead buffer: as in DeepSpeed, a parameter shard in the file "
        "larger than buffer_size is an error (raised when the model is sharded)." + _WITH_NVME +
        " DeepSpeed: same key.",
    )
    max_in_cpu: _Size = Field(
        1_000_000_000, description="Parameter elements (per rank, in model order) kept in host memory; the rest "
        "go to files. DeepSpeed's default keeps models under 1e9 elements per rank in memory: set 0 to put every "
        "offloaded shard in a file." + _WITH_NVME + " DeepSpeed: same key.",
    )


class OffloadOptimizerConfig(OffloadConfig):
    """``zero_optimization.offload_optimizer``: optimizer-state offload."""

    fast_init: StrictBool = Field(
        False, description="false: reserve the swap files' blocks when the optimizer is built (posix_fallocate), "
        "so a full disk fails then; true: sparse files, blocks allocated at the first write." + _WITH_NVME
        + " DeepSpeed: same key.",
    )
    pipeline_read: StrictBool = Field(
        False, description="Read the next optimizer sub-groups while this one steps." + _WITH_NVME
        + " DeepSpeed: same key.",
    )
    pipeline_write: StrictBool = Field(
        False, description="Write a stepped sub-group while the next ones step." + _WITH_NVME
        + " DeepSpeed: same key.",
    )
    ratio: Annotated[_Float, annotated_types.Ge(0), annotated_types.Le(1)] = Field(
        1.0,
        description="With device \"nvme\": the fraction of the optimizer sub-groups (in parameter order) whose "
        "states live in files; the rest keep theirs in host memory. Device \"cpu\" offloads everything "
        "(ZeRO-Offload++'s partial offload is not supported: 1 only). DeepSpeed: same key.",
    )
    super_offload: StrictBool = Field(
        False, description="DeepSpeed's SuperOffload (superchip offload).",
        json_schema_extra=meta(unsupported="SuperOffload is not supported yet; remove the key or set it to false",
                               allowed=[False]),
    )
    cpuadam_cores_perc: Annotated[_Float, annotated_types.Ge(0), annotated_types.Le(1)] = Field(
        0.8, description="Share of host cores DeepSpeed's CPU Adam uses.",
        json_schema_extra=meta(no_effect="the host step runs a torch optimizer on torch's threads "
                               "(torch.set_num_threads)"),
    )

    @model_validator(mode="after")
    def _ratio_needs_nvme(self) -> "OffloadOptimizerConfig":
        if self.ratio != 1.0 and self.device != "nvme":
            raise _problem(f"{{key}}.ratio={self.ratio}: partial optimizer offload (ZeRO-Offload++) is supported "
                           'with device "nvme" only (the rest of the sub-groups stay in host memory); remove the '
                           "key or set it to 1")
        return self


class AioConfig(Section):
    """The ``aio`` section: how NVMe offload's file I/O is issued (DeepSpeed's async I/O)."""

    block_size: _PositiveInt = Field(
        1_048_576, description="Bytes per I/O request (one preadv/pwritev call); a multiple of 4096. "
        "DeepSpeed: same key.",
    )
    queue_depth: _PositiveInt = Field(
        8, description="Requests of one transfer in flight at once. DeepSpeed: same key.",
    )
    intra_op_parallelism: _PositiveInt = Field(
        1, description="Threads issuing the I/O requests. DeepSpeed: same key (older name thread_count).",
        json_schema_extra=meta(aliases=["thread_count"]),
    )
    single_submit: StrictBool = Field(
        False, description="Submit requests one by one rather than as a batch.",
        json_schema_extra=meta(no_effect="each request is its own system call on a pool thread; threads have no "
                               "batched submission"),
    )
    overlap_events: StrictBool = Field(
        True, description="true: issue a request as soon as one completes (queue_depth in flight); false: "
        "requests go in waves of queue_depth, each waited for before the next. DeepSpeed: same key.",
    )
    use_gds: StrictBool = Field(
        False, description="DeepSpeed: read and write GPU memory directly with GPUDirect Storage.",
        json_schema_extra=meta(
            unsupported="GPUDirect Storage needs an NVIDIA GPU with cuFile (GDS); zerograph's NVMe offload reads "
            "and writes through host buffers. Remove the key or set it to false", allowed=[False]),
    )

    @field_validator("block_size")
    @classmethod
    def _aligned(cls, value: int) -> int:
        if value % 4096:
            raise _problem(f"{{key}}={value}: must be a multiple of 4096 (the O_DIRECT alignment), e.g. "
                           f"{max(4096, value // 4096 * 4096)}")
        return value


class LeafModuleConfig(Section):
    """``zero_optimization.leaf_module``: modules ZeRO-3 fetches as a whole (DeepSpeed's hooks)."""

    classes: tuple[StrictStr, ...] = Field((), description="Module class names.",
                                           json_schema_extra=meta(no_effect=_NO_HOOKS))
    names: tuple[StrictStr, ...] = Field((), description="Module names.", json_schema_extra=meta(no_effect=_NO_HOOKS))
    name_suffixes: tuple[StrictStr, ...] = Field((), description="Module name suffixes.",
                                                 json_schema_extra=meta(no_effect=_NO_HOOKS))


# DeepSpeed's deprecated keys that became offload sections: key -> (section, setting)
DEPRECATED_OFFLOAD_KEYS = {
    "cpu_offload": ("offload_optimizer", {"device": "cpu"}),
    "cpu_offload_param": ("offload_param", {"device": "cpu"}),
    "cpu_offload_use_pin_memory": (("offload_optimizer", "offload_param"), {"pin_memory": True}),
}


class ZeroConfig(Section):
    """The ``zero_optimization`` section: what is sharded and how."""

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
        json_schema_extra=meta(no_effect=_BUCKETING),
    )
    reduce_scatter: StrictBool = Field(
        True,
        description="Reduce gradients with reduce-scatter rather than all-reduce. "
        "DeepSpeed: same key.",
        json_schema_extra=meta(no_effect=_BUCKETING),
    )
    stage3_gather_16bit_weights_on_model_save: StrictBool = Field(
        False,
        description="Gather full 16-bit weights when the model is saved. zerograph.export_pretrained and "
        "zerograph.full_state_dict always gather the full weights. DeepSpeed: same key.",
        json_schema_extra=meta(
            no_effect="zerograph.export_pretrained and full_state_dict always gather full weights",
            aliases=["gather_16bit_weights_on_model_save"],
            deprecated=["stage3_gather_fp16_weights_on_model_save"],
        ),
    )
    sub_group_size: _Size = Field(
        1_000_000_000,
        description="Elements per optimizer sub-group (whole parameter shards, in parameter order; a larger "
        "shard is a sub-group of its own). With offload_optimizer.device \"nvme\" each sub-group is read, "
        "stepped and written back on its own, so host memory holds buffer_count sub-groups at most. "
        "DeepSpeed: same key.",
    )
    round_robin_gradients: StrictBool = Field(
        False,
        description="Stage 1/2 offload: interleave gradient copies across ranks. DeepSpeed: same key.",
        json_schema_extra=meta(no_effect="gradients are reduced in the compiled backward's order"),
    )
    ignore_unused_parameters: StrictBool = Field(
        True,
        description="Stage 1/2: allow parameters that get no gradient. zerograph always does "
        "(the optimizer skips them). DeepSpeed: same key.",
        json_schema_extra=meta(
            no_effect="parameters without a gradient are always allowed and skipped by the optimizer"),
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
        json_schema_extra=meta(aliases=["max_live_parameters"]),
    )
    stage3_max_reuse_distance: _Size = Field(
        0,
        description="Stage 3: keep a gathered parameter from the forward into the backward (no backward "
        "re-gather) when fewer than this many elements of other parameters are used between its last "
        "forward use and its first backward use (the last layers); kept parameters count against "
        "stage3_max_live_parameters. zerograph's default is 0 (re-gather every parameter, like FSDP2); "
        "DeepSpeed's default is 1e9. DeepSpeed: same key.",
        json_schema_extra=meta(aliases=["max_reuse_distance"]),
    )
    stage3_prefetch_bucket_size: _Size = Field(
        50_000_000,
        description="A gather bucket of at most this many elements is started one bucket ahead of "
        "its use; larger buckets are gathered on demand. DeepSpeed: same key.",
        json_schema_extra=meta(aliases=["prefetch_bucket_size"]),
    )
    stage3_param_persistence_threshold: _Size = Field(
        0,
        description="Parameters of at most this many elements stay unsharded (replicated) in stage 3: "
        "they are never gathered and their gradients are all-reduced. zerograph's default is 0, so "
        "every parameter is sharded (like FSDP2); DeepSpeed's default is 1e5.",
        json_schema_extra=meta(aliases=["param_persistence_threshold"]),
    )
    offload_optimizer: OffloadOptimizerConfig = Field(
        default_factory=OffloadOptimizerConfig,
        description="ZeRO-Offload of optimizer state; null means no offload. Device \"cpu\": fp32 master "
        "shards and optimizer states on the host, the step runs there (build the optimizer with "
        "zerograph.make_optimizer); \"nvme\": the masters and states in files under nvme_path, swapped in per "
        "sub_group_size sub-group for the step (docs/nvme_offload.md). DeepSpeed: same key (deprecated form: "
        "`cpu_offload: true`).",
    )
    offload_param: OffloadParamConfig = Field(
        default_factory=OffloadParamConfig,
        description="ZeRO-Offload of parameters (stage 3 only); null means no offload. Device \"cpu\": each "
        "rank's parameter shards live in host memory and the compiled graphs copy each one to the device "
        "ahead of its all-gather (prefetched with it); gradient shards are copied back to the host, where "
        "the optimizer step runs, with or without offload_optimizer (zerograph.make_optimizer steps the "
        "shards in place, with no second master copy). Parameters under stage3_param_persistence_threshold stay on "
        "the device. "
        "\"nvme\": the shards in files under nvme_path, read ahead of each copy in the compiled schedule's order "
        "(docs/nvme_offload.md). DeepSpeed: same key (deprecated form: `cpu_offload_param: true`).",
    )
    allgather_partitions: StrictBool = Field(
        True, description="Gather updated parameters with all-gather (false: a series of broadcasts).",
        json_schema_extra=meta(no_effect="parameters are always gathered with all-gather"),
    )
    use_multi_rank_bucket_allreduce: StrictBool = Field(
        True, description="DeepSpeed's bucketed all-reduce across ranks.",
        json_schema_extra=meta(no_effect=_BUCKETING),
    )
    load_from_fp32_weights: StrictBool = Field(
        True, description="Initialize the fp32 masters from the checkpoint's fp32 copies.",
        json_schema_extra=meta(no_effect="zerograph checkpoints always hold the fp32 master shards"),
    )
    elastic_checkpoint: StrictBool = Field(
        False, description="DeepSpeed's (deprecated) elastic ZeRO checkpoints.",
        json_schema_extra=meta(no_effect="zerograph.load_checkpoint reshards to any world size"),
    )
    grad_hooks: StrictBool = Field(
        True, description="Stage 1: reduce gradients from backward hooks.",
        json_schema_extra=meta(no_effect="gradient reductions are nodes of the compiled backward"),
    )
    legacy_stage1: StrictBool = Field(
        False, description="DeepSpeed's old stage-1 implementation.",
        json_schema_extra=meta(no_effect="there is one stage-1 implementation"),
    )
    stage3_model_persistence_threshold: _Size = Field(
        sys.maxsize, description="Stage 3: most elements of unsharded (persistent) parameters in the model.",
        json_schema_extra=meta(no_effect="stage3_param_persistence_threshold alone decides which parameters stay "
                               "unsharded", aliases=["model_persistence_threshold"]),
    )
    stage3_module_granularity_threshold: _Size = Field(
        0, description="Stage 3: fetch fine-grained modules as a unit.",
        json_schema_extra=meta(no_effect=_NO_HOOKS, aliases=["module_granularity_threshold"]),
    )
    stage3_use_all_reduce_for_fetch_params: StrictBool = Field(
        False, description="Stage 3: fetch parameters with all-reduce instead of all-gather.",
        json_schema_extra=meta(no_effect="parameters are always gathered with all-gather",
                               aliases=["use_all_reduce_for_fetch_params"]),
    )
    stage3_allgather_sequential: StrictBool = Field(
        False, description="Stage 3: issue parameter all-gathers one at a time.",
        json_schema_extra=meta(no_effect="the schedule_collectives pass orders the gathers",
                               aliases=["allgather_sequential"]),
    )
    memory_efficient_linear: StrictBool = Field(
        True, description="Stage 3: DeepSpeed's memory-efficient linear autograd function.",
        json_schema_extra=meta(no_effect="linear layers are traced; the partitioner decides what they save"),
    )
    pipeline_loading_checkpoint: StrictBool = Field(
        False, description="Load a checkpoint into a pipeline-parallel ZeRO-3 model.",
        json_schema_extra=meta(no_effect="zerograph.load_checkpoint loads pipelines and ZeRO-3 alike"),
    )
    override_module_apply: StrictBool = Field(
        True, description="Stage 3: gather parameters inside nn.Module.apply.",
        json_schema_extra=meta(no_effect=_NO_HOOKS),
    )
    log_trace_cache_warnings: StrictBool = Field(
        False, description="Stage 3: log DeepSpeed's trace-cache invalidations.",
        json_schema_extra=meta(no_effect="zerograph has no trace cache; Dynamo logs its recompiles"),
    )
    enable_sanity_checks: StrictBool = Field(
        False, description="Stage 3: DeepSpeed's internal sanity checks.",
        json_schema_extra=meta(no_effect="use zerograph.verify_graphs"),
    )
    save_muon_momentum_buffer_in_memory: StrictBool = Field(
        False, description="Keep Muon's momentum in memory with NVMe offload.",
        json_schema_extra=meta(no_effect="Muon reads whole parameters, so it is never offloaded "
                               "(zerograph.make_optimizer steps it over the DTensors)"),
    )
    leaf_module: LeafModuleConfig = Field(
        default_factory=LeafModuleConfig, description="Modules ZeRO-3 fetches as a whole."
    )
    zero_hpz_partition_size: _Size = Field(
        1, description="ZeRO++ hpZ (stage 3): ranks per node, consecutive data-parallel ranks (on one machine, "
        "simulated nodes). After the forward all-gather each rank keeps a secondary shard of every re-gathered "
        "parameter, partitioned over its node, and the backward all-gather reads it inside the node (exact; "
        "costs the secondary shards' memory, docs/zeropp.md). Must divide the data-parallel world size; 0 or "
        "1: off. DeepSpeed: same key.",
    )
    zero_quantized_weights: StrictBool = Field(
        False, description="ZeRO++ qwZ (stage 3): the forward's parameter all-gather sends blockwise-symmetric "
        "int8 (or int4: zerograph.zeropp_weight_bits) values and one fp32 scale per block "
        "(zerograph.zeropp_block_size elements), dequantized after the "
        "wait; the backward's re-gather stays full precision (or is served by hpZ). Master shards and "
        "checkpoints stay full precision (docs/zeropp.md). DeepSpeed: same key.",
    )
    zero_quantized_nontrainable_weights: StrictBool = Field(
        False, description="ZeRO++: keep frozen weights quantized.",
        json_schema_extra=meta(unsupported="ZeRO++ quantized frozen weights are" + _ZEROPP + "false", allowed=[False]),
    )
    zero_quantized_gradients: StrictBool = Field(
        False, description="ZeRO++ qgZ (stages 2-3): gradients are reduce-scattered by int8 (or int4: "
        "zerograph.zeropp_gradient_bits) all-to-alls in two "
        "hops, inside the node and then across nodes (one hop without nodes), dequantized and summed in fp32; "
        "error feedback by zerograph.zeropp_error_feedback (docs/zeropp.md). DeepSpeed: same key (DeepSpeed sends int4: "
        "zeropp_gradient_bits 4).",
    )
    zeropp_loco_param: ForeignSection = Field(
        None, description="ZeRO++ LoCo error feedback for quantized gradients.",
        json_schema_extra=meta(unsupported="ZeRO++ LoCo error feedback is" + _ZEROPP.replace(
            ";", " (zerograph.zeropp_error_feedback: true gives qgZ plain error feedback);") + "null",
            allowed=[None]),
    )
    mics_shard_size: _Int = Field(
        -1, description="MiCS: shard over groups of this many ranks; -1: off.",
        json_schema_extra=meta(
            unsupported="MiCS is a DeepSpeed feature zerograph does not have: ZeRO shards over every data-parallel "
            "rank; remove the key or set it to -1", allowed=[-1]),
    )
    mics_hierarchical_params_gather: StrictBool = Field(
        False, description="MiCS: hierarchical parameter gathers.",
        json_schema_extra=meta(unsupported="MiCS is a DeepSpeed feature zerograph does not have; remove the key or "
                               "set it to false", allowed=[False]),
    )
    zenflow: ForeignSection = Field(
        None, description="DeepSpeed's ZenFlow (stall-free offloading).",
        json_schema_extra=foreign("ZenFlow, stall-free optimizer offload",
                                  instead='use offload_optimizer.device "cpu", and remove the zenflow section',
                                  keys=["topk_ratio", "select_strategy", "select_interval", "update_interval",
                                        "overlap_step", "offload", "auto_ratio", "full_warm_up_rounds",
                                        "pt_reserved_cores_perc", "steps_per_epoch"]),
    )

    @model_validator(mode="before")
    @classmethod
    def _deprecated_offload_keys(cls, data: Any) -> Any:
        """DeepSpeed's ``cpu_offload``, ``cpu_offload_param``, ``cpu_offload_use_pin_memory``."""
        if not isinstance(data, dict) or not any(key in data for key in DEPRECATED_OFFLOAD_KEYS):
            return data
        data = dict(data)
        for key, (sections, setting) in DEPRECATED_OFFLOAD_KEYS.items():
            if key not in data:
                continue
            value = data.pop(key)
            log.info("zerograph config: zero_optimization.%s is DeepSpeed's deprecated form of %s", key,
                     " and ".join(f"{s}.{k}={str(v).lower()}" for s in ((sections,) if isinstance(sections, str)
                                                                       else sections) for k, v in setting.items()))
            if value is False or value == "auto":
                continue  # no offload, as DeepSpeed reads it
            if value is not True:
                raise _problem(f"zero_optimization.{key}: got {value!r}; expected a boolean (true or false)")
            for section in (sections,) if isinstance(sections, str) else sections:
                current = data.get(section) or {}
                if isinstance(current, dict):
                    data[section] = {**setting, **current}
        return data

    @field_validator("offload_optimizer", "offload_param", mode="before")
    @classmethod
    def _null_is_no_offload(cls, value: Any) -> Any:
        return {} if value is None else value

    @model_validator(mode="after")
    def _zeropp_needs_stage3(self) -> "ZeroConfig":
        if self.zero_hpz_partition_size > 1 and self.stage != 3:
            raise _problem(
                f"zero_optimization.zero_hpz_partition_size={self.zero_hpz_partition_size} needs "
                f"zero_optimization.stage 3 (now {self.stage}): hpZ serves the backward's re-gather of parameters, "
                "which only stage 3 does; set stage to 3, or zero_hpz_partition_size to 1")
        if self.zero_quantized_weights and self.stage != 3:
            raise _problem(
                f"zero_optimization.zero_quantized_weights=true needs zero_optimization.stage 3 (now {self.stage}): "
                "at stages 1-2 the forward's gathered weights are also the backward's, so quantizing them would "
                "quantize the weights the gradients are taken at; set stage to 3, or zero_quantized_weights to false")
        if self.zero_quantized_gradients and self.stage not in (2, 3):
            raise _problem(
                f"zero_optimization.zero_quantized_gradients=true needs zero_optimization.stage 2 or 3 (now "
                f"{self.stage}): qgZ replaces the gradients' reduce-scatter, which stages 0-1 do not do (they "
                "all-reduce); set stage to 2 or 3, or zero_quantized_gradients to false")
        return self

    @model_validator(mode="after")
    def _param_offload_needs_stage3(self) -> "ZeroConfig":
        if self.offload_param.device != "none" and self.stage != 3:
            device = self.offload_param.device
            where = "on the host" if device == "cpu" else "in files"
            raise _problem(
                f'zero_optimization.offload_param.device="{device}" needs zero_optimization.stage 3 (now {self.stage}): '
                f"only stage 3 gathers parameters from shards, so only there can they live {where}; "
                f'set stage to 3, or use offload_optimizer.device "{device}" (optimizer states {where}) instead'
            )
        return self
