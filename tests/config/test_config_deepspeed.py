"""DeepSpeed configs as public projects write them load, or fail with a message
naming the DeepSpeed feature and what to use instead. The configs below are
written for these tests in the styles of the Hugging Face Trainer templates,
DeepSpeedExamples, DeepSpeed-Chat/OpenRLHF, LLaMA-Factory, axolotl and
Megatron-DeepSpeed (not copied from them)."""

from __future__ import annotations

import json
import logging

import pytest
from expecttest import assert_expected_inline

from zerograph.config import Config, ConfigError
from zerograph.config.messages import key_homes


def problems(source) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as info:
        Config.load(source)
    return info.value.problems


HF_ZERO2 = {
    "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16,
             "hysteresis": 2, "min_loss_scale": 1},
    "bf16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                 "warmup_num_steps": "auto"}},
    "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": True},
                          "allgather_partitions": True, "allgather_bucket_size": 2e8, "overlap_comm": True,
                          "reduce_scatter": True, "reduce_bucket_size": 2e8, "contiguous_gradients": True},
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "steps_per_print": 2000,
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "wall_clock_breakdown": False,
}

HF_ZERO3 = {
    "bf16": {"enabled": "auto"},
    "zero_optimization": {
        "stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True},
        "offload_param": {"device": "cpu", "pin_memory": True}, "overlap_comm": True, "contiguous_gradients": True,
        "sub_group_size": 1e9, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto", "stage3_max_live_parameters": 1e9,
        "stage3_max_reuse_distance": 1e9, "stage3_gather_16bit_weights_on_model_save": True},
    "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "steps_per_print": 2000,
    "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "wall_clock_breakdown": False,
}


def test_hf_trainer_zero2_template_loads_with_auto_defaults(caplog):
    caplog.set_level(logging.INFO, logger="zerograph")
    cfg = Config.load(HF_ZERO2)
    assert cfg.stage == 2 and cfg.zero_optimization.offload_optimizer.device == "cpu"
    assert cfg.zero_optimization.allgather_bucket_size == 200_000_000
    assert cfg.train_batch_size is None and cfg.gradient_accumulation_steps == 1 and cfg.gradient_clipping == 0.0
    assert cfg.optimizer.type == "AdamW" and cfg.optimizer.params.lr is None
    assert cfg.scheduler.params.warmup_num_steps == 1000
    assert cfg.auto_keys == (
        "fp16.enabled", "bf16.enabled", "optimizer.params.lr", "optimizer.params.betas", "optimizer.params.eps",
        "optimizer.params.weight_decay", "scheduler.params.warmup_min_lr", "scheduler.params.warmup_max_lr",
        "scheduler.params.warmup_num_steps", "gradient_accumulation_steps", "gradient_clipping", "train_batch_size",
        "train_micro_batch_size_per_gpu")
    lines = [r.getMessage() for r in caplog.records if '"auto"' in r.getMessage()]
    assert lines == [
        'zerograph config: "auto" values (Config.resolve_auto fills them from a trainer): fp16.enabled=false, '
        "bf16.enabled=false, optimizer.params.lr=null, optimizer.params.betas=null, optimizer.params.eps=null, "
        "optimizer.params.weight_decay=0.0, scheduler.params.warmup_min_lr=0.0, scheduler.params.warmup_max_lr=null, "
        "scheduler.params.warmup_num_steps=1000, gradient_accumulation_steps=1, gradient_clipping=0.0, "
        "train_batch_size=null, train_micro_batch_size_per_gpu=null"]
    assert cfg.inactive_settings() == []  # steps_per_print works (zerograph.initialize's engine)


