"""DeepSpeed sections zerograph reads but does not act on yet (monitoring and
profiling, checkpoint and compile options), the ``tensor_parallel`` section
(AutoTP training: ``autotp_size`` and ``partition_config`` work, see
docs/tensor_parallel.md), and the catalog of DeepSpeed features zerograph does
not have (:data:`FOREIGN_SECTIONS`)."""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field, StrictBool, StrictStr

from zerograph.config.values import ForeignSection, Section, _Float, _Int, _PositiveInt, _Size, foreign, meta

_LOG_YOURSELF = "log from your training loop"
_COUNTED = "the profiler counts the FLOPs torch runs, recomputation included"
_WHOLE_MODEL = "the report covers the whole model; there is no per-module breakdown yet"


def _monitor(what: str, instead: str) -> dict[str, Any]:
    return meta(no_effect=f"zerograph writes no {what}; {instead}")


class TensorBoardConfig(Section):
    """The ``tensorboard`` section: DeepSpeed's TensorBoard monitor."""

    enabled: StrictBool = Field(
        False, description="Write each optimizer step's loss, learning rate (and fp16 loss scale, step timers) as "
        "TensorBoard scalars into output_path/job_name, from rank 0 of the engine of zerograph.initialize; needs the "
        "tensorboard package (pip install tensorboard).")
    output_path: StrictStr = Field("", description="Directory of the logs.")
    job_name: StrictStr = Field("DeepSpeedJobName", description="Sub-directory of this job.")


class WandbConfig(Section):
    """The ``wandb`` section: DeepSpeed's Weights & Biases monitor."""

    enabled: StrictBool = Field(False, description="Log training metrics to Weights & Biases.",
                                json_schema_extra=_monitor("Weights & Biases logs", "call wandb.log in your loop"))
    group: Optional[StrictStr] = Field(None, description="W&B group.")
    team: Optional[StrictStr] = Field(None, description="W&B team.")
    project: StrictStr = Field("deepspeed", description="W&B project.")


class CometConfig(Section):
    """The ``comet`` section: DeepSpeed's Comet monitor."""

    enabled: StrictBool = Field(False, description="Log training metrics to Comet.",
                                json_schema_extra=_monitor("Comet logs", _LOG_YOURSELF))
    samples_log_interval: _PositiveInt = Field(100, description="Samples between submissions.")
    project: Optional[StrictStr] = Field(None, description="Comet project.")
    workspace: Optional[StrictStr] = Field(None, description="Comet workspace.")
    api_key: Optional[StrictStr] = Field(None, description="Comet API key.")
    experiment_name: Optional[StrictStr] = Field(None, description="Comet experiment name.")
    experiment_key: Optional[StrictStr] = Field(None, description="Comet experiment key.")
    online: Optional[StrictBool] = Field(None, description="Log to the server (else offline).")
    mode: Optional[StrictStr] = Field(None, description="\"get\", \"create\" or \"get_or_create\".")


class CSVMonitorConfig(Section):
    """The ``csv_monitor`` section: DeepSpeed's CSV monitor."""

    enabled: StrictBool = Field(False, description="Write each optimizer step's loss, learning rate (and fp16 loss "
                                "scale, step timers) to one CSV file per metric in output_path/job_name, from rank 0 "
                                "of the engine of zerograph.initialize.")
    output_path: StrictStr = Field("", description="Directory of the files.")
    job_name: StrictStr = Field("DeepSpeedJobName", description="Sub-directory of this job.")


class FlopsProfilerConfig(Section):
    """The ``flops_profiler`` section: DeepSpeed's FLOPs profiler."""

    enabled: StrictBool = Field(False, description="Count the FLOPs (forward and backward, every micro-batch) and "
                                "time of one optimizer step with torch.utils.flop_counter, on rank 0 of the engine of "
                                "zerograph.initialize, and log the report.")
    recompute_fwd_factor: _Float = Field(0.0, description="Share of the forward recomputed in the backward.",
                                         json_schema_extra=meta(no_effect=_COUNTED))
    profile_step: _PositiveInt = Field(1, description="Profile the optimizer step after this many completed ones.")
    module_depth: _Int = Field(-1, description="Module depth of the report; -1: all.",
                               json_schema_extra=meta(no_effect=_WHOLE_MODEL))
    top_modules: _PositiveInt = Field(1, description="Modules listed in the report.",
                                      json_schema_extra=meta(no_effect=_WHOLE_MODEL))
    detailed: StrictBool = Field(True, description="Print the detailed profile.",
                                 json_schema_extra=meta(no_effect=_WHOLE_MODEL))
    output_file: Optional[StrictStr] = Field(None, description="File the report is written to as well; null: "
                                             "only the log.")


