"""zerograph's own options (``zerograph``), activation checkpointing and
pipeline parallelism."""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

import annotated_types
import torch
from pydantic import BeforeValidator, Field, StrictBool, StrictStr, field_validator, model_validator

from zerograph.config.values import (
    Section,
    _between,
    _expected,
    _Float,
    _Int,
    _PositiveInt,
    _problem,
    _Size,
    meta,
)

_OWN = meta(zerograph_only=True)


def _tile_setting(value):
    if value is None or value == "width":
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _expected('"width", a whole number of positions >= 1, or null (off)')
    return value


class ZerographOptions(Section):
    """The ``zerograph`` section: options of zerograph itself (not in DeepSpeed)."""

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
    debug: StrictBool = Field(False, description="Log per-pass timing and node diffs, and keep each region's joint "
                                "forward+backward graph for zerograph.inspect (regions[i][\"graphs\"][\"joint\"]).")
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
    ranks_per_node: _PositiveInt = Field(
        1, description="ZeRO++: data-parallel ranks per node (consecutive ranks; on one machine, simulated "
        "nodes) when zero_optimization.zero_hpz_partition_size does not set it: traffic inside a node is "
        "reported as intra-group, and qgZ reduces in two hops (inside the node, then across). Must divide the "
        "data-parallel world size.",
    )
    zeropp_block_size: Annotated[_Int, _between(1, 2**20, " elements")] = Field(
        256, description="ZeRO++ qwZ/qgZ: elements per quantization block (one fp32 scale each, so the "
        "scales add 4/block bytes per element); smaller blocks bound the error tighter (docs/zeropp.md).",
    )
    zeropp_weight_bits: Literal[8, 4] = Field(
        8, description="ZeRO++ qwZ: bits per quantized weight value in the forward's all-gathers: 8 (int8) or 4 "
        "(int4, two values per byte: half the bytes, an error bound 127/7 times int8's; docs/zeropp.md says where "
        "it holds up).",
    )
    zeropp_gradient_bits: Literal[8, 4] = Field(
        8, description="ZeRO++ qgZ: bits per quantized gradient value in the reduction's all-to-alls: 8 (int8) or "
        "4 (int4, two values per byte, as DeepSpeed sends; docs/zeropp.md).",
    )
    zeropp_error_feedback: StrictBool = Field(
        False, description="ZeRO++ qgZ: error feedback. Each rank keeps, per gradient reduction and hop, what "
        "quantizing its message left out (fp32) and adds it to the next message, so quantization errors do not "
        "accumulate over steps. Costs one fp32 residual per hop input between steps (the padded gradient, W times "
        "the gradient shard, for hop 1; zerograph.explain prints it; docs/zeropp.md).",
    )
    tp_vocab_parallel: StrictBool = Field(
        False, description="With tensor_parallel.autotp_size > 1: split the input embedding and the LM head over the "
        "vocabulary, with a vocab-parallel cross-entropy: where the loss is computed in the graph of the logits, no "
        "rank holds full-vocabulary logits and the model returns this rank's vocabulary slice "
        "(docs/tensor_parallel.md).")
    tp_sequence_parallel: StrictBool = Field(
        False, description="With tensor_parallel.autotp_size > 1: Megatron sequence parallelism. Activations between "
        "tensor-parallel layers (residual stream, norms, dropout) are cut along the sequence over the tp ranks; the "
        "all-reduce after a row-split linear becomes a reduce-scatter and the input of a column-split group an "
        "all-gather (same bytes on the wire), and norm weights' and row biases' gradients are summed over tp. The "
        "sequence length must be a multiple of autotp_size (docs/tensor_parallel.md#megatron-sequence-parallelism).")
    tp_sequence_parallel_regather: StrictBool = Field(
        True, description="With tp_sequence_parallel: the backward all-gathers each column-split group's input "
        "again from this rank's sequence shard (as Megatron-LM does), so the forward saves the shard (b*s*h/tp) "
        "instead of the gathered input (b*s*h) for the weight gradient; costs one more all-gather of b*s*h per "
        "column group in the backward. false: save the gathered input (docs/tensor_parallel.md#what-is-saved).")
    sequence_tiling: Annotated[Optional[Union[Literal["width"], _PositiveInt]], BeforeValidator(_tile_setting)] = Field(
        None, description="Tiled compute along the sequence (ALST): every per-token MLP and the LM head with its "
        "cross-entropy run in tiles of this many positions of each rank's sequence (\"width\": as many positions as the model is wide, ALST's rule), each "
        "tile's intermediates recomputed in the backward, so the largest intermediate is one tile's (a tile's MLP "
        "hidden, a tile's logits). A model that returns its logits next to the loss returns empty logits. null: off "
        "(docs/long_sequences.md#tiled-compute-alst).")
    verify_graphs: StrictBool = Field(
        False, description="Run graph verification after every pass (slow; for debugging)."
    )
    collective_timeout_s: Annotated[_Float, _between(1, 604800, " seconds (1 s to 7 days)")] = Field(
        300.0, description="Timeout in seconds for collective operations, from 1 to 604800 (7 days). Set on the "
        "data-parallel process group (also one you initialized); a collective waiting longer, e.g. on a dead "
        "or frozen rank, fails with a RankFailureError naming that rank, at most a few seconds later "
        "(docs/troubleshooting.md#a-rank-died)."
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


class ActivationCheckpointingConfig(Section):
    """The ``activation_checkpointing`` section: what the forward saves for the backward
    (see docs/activations.md). DeepSpeed's keys of this section are accepted where they
    map onto a policy and rejected otherwise, with the zerograph equivalent named."""

    policy: Literal["none", "per_layer", "selective", "memory_budget"] = Field(
        "none",
        description="\"none\": save what eager autograd saves; \"per_layer\": recompute everything "
        "inside each block, saving only block outputs; \"selective\": save matmul/attention outputs, "
        "recompute pointwise ops; \"memory_budget\": save the fewest activation bytes a minimum cut "
        "allows within memory_budget, recomputing as few matmuls as it can. Random ops (dropout) are "
        "always saved, never recomputed.",
        json_schema_extra=_OWN,
    )
    memory_budget: Optional[Union[float, int]] = Field(
        None,
        description="For policy \"memory_budget\": a float in [0, 1] (fraction of the activation "
        "bytes policy \"none\" saves; parameters and inputs, held anyway, do not count) or an int >= 2 "
        "(activation bytes). Required by that policy, rejected by the others.",
        json_schema_extra=_OWN,
    )
    offload_activations: StrictBool = Field(
        False,
        description="Copy the tensors the forward saves for the backward to host memory after the "
        "forward and back to the device at the start of the backward (pinned, non-blocking on CUDA; "
        "plain copies on CPU). DeepSpeed: cpu_checkpointing.",
        json_schema_extra=_OWN,
    )
    block_pattern: Optional[StrictStr] = Field(
        None,
        description="Regex matched (re.search) against a node's module path; the matched text names "
        "its block for \"per_layer\". Default: the path up to its first integer (\"transformer.h.3\").",
        json_schema_extra=_OWN,
    )
    partition_activations: StrictBool = Field(
        False, description="DeepSpeed key; true is rejected: activations are per-rank already (data parallel).",
        json_schema_extra=meta(unsupported="partitioned activations are not supported; remove it: with data "
                               "parallelism each rank saves only its own batch", allowed=[False]),
    )
    cpu_checkpointing: StrictBool = Field(
        False, description="DeepSpeed key; true means offload_activations: true."
    )
    number_checkpoints: Optional[_PositiveInt] = Field(
        None, description="DeepSpeed key; rejected: use block_pattern to choose the blocks.",
        json_schema_extra=meta(unsupported="not supported; set block_pattern to a regex naming the blocks to "
                               "checkpoint", allowed=[None]),
    )
    contiguous_memory_optimization: StrictBool = Field(
        False, description="DeepSpeed key; true is rejected: the partitioner lays out saved tensors.",
        json_schema_extra=meta(unsupported="not supported; remove it: saved tensors are laid out by the partitioner",
                               allowed=[False]),
    )
    synchronize_checkpoint_boundary: StrictBool = Field(
        False, description="DeepSpeed key; accepted, no effect (graphs need no synchronization).",
        json_schema_extra=meta(no_effect="compiled graphs need no synchronization at checkpoint boundaries"),
    )
    profile: StrictBool = Field(
        False, description="DeepSpeed key; accepted, no effect (use zerograph.inspect).",
        json_schema_extra=meta(no_effect="use zerograph.inspect to see what is saved and recomputed"),
    )

    @model_validator(mode="after")
    def _deepspeed_keys(self) -> "ActivationCheckpointingConfig":
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


class PipelineConfig(Section):
    """The ``pipeline`` section: pipeline parallelism (zerograph's own; see docs/pipeline.md)."""

    stages: _PositiveInt = Field(
        1,
        description="Pipeline stages p; 1 turns pipelining off (DeepSpeed: the PipelineModule's num_stages). "
        "The world size must be p x the "
        "data-parallel size; each stage is ZeRO-sharded over its own data-parallel group.",
    )
    micro_batches: Optional[_PositiveInt] = Field(
        None,
        description="Micro-batches per train_step; null uses gradient_accumulation_steps. The batch "
        "given to train_step must split evenly into them.",
        json_schema_extra=_OWN,
    )
    schedule: Literal["1f1b", "gpipe", "interleaved_1f1b"] = Field(
        "1f1b",
        description="\"1f1b\": at most p micro-batches in flight per stage; \"gpipe\": all forwards, "
        "then all backwards; \"interleaved_1f1b\": the model is cut into stages x virtual_stages "
        "stages, rank r holds stages r, r+p, ... (Megatron-LM's virtual pipeline stages); "
        "micro-batches must be a multiple of stages.",
        json_schema_extra=_OWN,
    )
    virtual_stages: Optional[_PositiveInt] = Field(
        None,
        description="Model stages per rank for \"interleaved_1f1b\" (>= 2; null: 2). Must be 1 (or null) "
        "for the other schedules. The bubble is (p-1)/(v*m+p-1) of a step instead of (p-1)/(m+p-1).",
        json_schema_extra=_OWN,
    )
    split_points: tuple[StrictStr, ...] = Field(
        (),
        description="Module names that start stages 1..p-1 (1..p*v-1 with virtual stages; e.g. "
        "[\"transformer.h.2\"]); empty: "
        "balance the stages by a cost model (FLOPs + parameter bytes). The loss is always computed "
        "on the last stage.",
        json_schema_extra=_OWN,
    )

    partition: StrictStr = Field(
        "best",
        description="DeepSpeed's PipelineModule partition method (\"parameters\", \"uniform\", \"type:...\").",
        json_schema_extra=meta(no_effect="split_points, or else a cost model (FLOPs + parameter bytes), "
                               "places the stage boundaries"),
    )
    seed_layers: StrictBool = Field(
        False, description="Seed each layer's initialization by its index.",
        json_schema_extra=meta(no_effect="the model is built by you before zerograph splits it"),
    )
    activation_checkpoint_interval: _Size = Field(
        0, description="Checkpoint every this many pipeline layers; 0: off.",
        json_schema_extra=meta(unsupported='not supported; use activation_checkpointing.policy "per_layer" '
                               "(or another policy), and remove the key", allowed=[0]),
    )
    pipe_partitioned: StrictBool = Field(
        True, description="Partition activations sent between stages over the tensor-parallel group.",
        json_schema_extra=meta(no_effect="there is no tensor parallelism; stages send whole activations"),
    )
    grad_partitioned: StrictBool = Field(
        True, description="Partition gradients sent between stages over the tensor-parallel group.",
        json_schema_extra=meta(no_effect="there is no tensor parallelism; stages send whole gradients"),
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