def test_resolve_auto_fills_the_trainers_values(caplog):
    cfg = Config.load(HF_ZERO3)
    caplog.set_level(logging.INFO, logger="zerograph")
    hidden = 64
    resolved = cfg.resolve_auto({
        "bf16.enabled": True, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
        "train_batch_size": 16, "gradient_clipping": 1.0, "zero_optimization.reduce_bucket_size": hidden * hidden,
        "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
        "zero_optimization.stage3_param_persistence_threshold": 10 * hidden,
        "zero_optimization.stage": 3,  # not "auto", but the same value: fine
    })
    assert resolved.compute_dtype.is_floating_point and resolved.bf16.enabled
    assert resolved.resolve_batch(2) == (16, 4, 2)
    assert resolved.zero_optimization.reduce_bucket_size == 4096
    assert resolved.zero_optimization.stage3_param_persistence_threshold == 640
    assert resolved.zero_optimization.offload_param.device == "cpu"  # given keys stay
    assert resolved.auto_keys == ()
    assert any(r.getMessage().startswith('zerograph config: "auto" values resolved: bf16.enabled=true, '
                                         "train_micro_batch_size_per_gpu=4") for r in caplog.records)
    with pytest.raises(ConfigError) as info:
        cfg.resolve_auto({"zero_optimization.stage": 2, "zero_optimization.sub_group_size": 1e9, "nope": 1})
    assert info.value.problems == (
        'resolve_auto: zero_optimization.stage is 3 in the config, not "auto", but the trainer has 2; make them '
        'agree or set zero_optimization.stage to "auto"',
        "resolve_auto: unknown config key 'nope'",
    )


def test_deepspeed_examples_style_fp16_adam():
    cfg = Config.load({
        "train_batch_size": 32, "train_micro_batch_size_per_gpu": 8, "steps_per_print": 10,
        "optimizer": {"type": "Adam", "params": {"lr": 0.00015, "betas": [0.9, 0.999], "eps": 1e-8,
                                                 "weight_decay": 3e-7}},
        "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 0.00015,
                                                          "warmup_num_steps": 100, "total_num_steps": 1000}},
        "gradient_clipping": 1.0, "prescale_gradients": False,
        "fp16": {"enabled": True, "fp16_master_weights_and_grads": False, "loss_scale": 0,
                 "loss_scale_window": 500, "hysteresis": 2, "min_loss_scale": 1, "initial_scale_power": 15},
        "wall_clock_breakdown": False,
        "zero_optimization": {"stage": 0, "allgather_partitions": True, "reduce_scatter": True,
                              "allgather_bucket_size": 50000000, "reduce_bucket_size": 50000000,
                              "overlap_comm": True, "contiguous_gradients": True, "cpu_offload": False},
    })
    assert cfg.resolve_batch(4) == (32, 8, 1)
    assert cfg.optimizer.params.betas == (0.9, 0.999) and cfg.scheduler.params.total_num_steps == 1000
    assert cfg.dynamic_loss_scale and cfg.fp16.initial_scale_power == 15
    assert cfg.inactive_settings() == []


def test_rlhf_style_zero3_with_disabled_engines():
    cfg = Config.load({
        "train_batch_size": 64, "train_micro_batch_size_per_gpu": 8, "steps_per_print": 10,
        "zero_optimization": {"stage": 3, "offload_param": {"device": "none"}, "offload_optimizer": {"device": "none"},
                              "stage3_param_persistence_threshold": 1e4, "stage3_max_live_parameters": 3e7,
                              "stage3_prefetch_bucket_size": 3e7, "memory_efficient_linear": False,
                              "zero_quantized_weights": False, "zero_hpz_partition_size": 1,
                              "zero_quantized_gradients": False},
        "fp16": {"enabled": True, "loss_scale_window": 100},
        "gradient_clipping": 1.0, "prescale_gradients": False, "wall_clock_breakdown": False,
        "hybrid_engine": {"enabled": False, "max_out_tokens": 512, "inference_tp_size": 1,
                          "release_inference_cache": False, "pin_parameters": True, "tp_gather_partition_size": 8},
        "tensorboard": {"enabled": False, "output_path": "step3_tensorboard/ds_tensorboard_logs/",
                        "job_name": "step3_actor_tensorboard"},
        "data_types": {"grad_accum_dtype": "fp32"},
        "_comment": "the actor's config",
    })
    assert cfg.zero_optimization.stage3_max_live_parameters == 30_000_000
    assert cfg.inactive_settings() == [
        "zero_optimization.memory_efficient_linear=false: no effect yet: linear layers are traced; the partitioner "
        "decides what they save",
    ]