class CommsLoggerConfig(Section):
    """The ``comms_logger`` section: DeepSpeed's communication logger."""

    enabled: StrictBool = Field(False, description="Record the bytes of each collective kind per optimizer step "
                                "(zerograph.inspect(model).comm_bytes_last_step) in the engine of zerograph.initialize; "
                                "the totals are logged every steps_per_print steps (10 when unset).")
    verbose: StrictBool = Field(False, description="Log every optimizer step's bytes per collective.")
    prof_all: StrictBool = Field(True, description="Record all collectives (else those in prof_ops).")
    debug: StrictBool = Field(False, description="Name the caller of each collective.",
                              json_schema_extra=meta(no_effect="collectives are nodes of the compiled graphs; "
                                                     "zerograph.explain shows where each one is"))
    prof_ops: tuple[StrictStr, ...] = Field((), description="Collectives to record when prof_all is false "
                                            "(all_gather_into_tensor, reduce_scatter_tensor, all_reduce).")


class ParallelWriteConfig(Section):
    """``checkpoint.parallel_write``: parallel checkpoint writing."""

    pipeline_stage: StrictBool = Field(
        False, description="Write a pipeline's checkpoint by stage.",
        json_schema_extra=meta(no_effect="every rank writes its own shard file"),
    )


class CheckpointConfig(Section):
    """The ``checkpoint`` section: DeepSpeed's checkpoint options."""

    tag_validation: Literal["Ignore", "Warn", "Fail", "ignore", "warn", "fail", "IGNORE", "WARN", "FAIL"] = Field(
        "Warn", description="engine.save_checkpoint of zerograph.initialize checks that every rank saves under the "
        "same tag: a differing tag is logged (Warn), an error (Fail), or not checked (Ignore). DeepSpeed: same key.",
    )
    load_universal: StrictBool = Field(
        False, description="Load a universal checkpoint (any parallel layout).",
        json_schema_extra=meta(no_effect="zerograph.load_checkpoint always reshards to the current world size"),
    )
    use_node_local_storage: StrictBool = Field(
        False, description="Store each node's part of the checkpoint on node-local storage.",
        json_schema_extra=meta(unsupported="not supported yet: zerograph.save_checkpoint writes every rank's shard "
                               "to one directory all ranks can read; remove the key or set it to false",
                               allowed=[False]),
    )
    parallel_write: ParallelWriteConfig = Field(default_factory=ParallelWriteConfig,
                                                description="Parallel checkpoint writing.")
    writer: ForeignSection = Field(
        None, description="DeepSpeed's fast checkpoint writer.",
        json_schema_extra=foreign("the fast checkpoint writer", no_effect="zerograph writes with torch.save"),
    )
    serialization: Optional[StrictBool] = Field(
        None, description="DeepSpeed's checkpoint serialization switch.",
        json_schema_extra=meta(no_effect="zerograph writes with torch.save"),
    )


_COMPILER = "zerograph is itself a compiler: it always compiles the model"


class CompileConfig(Section):
    """The ``compile`` section: DeepSpeed's DeepCompile (compiler-based ZeRO)."""

    deepcompile: StrictBool = Field(False, description="Compile ZeRO into the graph with DeepCompile.",
                                    json_schema_extra=meta(no_effect=_COMPILER))
    free_activation: StrictBool = Field(False, description="Free activations early.",
                                        json_schema_extra=meta(no_effect="liveness decides when tensors die"))
    free_activation_threshold: _Size = Field(10 * 1024 * 1024, description="Smallest activation freed early.",
                                             json_schema_extra=meta(no_effect="liveness decides when tensors die"))
    offload_activation: StrictBool = Field(
        False, description="DeepCompile's activation offload.",
        json_schema_extra=meta(no_effect="use activation_checkpointing.offload_activations"),
    )
    offload_activation_pin_memory: StrictBool = Field(True, description="Pin host buffers of activation offload.")
    offload_opt_states: StrictBool = Field(
        False, description="DeepCompile's optimizer-state offload.",
        json_schema_extra=meta(no_effect='use zero_optimization.offload_optimizer.device "cpu"'),
    )
    offload_parameters: StrictBool = Field(
        False, description="DeepCompile's parameter offload.",
        json_schema_extra=meta(no_effect='use zero_optimization.offload_param.device "cpu"'),
    )
    double_buffer: StrictBool = Field(True, description="Double-buffer parameter gathers.",
                                      json_schema_extra=meta(no_effect="the bucketing pass lays out gather buffers"))
    symmetric_memory: StrictBool = Field(False, description="Use symmetric memory for collectives.",
                                         json_schema_extra=meta(no_effect="collectives use torch.distributed"))
    debug_log: StrictBool = Field(False, description="DeepCompile's debug log.",
                                  json_schema_extra=meta(no_effect="use zerograph.debug"))
    sync_before_reduce: StrictBool = Field(False, description="Synchronize before each reduction.",
                                           json_schema_extra=meta(no_effect=_COMPILER))
    sync_after_reduce: StrictBool = Field(False, description="Synchronize after each reduction.",
                                          json_schema_extra=meta(no_effect=_COMPILER))
    sync_before_allgather: StrictBool = Field(False, description="Synchronize before each all-gather.",
                                              json_schema_extra=meta(no_effect=_COMPILER))
    sync_after_allgather: StrictBool = Field(False, description="Synchronize after each all-gather.",
                                             json_schema_extra=meta(no_effect=_COMPILER))
    keep_int_input_tensors: StrictBool = Field(True, description="Keep integer graph inputs alive.")
    keep_all_input_tensors: StrictBool = Field(False, description="Keep all graph inputs alive.")
    passes: Optional[tuple[StrictStr, ...]] = Field(
        None, description="DeepCompile passes (\"autosp\", \"autotp\").",
        json_schema_extra=meta(unsupported="sequence and tensor parallelism (autosp, autotp) are not supported yet; "
                               "remove the key", allowed=[None, ()]),
    )


