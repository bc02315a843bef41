"""The keys of a config: every top-level key and section (:class:`ConfigKeys`,
the fields of :class:`zerograph.config.Config`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional

import annotated_types
from pydantic import Field, StrictBool, StrictStr, model_validator

from zerograph.config.ds_sections import (
    FOREIGN_SECTIONS,
    CheckpointConfig,
    CometConfig,
    CommsLoggerConfig,
    CompileConfig,
    CSVMonitorConfig,
    FlopsProfilerConfig,
    HybridEngineConfig,
    TensorBoardConfig,
    TensorParallelConfig,
    WandbConfig,
)
from zerograph.config.optim import OptimizerConfig, SchedulerConfig
from zerograph.config.precision import BF16Config, DataTypesConfig, FP16Config
from zerograph.config.sections import ActivationCheckpointingConfig, PipelineConfig, ZerographOptions
from zerograph.config.values import ForeignSection, Section, _Float, _PositiveInt, _problem, _Size, meta
from zerograph.config.zero import AioConfig, ZeroConfig

_AVERAGED = ("gradients are reduced in fp32 and averaged once; scaling before or after the reduction gives the same "
             "result")


def _foreign(name: str) -> Any:
    info = FOREIGN_SECTIONS[name]["foreign"]
    return Field(None, description=f"DeepSpeed's {info['feature']}; zerograph does not have it.",
                 json_schema_extra=FOREIGN_SECTIONS[name])


def _section(model: type[Section], description: str, **extra: Any) -> Any:
    return Field(default_factory=model, description=description, json_schema_extra=meta(**extra) or None)


class ConfigKeys(Section):
    """Top level: the batch sizes, clipping and the other top-level keys, and every section."""

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
        None, description="Log a progress line (step, skipped steps, loss, learning rate) every this many optimizer "
        "steps, from the engine of zerograph.initialize (and ZeroGraphTrainer); null: none. DeepSpeed: same key "
        "(its default is 10).",
    )
    zero_allow_untested_optimizer: StrictBool = Field(
        False,
        description="Allow optimizers DeepSpeed has not tested with ZeRO. zerograph takes any torch "
        "optimizer (zerograph.make_optimizer). DeepSpeed: same key.",
        json_schema_extra=meta(no_effect="any torch optimizer works with zerograph"),
    )
    wall_clock_breakdown: StrictBool = Field(
        False, description="Time forward, backward and step in the engine of zerograph.initialize: logged every "
        "steps_per_print steps (10 when unset) and written by the csv_monitor/tensorboard monitors. DeepSpeed: "
        "same key.",
    )
    fp16: FP16Config = _section(FP16Config, "float16 mixed precision. DeepSpeed: same section.")
    bf16: BF16Config = _section(BF16Config, "bfloat16 mixed precision. DeepSpeed: same section.",
                                aliases=["bfloat16"])
    zero_optimization: ZeroConfig = _section(ZeroConfig, "ZeRO sharding. DeepSpeed: same section.")
    aio: AioConfig = _section(AioConfig, "How NVMe offload issues its file I/O (offload device \"nvme\"). "
                              "DeepSpeed: same section.")
    zerograph: ZerographOptions = _section(ZerographOptions, "zerograph's own options; not in DeepSpeed.",
                                           zerograph_only=True)
    activation_checkpointing: ActivationCheckpointingConfig = _section(
        ActivationCheckpointingConfig,
        "Activation checkpointing policy. DeepSpeed: same section; its keys map onto policies.")
    pipeline: PipelineConfig = _section(
        PipelineConfig, "Pipeline parallelism (DeepSpeed configures most of it in code: PipelineModule).")
    optimizer: Optional[OptimizerConfig] = Field(
        None, description="The optimizer zerograph.build_optimizer builds; null: you build it yourself "
        "(zerograph.make_optimizer)."
    )
    scheduler: Optional[SchedulerConfig] = Field(
        None, description="The LR schedule zerograph.build_scheduler builds; null: none, or yours."
    )
    data_types: DataTypesConfig = _section(DataTypesConfig, "Dtypes of gradient accumulation, parameters, buffers.")
    communication_data_type: Optional[Literal["fp32", "fp16", "bf16"]] = Field(
        None, description="Dtype of the gradient reduction; zerograph always reduces in fp32 (null: fp32).",
        json_schema_extra=meta(
            unsupported="zerograph reduces gradients in fp32 (the master dtype); reducing in 16 bits is not supported "
            'yet (remove the key or set it to "fp32")', allowed=[None, "fp32"]),
    )
    seq_parallel_communication_data_type: Literal["fp32", "fp16", "bf16"] = Field(
        "fp32", description="Dtype of sequence-parallel communication.",
        json_schema_extra=meta(no_effect="there is no sequence parallelism yet"),
    )
    gradient_allreduce_op: Literal["mean", "sum"] = Field(
        "mean", description="Average (\"mean\") or sum (\"sum\") gradients over the data-parallel ranks.",
        json_schema_extra=meta(unsupported='summed gradients are not supported yet: zerograph averages over the '
                               'data-parallel ranks (remove the key or set it to "mean")', allowed=["mean"]),
    )
    prescale_gradients: StrictBool = Field(
        False, description="Divide gradients by the world size before the reduction.",
        json_schema_extra=meta(no_effect=_AVERAGED),
    )
    gradient_predivide_factor: Annotated[_Float, annotated_types.Gt(0)] = Field(
        1.0, description="Divide gradients by this before the reduction and the rest after it.",
        json_schema_extra=meta(no_effect=_AVERAGED),
    )
    sparse_gradients: StrictBool = Field(
        False, description="Reduce nn.Embedding gradients as sparse tensors.",
        json_schema_extra=meta(no_effect="embedding gradients are reduced dense, like every gradient"),
    )
    managed_gradient_accumulation: StrictBool = Field(
        True, description="DeepSpeed counts micro-steps and steps at the accumulation boundary.",
        json_schema_extra=meta(unsupported="zerograph counts micro-batches itself (gradient_accumulation_steps); "
                               "remove the key or set it to true", allowed=[True]),
    )
    zero_force_ds_cpu_optimizer: StrictBool = Field(
        True, description="DeepSpeed: require its CPU Adam with optimizer offload.",
        json_schema_extra=meta(no_effect="any torch optimizer steps offloaded shards (zerograph.make_optimizer)"),
    )
    sequence_parallel_size: _PositiveInt = Field(
        1, description="Ranks of a sequence-parallel (Ulysses) group: each holds 1/sequence_parallel_size of every "
        "sequence and all-to-alls heads around attention; ZeRO shards over data-parallel x sequence-parallel "
        "ranks; 1: off (docs/long_sequences.md). DeepSpeed: same key.",
    )
    data_parallel_size: Optional[_PositiveInt] = Field(
        None, description="DeepSpeed: ranks of the data-parallel group.",
        json_schema_extra=meta(no_effect="the data-parallel size is the world size divided by pipeline.stages"),
    )
    disable_allgather: StrictBool = Field(
        False, description="DeepSpeed: broadcast instead of all-gather.",
        json_schema_extra=meta(no_effect="parameters are always gathered with all-gather"),
    )
    dump_state: StrictBool = Field(
        False, description="DeepSpeed: print the engine's state after initialization.",
        json_schema_extra=meta(no_effect="use zerograph.explain to print the plan"),
    )
    memory_breakdown: StrictBool = Field(
        False, description="DeepSpeed: log memory use at each step.",
        json_schema_extra=meta(no_effect="use zerograph.explain's memory plan or torch.cuda.memory_summary"),
    )
    graph_harvesting: StrictBool = Field(
        False, description="DeepSpeed: capture the step in CUDA graphs.",
        json_schema_extra=meta(no_effect="zerograph.compiler \"inductor\" decides how graphs run"),
    )
    dataloader_drop_last: StrictBool = Field(
        False, description="Drop the last incomplete batch of the data loader zerograph.initialize builds from "
        "training_data. DeepSpeed: same key.",
    )
    log_level: Optional[StrictStr] = Field(
        None, description="DeepSpeed's logger level.",
        json_schema_extra=meta(no_effect="set the level of the 'zerograph' logger with Python's logging"),
    )
    use_data_before_expert_parallelism: StrictBool = Field(
        False, description="DeepSpeed: rank order of data- and expert-parallel groups.",
        json_schema_extra=meta(no_effect="there is no expert parallelism"),
    )
    vocabulary_size: Optional[_Size] = Field(
        None, description="DeepSpeed: vocabulary size for its profilers.",
        json_schema_extra=meta(no_effect="zerograph reads the model itself"),
    )
    tensor_parallel: TensorParallelConfig = _section(TensorParallelConfig, "Tensor parallelism (AutoTP).")
    hybrid_engine: HybridEngineConfig = _section(HybridEngineConfig, "DeepSpeed's Hybrid Engine (RLHF).")
    checkpoint: CheckpointConfig = _section(CheckpointConfig, "Checkpoint options.")
    compile: CompileConfig = _section(CompileConfig, "DeepSpeed's DeepCompile.")
    tensorboard: TensorBoardConfig = _section(TensorBoardConfig, "TensorBoard monitor.")
    wandb: WandbConfig = _section(WandbConfig, "Weights & Biases monitor.")
    comet: CometConfig = _section(CometConfig, "Comet monitor.")
    csv_monitor: CSVMonitorConfig = _section(CSVMonitorConfig, "CSV monitor.")
    flops_profiler: FlopsProfilerConfig = _section(FlopsProfilerConfig, "FLOPs profiler.")
    comms_logger: CommsLoggerConfig = _section(CommsLoggerConfig, "Communication logger.")
    amp: ForeignSection = _foreign("amp")
    torch_autocast: ForeignSection = _foreign("torch_autocast")
    sparse_attention: ForeignSection = _foreign("sparse_attention")
    elasticity: ForeignSection = _foreign("elasticity")
    autotuning: ForeignSection = _foreign("autotuning")
    curriculum_learning: ForeignSection = _foreign("curriculum_learning")
    data_efficiency: ForeignSection = _foreign("data_efficiency")
    compression_training: ForeignSection = _foreign("compression_training")
    quantize_training: ForeignSection = _foreign("quantize_training")
    weight_quantization: ForeignSection = _foreign("weight_quantization")
    eigenvalue: ForeignSection = _foreign("eigenvalue")
    progressive_layer_drop: ForeignSection = _foreign("progressive_layer_drop")
    expert_parallel: ForeignSection = _foreign("expert_parallel")
    nebula: ForeignSection = _foreign("nebula")
    datastates_ckpt: ForeignSection = _foreign("datastates_ckpt")
    timers: ForeignSection = _foreign("timers")

    @model_validator(mode="after")
    def _one_precision(self) -> "ConfigKeys":
        if self.fp16.enabled and self.bf16.enabled:
            raise _problem("fp16.enabled and bf16.enabled are both true; enable at most one")
        return self