def test_llama_factory_style_zero3_offload():
    cfg = Config.load({
        "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto", "zero_allow_untested_optimizer": True,
        "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16,
                 "hysteresis": 2, "min_loss_scale": 1},
        "bf16": {"enabled": "auto"},
        "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True},
                              "offload_param": {"device": "cpu", "pin_memory": True}, "overlap_comm": False,
                              "contiguous_gradients": True, "sub_group_size": 1e9, "reduce_bucket_size": "auto",
                              "stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto",
                              "stage3_max_live_parameters": 1e9, "stage3_max_reuse_distance": 1e9,
                              "stage3_gather_16bit_weights_on_model_save": True},
    })
    zero = cfg.zero_optimization
    assert zero.offload_param.device == zero.offload_optimizer.device == "cpu" and zero.overlap_comm is False
    assert zero.stage3_param_persistence_threshold == 0  # "auto": zerograph's default
    assert [line.split("=")[0] for line in cfg.inactive_settings()] == [
        "zero_allow_untested_optimizer", "zero_optimization.stage3_gather_16bit_weights_on_model_save"]


def test_axolotl_style_bf16_with_no_op_keys(tmp_path):
    path = tmp_path / "zero3_bf16.json"
    path.write_text(json.dumps({
        "zero_optimization": {"stage": 3, "overlap_comm": True, "contiguous_gradients": True, "sub_group_size": 0,
                              "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                              "stage3_param_persistence_threshold": "auto", "max_live_parameters": 0,
                              "max_reuse_distance": 0, "gather_16bit_weights_on_model_save": True},
        "bf16": {"enabled": True},
        "fp16": {"enabled": "auto", "auto_cast": False, "loss_scale": 0, "initial_scale_power": 32,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto", "wall_clock_breakdown": False,
    }))
    cfg = Config.load(path)
    zero = cfg.zero_optimization
    assert (zero.stage3_max_live_parameters, zero.stage3_max_reuse_distance) == (0, 0)  # DeepSpeed's short names
    assert zero.stage3_gather_16bit_weights_on_model_save is True
    assert [line.split(":")[0] for line in cfg.inactive_settings()] == [
        "fp16.auto_cast=false", "zero_optimization.stage3_gather_16bit_weights_on_model_save=true"]


def test_megatron_deepspeed_style():
    base = {"train_batch_size": 256, "train_micro_batch_size_per_gpu": 4, "steps_per_print": 1,
            "zero_optimization": {"stage": 1}, "bf16": {"enabled": True}, "gradient_clipping": 1.0,
            "prescale_gradients": False, "data_types": {"grad_accum_dtype": "fp32"}, "wall_clock_breakdown": True,
            "curriculum_learning": {"enabled": False, "curriculum_type": "seqlen", "min_difficulty": 64,
                                    "max_difficulty": 2048, "schedule_type": "fixed_linear",
                                    "schedule_config": {"total_curriculum_step": 1000, "difficulty_step": 8}},
            "flops_profiler": {"enabled": True, "profile_step": 10, "module_depth": -1, "top_modules": 3,
                               "detailed": True}}
    cfg = Config.load(base)
    assert cfg.curriculum_learning is None  # switched off: the same as leaving it out
    # the monitors work in zerograph.initialize's engine; the profiler's report has no per-module breakdown
    assert [line.split(":")[0] for line in cfg.inactive_settings()] == ["flops_profiler.top_modules=3"]
    assert not {"steps_per_print", "wall_clock_breakdown"} & set(cfg.changed_settings())  # no runtime needed
    assert_expected_inline(
        "\n".join(problems({**base, "sequence_parallel_size": 4, "tensor_parallel": {"tp": {"tp_size": 2}},
                            "curriculum_learning": {"enabled": True}, "data_types": {"grad_accum_dtype": "bf16"}})),
        """\
data_types.grad_accum_dtype="bf16": zerograph reduces and accumulates gradients in fp32 (the master dtype); other dtypes are not supported yet (remove the key or set it to "fp32")
tensor_parallel.tp.tp_size=2: tensor_parallel.tp.tp_size is DeepSpeed's inference setting; for training set tensor_parallel.autotp_size instead
curriculum_learning is a DeepSpeed feature zerograph does not have (curriculum learning): order or truncate the samples in your data loader, and delete the 'curriculum_learning' section""",
    )


def test_unsupported_zero_plus_plus_keys_and_all_problems_are_listed():
    assert_expected_inline(
        "\n".join(problems({"zero_optimization": {
            "stage": 3, "zero_quantized_weights": True, "zero_hpz_partition_size": 8, "zero_quantized_gradients": True,
            "zero_quantized_nontrainable_weights": True,
            "offload_param": {"device": "nvme"}, "reduce_bucket_size": -5},
            "sparse_attention": {"mode": "fixed", "block": 16}, "optimizer": {"type": "OneBitAdam",
                                                                             "params": {"freeze_step": 400}}})),
        """\
zero_optimization.reduce_bucket_size: got -5; must be between 0 and 9223372036854775807
zero_optimization.offload_param.device is "nvme" but zero_optimization.offload_param.nvme_path is not set: set it to a directory on a local NVMe drive (each rank writes its offloaded states there)
zero_optimization.zero_quantized_nontrainable_weights=true: ZeRO++ quantized frozen weights are not supported yet; remove the key or set it to false
optimizer.type="OneBitAdam": 1-bit Adam (compressed communication) is a DeepSpeed optimizer zerograph does not have; build it yourself with zerograph.make_optimizer(model, OptimizerClass, ...) and delete the 'optimizer' section
sparse_attention is a DeepSpeed feature zerograph does not have (block-sparse attention kernels): use dense attention (zerograph.fusion fuses it) or a sparse-attention module in your model, and delete the 'sparse_attention' section""",
    )


def test_deprecated_and_other_names_map_to_their_key(caplog):
    caplog.set_level(logging.INFO, logger="zerograph")
    cfg = Config.load({"bfloat16": {"enabled": True, "check_overflow": False},
                       "zero_optimization": {"stage": 3, "cpu_offload": True, "cpu_offload_param": True,
                                             "cpu_offload_use_pin_memory": True, "prefetch_bucket_size": 1000,
                                             "param_persistence_threshold": 10,
                                             "stage3_gather_fp16_weights_on_model_save": True}})
    zero = cfg.zero_optimization
    assert cfg.bf16.enabled and cfg.bf16.check_grad_overflow is False
    assert zero.offload_optimizer.device == zero.offload_param.device == "cpu"
    assert zero.offload_optimizer.pin_memory and zero.offload_param.pin_memory
    assert (zero.stage3_prefetch_bucket_size, zero.stage3_param_persistence_threshold) == (1000, 10)
    assert zero.stage3_gather_16bit_weights_on_model_save is True
    messages = " | ".join(r.getMessage() for r in caplog.records)
    assert "bfloat16 -> bf16 (DeepSpeed's other name for the key)" in messages
    assert ("zero_optimization.stage3_gather_fp16_weights_on_model_save -> "
            "zero_optimization.stage3_gather_16bit_weights_on_model_save (deprecated name)") in messages
    assert "zero_optimization.cpu_offload is DeepSpeed's deprecated form of offload_optimizer.device=cpu" in messages
    assert_expected_inline(
        "\n".join(problems({"zero_optimization": {"stage3_max_live_parameters": 10, "max_live_parameters": 20}})),
        """zero_optimization.stage3_max_live_parameters and zero_optimization.max_live_parameters are the same key (DeepSpeed has both names) with different values (10 and 20); keep one""",
    )


def test_did_you_mean_never_points_a_deepspeed_key_at_another():
    assert_expected_inline(
        "\n".join(problems({"zero_optimization": {"zero_quantized_gradient": True, "allgather_partition": True,
                                                  "max_live_param": 1},
                            "gradient_clip": 1.0, "offload_param": {"device": "cpu"},
                            "fp16": {"bf16_master_weights_and_grads": False}})),
        """\
unknown config key 'fp16.bf16_master_weights_and_grads': 'bf16_master_weights_and_grads' is a key of the 'bf16' section; move it there
unknown config key 'zero_optimization.zero_quantized_gradient'; did you mean 'zero_quantized_gradients'?
unknown config key 'zero_optimization.allgather_partition'; did you mean 'allgather_partitions'?
unknown config key 'zero_optimization.max_live_param'; did you mean 'stage3_max_live_parameters'?
unknown config key 'gradient_clip'; did you mean 'gradient_clipping'?
unknown config key 'offload_param': 'offload_param' is a key of the 'zero_optimization' section; move it there""",
    )


def test_optimizer_and_scheduler_sections_are_checked():
    assert Config.load({"optimizer": {"type": "sgd", "params": {"lr": 0.1, "momentum": 0.9}}}).optimizer.type == "SGD"
    assert_expected_inline(
        "\n".join(problems({
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "momentum": 0.9, "max_grad_norm": 1.0}},
            "scheduler": {"type": "WarmupCosineLR", "params": {"warmup_max_lr": 1e-3}}})),
        """\
optimizer.params.max_grad_norm=1.0: not an optimizer parameter; use the top-level gradient_clipping
scheduler.params: warmup_max_lr is not a parameter of WarmupCosineLR; it takes total_num_steps, warmup_min_ratio, warmup_num_steps, cos_min_ratio, warmup_type, last_batch_iteration
scheduler.params: WarmupCosineLR needs total_num_steps""",
    )
    assert problems({"optimizer": {"type": "AdamW", "params": {"momentum": 0.9}}}) == (
        "optimizer.params: momentum is not a parameter of AdamW; it takes lr, betas, eps, weight_decay, amsgrad, "
        "bias_correction, adam_w_mode, torch_adam, fp32_optimizer_states",)
    assert problems({"optimizer": {"type": "NAdam"}})[0].startswith(
        'optimizer.type="NAdam": torch.optim.NAdam is not built from the config yet (built: Adam, AdamW, SGD, '
        "Adagrad, RMSprop); build it with zerograph.make_optimizer(model, torch.optim.NAdam, ...)")
    assert problems({"optimizer": {"type": "Adamm"}}) == (
        'optimizer.type="Adamm": unknown optimizer type; did you mean "Adam"? zerograph builds Adam, AdamW, SGD, '
        "Adagrad, RMSprop",)
    assert problems({"optimizer": {"type": "Lamb", "params": {"max_coeff": 0.3}}})[0].startswith(
        'optimizer.type="Lamb": LAMB (DeepSpeed\'s FusedLamb) is a DeepSpeed optimizer zerograph does not have')