class TPSizeConfig(Section):
    """``tensor_parallel.tp``: the tensor-parallel group."""

    tp_size: _Size = Field(1, description="Tensor-parallel degree of DeepSpeed's inference engine.",
                           json_schema_extra=meta(unsupported="tensor_parallel.tp.tp_size is DeepSpeed's inference "
                                                  "setting; for training set tensor_parallel.autotp_size instead",
                                                  allowed=[0, 1]))
    tp_grain_size: _PositiveInt = Field(1, description="Granularity of the tensor-parallel split.")


class TensorParallelConfig(Section):
    """The ``tensor_parallel`` section: DeepSpeed's AutoTP training keys (docs/tensor_parallel.md)."""

    autotp_size: _Size = Field(
        0, description="Tensor-parallel degree tp; 0 or 1: off. The world size must be a multiple of it "
        "(world = data-parallel ranks x tp; tp innermost); ZeRO shards over the data-parallel ranks.",
    )
    preset_model: Optional[StrictStr] = Field(
        None, description="AutoTP's built-in partitioning preset.",
        json_schema_extra=meta(no_effect="zerograph reads the model's Hugging Face tp plan or its traced graph"))
    tp_overlap_comm: StrictBool = Field(
        False, description="Overlap tensor-parallel all-reduces with compute.",
        json_schema_extra=meta(no_effect="each tensor-parallel all-reduce is waited on where its result is needed"))
    partition_config: Optional[dict[str, Any]] = Field(
        None, description="Which layers split how: {\"layer_specs\": [{\"patterns\": [regex, ...], "
        "\"partition_type\": \"column\" | \"row\" | \"skip\", \"shape\": [parts, -1]}], "
        "\"use_default_specs\": true}.")
    keep_module_on_host: StrictBool = Field(
        False, description="Keep modules on the host while partitioning.",
        json_schema_extra=meta(no_effect="zerograph partitions on the parameters' device"))
    replace_with_kernel_inject: StrictBool = Field(
        False, description="Inject DeepSpeed's inference kernels.",
        json_schema_extra=meta(aliases=["kernel_inject"],
                               unsupported="DeepSpeed's kernel injection is an inference feature zerograph does not "
                               "have; remove the key", allowed=[False]),
    )
    tp: TPSizeConfig = Field(default_factory=TPSizeConfig, description="The tensor-parallel group.",
                             json_schema_extra=meta(aliases=["tensor_parallel"]))


class HybridEngineConfig(Section):
    """The ``hybrid_engine`` section: DeepSpeed's training/inference engine for RLHF."""

    enabled: StrictBool = Field(
        False, description="Switch the model between training and DeepSpeed's inference kernels.",
        json_schema_extra=meta(unsupported="the Hybrid Engine (RLHF generation with inference kernels) is a DeepSpeed "
                               "feature zerograph does not have; generate with the model itself, and remove the "
                               "section or set enabled to false", allowed=[False]),
    )
    max_out_tokens: _PositiveInt = Field(512, description="Longest generation.")
    inference_tp_size: _PositiveInt = Field(1, description="Tensor-parallel degree of generation.")
    release_inference_cache: StrictBool = Field(False, description="Free the KV cache after generation.")
    pin_parameters: StrictBool = Field(True, description="Pin gathered parameters during generation.")
    tp_gather_partition_size: _PositiveInt = Field(8, description="Ranks per tensor-parallel gather.")
    enable_cuda_graph: StrictBool = Field(False, description="Capture generation in CUDA graphs.")