def test_monitors_and_checkpoint_options():
    cfg = Config.load({"wandb": {"enabled": True, "project": "p"}, "csv_monitor": {"enabled": False},
                       "comms_logger": {"enabled": True, "prof_all": True}, "checkpoint": {"load_universal": True},
                       "compile": {"deepcompile": True}, "aio": {"block_size": 1048576},
                       "hybrid_engine": {"enabled": False}})
    assert [line.split(":")[0] for line in cfg.inactive_settings()] == [
        "checkpoint.load_universal=true", "compile.deepcompile=true", "wandb.enabled=true"]
    assert cfg.changed_settings() == []  # none of them needs the runtime
    assert problems({"hybrid_engine": {"enabled": True}})[0].startswith(
        "hybrid_engine.enabled=true: the Hybrid Engine (RLHF generation with inference kernels) is a DeepSpeed feature")


def test_every_key_of_deepspeeds_reference_is_known():
    """The keys of DeepSpeed's config reference (docs/_pages/config-json.md), by section."""
    reference = {
        "": "train_batch_size train_micro_batch_size_per_gpu gradient_accumulation_steps managed_gradient_accumulation "
            "optimizer scheduler communication_data_type gradient_allreduce_op prescale_gradients "
            "gradient_predivide_factor sparse_gradients fp16 bf16 amp torch_autocast gradient_clipping "
            "zero_optimization aio tensor_parallel hybrid_engine expert_parallel steps_per_print wall_clock_breakdown "
            "dump_state autotuning flops_profiler activation_checkpointing sparse_attention data_efficiency "
            "curriculum_learning tensorboard wandb comet csv_monitor elasticity comms_logger compression_training "
            "checkpoint compile data_types zero_allow_untested_optimizer zero_force_ds_cpu_optimizer "
            "sequence_parallel_size bfloat16",
        "fp16": "enabled auto_cast loss_scale initial_scale_power loss_scale_window hysteresis consecutive_hysteresis "
                "min_loss_scale fp16_master_weights_and_grads",
        "bf16": "enabled immediate_grad_update check_grad_overflow bf16_master_weights_and_grads bf16_optimizer_states",
        "zero_optimization": "stage allgather_partitions allgather_bucket_size overlap_comm reduce_scatter "
                             "reduce_bucket_size contiguous_gradients load_from_fp32_weights grad_hooks "
                             "round_robin_gradients offload_param offload_optimizer stage3_max_live_parameters "
                             "stage3_max_reuse_distance stage3_prefetch_bucket_size stage3_param_persistence_threshold "
                             "stage3_gather_16bit_weights_on_model_save stage3_module_granularity_threshold "
                             "zero_hpz_partition_size zero_quantized_weights zero_quantized_gradients "
                             "log_trace_cache_warnings cpu_offload sub_group_size elastic_checkpoint "
                             "ignore_unused_parameters memory_efficient_linear mics_shard_size zenflow leaf_module",
        "zero_optimization.offload_param": "device nvme_path pin_memory buffer_count buffer_size max_in_cpu",
        "zero_optimization.offload_optimizer": "device nvme_path pin_memory ratio buffer_count fast_init",
        "aio": "block_size queue_depth thread_count single_submit overlap_events",
        "tensor_parallel": "autotp_size preset_model tp_overlap_comm partition_config",
        "activation_checkpointing": "partition_activations cpu_checkpointing contiguous_memory_optimization "
                                    "number_checkpoints synchronize_checkpoint_boundary profile",
        "flops_profiler": "enabled profile_step module_depth top_modules detailed output_file",
        "checkpoint": "tag_validation load_universal use_node_local_storage parallel_write",
        "compile": "deepcompile passes offload_activation offload_activation_pin_memory",
        "data_types": "grad_accum_dtype",
        "comms_logger": "enabled verbose prof_all debug prof_ops",
        "tensorboard": "enabled output_path job_name",
        "wandb": "enabled group team project",
        "csv_monitor": "enabled output_path job_name",
        "hybrid_engine": "enabled max_out_tokens inference_tp_size release_inference_cache pin_parameters "
                         "tp_gather_partition_size enable_cuda_graph",
        "elasticity": "enabled max_train_batch_size micro_batch_sizes min_gpus max_gpus min_time version",
        "sparse_attention": "mode block different_layout_per_head num_local_blocks num_global_blocks attention",
    }
    homes = key_homes(Config)
    deprecated = {"cpu_offload"}  # rewritten into offload_optimizer by ZeroConfig
    missing = [f"{section}.{key}" for section, keys in reference.items() for key in keys.split()
               if key not in deprecated and section not in homes.get(key, ())]
    assert missing == []