#: DeepSpeed sections zerograph has no counterpart for: name -> foreign() metadata
FOREIGN_SECTIONS: dict[str, dict[str, Any]] = {
    "amp": foreign("NVIDIA Apex AMP", instead="use the 'bf16' or 'fp16' section, and delete the 'amp' section",
                   keys=["enabled", "opt_level"]),
    "torch_autocast": foreign(
        "torch.autocast mixed precision", keys=["enabled", "dtype", "lower_precision_safe_modules"],
        instead="use the 'bf16' or 'fp16' section (fp32 master shards, compute and gathers in 16 bits), and delete "
        "the 'torch_autocast' section"),
    "sparse_attention": foreign(
        "block-sparse attention kernels", keys=[
            "mode", "block", "different_layout_per_head", "num_local_blocks", "num_global_blocks", "attention",
            "horizontal_global_attention", "num_different_global_patterns", "num_random_blocks",
            "local_window_blocks", "global_block_indices", "global_block_end_indices", "num_sliding_window_blocks"],
        instead="use dense attention (zerograph.fusion fuses it) or a sparse-attention module in your model, and "
        "delete the 'sparse_attention' section"),
    "elasticity": foreign(
        "elastic training", keys=["enabled", "max_train_batch_size", "micro_batch_sizes", "min_gpus", "max_gpus",
                                  "min_time", "prefer_large_batch", "version", "ignore_non_elastic_batch_info",
                                  "num_gpus_per_node", "model_parallel_size"],
        instead="launch with a fixed world size and resume from a checkpoint at another world size "
        "(zerograph.load_checkpoint reshards), and delete the 'elasticity' section"),
    "autotuning": foreign(
        "the autotuner", keys=["enabled", "results_dir", "exps_dir", "overwrite", "metric", "start_profile_step",
                               "end_profile_step", "fast", "max_train_batch_size", "mp_size",
                               "num_tuning_micro_batch_sizes", "tuner_type", "tuner_early_stopping",
                               "tuner_num_trials", "arg_mappings"],
        instead="pick the stage and batch size with zerograph.explain's memory plan, and delete the 'autotuning' "
        "section"),
    "curriculum_learning": foreign(
        "curriculum learning", keys=["enabled", "curriculum_type", "min_difficulty", "max_difficulty",
                                     "schedule_type", "schedule_config"],
        instead="order or truncate the samples in your data loader, and delete the 'curriculum_learning' section"),
    "data_efficiency": foreign(
        "the data efficiency library (curriculum sampling, random-LTD)",
        keys=["enabled", "seed", "data_routing", "data_sampling"],
        instead="do the sampling in your data loader, and delete the 'data_efficiency' section"),
    "compression_training": foreign(
        "compression training (quantization, pruning, layer reduction)",
        keys=["layer_reduction", "weight_quantization", "activation_quantization", "sparse_pruning", "row_pruning",
              "head_pruning", "channel_pruning"],
        instead="compress the model with a separate tool (e.g. torchao), and delete the 'compression_training' "
        "section"),
    "quantize_training": foreign(
        "MoQ quantized training", keys=["enabled", "quantize_verbose", "quantizer_kernel", "quantize_type",
                                        "quantize_bits", "quantize_schedule", "quantize_groups", "fp16_mixed_quantize",
                                        "quantize_change_ratio", "quantize_algo", "eigenvalue"],
        instead="delete the 'quantize_training' section"),
    "weight_quantization": foreign(
        "post-training weight quantization", keys=["post_init_quant", "quantized_initialization"],
        instead="delete the 'weight_quantization' section"),
    "eigenvalue": foreign(
        "eigenvalue computation (for MoQ)", keys=["enabled", "verbose", "max_iter", "tol", "stability",
                                                  "gas_boundary_resolution", "layer_name", "layer_num"],
        instead="delete the 'eigenvalue' section"),
    "progressive_layer_drop": foreign(
        "progressive layer dropping", keys=["enabled", "theta", "gamma"],
        instead="drop layers in your model's forward, and delete the 'progressive_layer_drop' section"),
    "expert_parallel": foreign(
        "expert parallelism (AutoEP)", keys=["enabled", "autoep_size", "expert_tensor_parallel_size",
                                             "preset_model", "use_grouped_mm", "top_k"],
        instead="mixture-of-experts models train with their experts data-parallel; delete the 'expert_parallel' "
        "section"),
    "nebula": foreign(
        "Nebula checkpointing", keys=["enabled", "persistent_storage_path", "persistent_time_interval",
                                      "num_of_version_in_retention", "enable_nebula_load", "load_path"],
        instead="save with zerograph.save_checkpoint, and delete the 'nebula' section"),
    "datastates_ckpt": foreign(
        "DataStates asynchronous checkpointing", keys=["host_cache_size", "parser_threads"],
        instead="save with zerograph.save_checkpoint, and delete the 'datastates_ckpt' section"),
    "timers": foreign("DeepSpeed's step timers", keys=["throughput"],
                      no_effect="zerograph has no step timers; time your loop"),
}
