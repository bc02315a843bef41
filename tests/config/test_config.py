"""Tests for zerograph.config: loading, validation messages, batch sizes, docs."""

import json
from pathlib import Path

import pydantic
import pytest
import torch
from expecttest import assert_expected_inline

from zerograph.config import (
    BF16Config,
    Config,
    ConfigError,
    FP16Config,
    OffloadConfig,
    OffloadOptimizerConfig,
    OffloadParamConfig,
    ZeroConfig,
    ZerographOptions,
    deepspeed_markdown,
    reference_markdown,
)

REPO = Path(__file__).resolve().parents[2]


def load_error(source) -> str:
    with pytest.raises(ConfigError) as info:
        Config.load(source)
    return str(info.value)


# -- defaults and loading ----------------------------------------------------


def test_defaults():
    cfg = Config.load(None)
    assert cfg == Config()
    assert cfg.train_batch_size is None
    assert cfg.train_micro_batch_size_per_gpu is None
    assert cfg.gradient_accumulation_steps == 1
    assert cfg.gradient_clipping == 0.0
    assert cfg.stage == 0
    assert cfg.compute_dtype is torch.float32
    assert cfg.dynamic_loss_scale is False
    assert cfg.fp16 == FP16Config(
        enabled=False, loss_scale=0.0, initial_scale_power=16, loss_scale_window=1000, hysteresis=2, min_loss_scale=1.0
    )
    assert cfg.bf16 == BF16Config(enabled=False)
    zero = cfg.zero_optimization
    assert (zero.stage, zero.overlap_comm, zero.contiguous_gradients, zero.reduce_scatter) == (0, True, True, True)
    assert (zero.reduce_bucket_size, zero.allgather_bucket_size) == (500_000_000, 500_000_000)
    assert (zero.stage3_max_live_parameters, zero.stage3_max_reuse_distance) == (1_000_000_000, 0)  # DeepSpeed: 1e9, 1e9
    assert zero.stage3_prefetch_bucket_size == 50_000_000
    assert zero.stage3_param_persistence_threshold == 0  # unlike DeepSpeed's 1e5
    assert zero.offload_optimizer == OffloadOptimizerConfig() and zero.offload_param == OffloadParamConfig()
    assert OffloadConfig() == OffloadConfig(device="none", pin_memory=False, nvme_path=None, buffer_count=4)
    assert OffloadOptimizerConfig().fast_init is False and OffloadParamConfig().buffer_count == 5
    assert cfg.zerograph == ZerographOptions(
        compiler="eager",
        disabled_passes=(),
        debug=False,
        verify_graphs=False,
        collective_timeout_s=300.0,
        seed_from_rank0=True,
    )
    assert cfg.inactive_settings() == []


def test_load_dict():
    cfg = Config.load(
        {
            "train_micro_batch_size_per_gpu": 4,
            "gradient_clipping": 1.0,
            "steps_per_print": 10,
            "wall_clock_breakdown": True,
            "bf16": {"enabled": True},
            "zero_optimization": {"stage": 3, "offload_optimizer": None, "offload_param": {"device": "none"}},
            "zerograph": {"compiler": "inductor", "disabled_passes": ["a", "b"]},
        }
    )
    assert cfg.stage == 3
    assert cfg.train_micro_batch_size_per_gpu == 4
    assert cfg.gradient_clipping == 1.0
    assert cfg.steps_per_print == 10
    assert cfg.compute_dtype is torch.bfloat16
    assert cfg.zero_optimization.offload_optimizer == OffloadOptimizerConfig()
    assert cfg.zerograph.compiler == "inductor"
    assert cfg.zerograph.disabled_passes == ("a", "b")


def test_load_json_file(tmp_path):
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps({"fp16": {"enabled": True, "loss_scale": 0}, "zero_optimization": {"stage": 2}}))
    for source in (path, str(path)):
        cfg = Config.load(source)
        assert cfg.stage == 2
        assert cfg.compute_dtype is torch.float16
        assert cfg.dynamic_loss_scale is True


def test_load_config_instance_is_returned_as_is():
    cfg = Config.load({"zero_optimization": {"stage": 1}})
    assert Config.load(cfg) is cfg


def test_load_missing_file(tmp_path):
    missing = tmp_path / "nope.json"
    assert load_error(missing) == f"config file not found: {missing}"


def test_load_bad_json_and_non_object(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"fp16": {"enabled": true,}}')
    msg = load_error(bad)
    assert msg.startswith(f"invalid zerograph config file {bad}:\nline 1 column ")
    assert "invalid JSON" in msg
    arr = tmp_path / "arr.json"
    arr.write_text("[1, 2]")
    assert load_error(arr).endswith("expected a JSON object at the top level; got list")


def test_load_rejects_other_types():
    assert_expected_inline(
        load_error(42),
        """cannot load a config from int; pass a JSON file path, a dict, a Config, or None""",
    )


def test_file_errors_name_the_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 4}}))
    assert load_error(path) == (
        f"invalid zerograph config file {path}:\nzero_optimization.stage: got 4; allowed: 0, 1, 2, 3"
    )


def test_frozen():
    cfg = Config()
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        cfg.gradient_clipping = 1.0
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        cfg.zero_optimization.stage = 3
    assert cfg.gradient_clipping == 0.0 and cfg.stage == 0


def test_properties_and_to_dict():
    cfg = Config.load({"fp16": {"enabled": True, "loss_scale": 128}, "zero_optimization": {"stage": 2}})
    assert cfg.stage == 2
    assert cfg.compute_dtype is torch.float16
    assert cfg.dynamic_loss_scale is False  # static scale
    d = cfg.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["fp16"]["loss_scale"] == 128.0
    assert d["zero_optimization"]["offload_param"]["device"] == "none"
    assert d["zerograph"]["disabled_passes"] == []
    assert Config.load(d) == cfg


# -- error messages ----------------------------------------------------------


def test_unknown_top_level_key():
    assert_expected_inline(
        load_error({"gradient_clip": 1.0}),
        """unknown config key 'gradient_clip'; did you mean 'gradient_clipping'?""",
    )


def test_unknown_nested_key():
    assert_expected_inline(
        load_error({"zero_optimization": {"stag": 3}}),
        """unknown config key 'zero_optimization.stag'; did you mean 'stage'?""",
    )
    assert_expected_inline(
        load_error({"zero_optimization": {"offload_param": {"devise": "none"}}}),
        """unknown config key 'zero_optimization.offload_param.devise'; did you mean 'device'?""",
    )


def test_unknown_key_without_close_match_lists_valid_keys():
    assert_expected_inline(
        load_error({"pipeline": {"xyzzy": True}}),
        """unknown config key 'pipeline.xyzzy'; valid keys: stages, micro_batches, schedule, virtual_stages, split_points, partition, seed_layers, activation_checkpoint_interval, pipe_partitioned, grad_partitioned""",
    )


def test_deepspeed_key_in_the_wrong_section_says_where_it_belongs():
    """A DeepSpeed key is never "corrected" into another key: the message says where it belongs."""
    assert_expected_inline(
        load_error({"bf16": {"auto_cast": True}, "stage3_max_live_parameters": 1e9, "offload_optimizer": {}}),
        """\
unknown config key 'bf16.auto_cast': 'auto_cast' is a key of the 'fp16' section; move it there
unknown config key 'stage3_max_live_parameters': 'stage3_max_live_parameters' is a key of the 'zero_optimization' section; move it there
unknown config key 'offload_optimizer': 'offload_optimizer' is a key of the 'zero_optimization' section; move it there""",
    )


def test_bad_stage():
    assert_expected_inline(
        load_error({"zero_optimization": {"stage": 5}}),
        """zero_optimization.stage: got 5; allowed: 0, 1, 2, 3""",
    )
    # a bool is not a stage even though True == 1
    assert_expected_inline(
        load_error({"zero_optimization": {"stage": True}}),
        """zero_optimization.stage: got True; expected an integer""",
    )


def test_bad_values():
    assert_expected_inline(
        load_error({"gradient_accumulation_steps": 0}),
        """gradient_accumulation_steps: got 0; must be >= 1""",
    )
    assert_expected_inline(
        load_error({"fp16": {"enabled": "yes please"}}),
        """fp16.enabled: got 'yes please'; expected a boolean (true or false)""",
    )
    assert_expected_inline(
        load_error({"zerograph": {"compiler": "jit", "collective_timeout_s": 0}}),
        """\
zerograph.compiler: got 'jit'; allowed: "eager", "inductor"
zerograph.collective_timeout_s: got 0.0; must be between 1 and 604800 seconds (1 s to 7 days)""",
    )
    assert_expected_inline(
        load_error({"fp16": {"initial_scale_power": 65}, "zerograph": {"disabled_passes": ["x", 3]}}),
        """\
fp16.initial_scale_power: got 65; must be <= 64
zerograph.disabled_passes[1]: got 3; expected a string""",
    )
    assert_expected_inline(
        load_error({"fp16": True}),
        """fp16: got True; expected a section (a JSON object)""",
    )
    assert_expected_inline(load_error({"zerograph": {"device": "gpu0"}}), """zerograph.device: got 'gpu0'; expected a torch device such as "cpu", "cuda" or "cuda:0\"""")


def test_bad_types():
    assert_expected_inline(
        load_error({"train_batch_size": "32", "zero_optimization": {"reduce_bucket_size": 1.5}}),
        """\
train_batch_size: got '32'; expected an integer
zero_optimization.reduce_bucket_size: got 1.5; expected a whole number""",
    )
    assert_expected_inline(
        load_error({"gradient_clipping": "1.0", "fp16": {"min_loss_scale": float("inf")}}),
        """\
gradient_clipping: got '1.0'; expected a number
fp16.min_loss_scale: got inf; expected a finite number""",
    )
    assert_expected_inline(
        load_error({"zero_optimization": {"allgather_bucket_size": -1}}),
        """zero_optimization.allgather_bucket_size: got -1; must be between 0 and 9223372036854775807""",
    )


def test_sizes_in_exponent_notation_become_ints(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"zero_optimization": {"reduce_bucket_size": 5e8, "stage3_prefetch_bucket_size": 5e7}}')
    zero = Config.load(path).zero_optimization
    assert zero.reduce_bucket_size == 500000000
    assert type(zero.reduce_bucket_size) is int
    assert zero.stage3_prefetch_bucket_size == 50_000_000
    assert type(zero.stage3_prefetch_bucket_size) is int


def test_hf_auto_values_take_the_default():
    cfg = Config.load({"train_batch_size": "auto", "bf16": {"enabled": "auto"},
                       "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}})
    assert cfg.train_batch_size is None and cfg.bf16.enabled is False
    assert cfg.zero_optimization.reduce_bucket_size == 500_000_000
    assert cfg.auto_keys == ("train_batch_size", "bf16.enabled", "zero_optimization.reduce_bucket_size")


def test_fp16_and_bf16_together():
    assert_expected_inline(
        load_error({"fp16": {"enabled": True}, "bf16": {"enabled": True}}),
        """fp16.enabled and bf16.enabled are both true; enable at most one""",
    )


def test_offload_rejected():
    # NVMe offload needs a directory (tests/test_nvme_offload.py has the rest)
    assert_expected_inline(
        load_error({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}}),
        """zero_optimization.offload_param.device is "nvme" but zero_optimization.offload_param.nvme_path is not set: set it to a directory on a local NVMe drive (each rank writes its offloaded states there)""",
    )
    assert Config.load({"zero_optimization": {"offload_optimizer": {"device": "nvme", "nvme_path": "/nvme"}}})
    # parameter offload needs stage 3 (tests/test_param_offload.py has the rest)
    assert_expected_inline(
        load_error({"zero_optimization": {"stage": 1, "offload_param": {"device": "cpu"}}}),
        """zero_optimization.offload_param.device="cpu" needs zero_optimization.stage 3 (now 1): only stage 3 gathers parameters from shards, so only there can they live on the host; set stage to 3, or use offload_optimizer.device "cpu" (optimizer states on the host) instead""",
    )
    # the same checks apply when models are built directly
    with pytest.raises(pydantic.ValidationError, match="needs zero_optimization.stage 3"):
        ZeroConfig(offload_param=OffloadParamConfig(device="cpu"))
    assert ZeroConfig(stage=3, offload_param=OffloadParamConfig(device="cpu")).offload_param.device == "cpu"
    assert ZeroConfig(offload_optimizer=OffloadOptimizerConfig(device="cpu")).offload_optimizer.device == "cpu"
    with pytest.raises(pydantic.ValidationError, match="nvme_path is not set"):
        OffloadParamConfig(device="nvme")


def test_all_problems_reported_together():
    with pytest.raises(ConfigError) as info:
        Config.load({"zero_optimization": {"stag": 3, "stage": 9}, "fp16": {"hysteresis": 0}})
    assert info.value.problems == (
        "fp16.hysteresis: got 0; must be >= 1",
        "zero_optimization.stage: got 9; allowed: 0, 1, 2, 3",
        "unknown config key 'zero_optimization.stag'; did you mean 'stage'?",
    )
    assert str(info.value) == "\n".join(info.value.problems)
    assert isinstance(info.value, ValueError)


# -- batch sizes ---------------------------------------------------------------


def resolve(world_size, **keys):
    return Config.load(keys).resolve_batch(world_size)


def test_resolve_batch_all_given_consistent():
    assert resolve(4, train_batch_size=64, train_micro_batch_size_per_gpu=8, gradient_accumulation_steps=2) == (64, 8, 2)


def test_resolve_batch_all_given_inconsistent():
    with pytest.raises(ConfigError) as info:
        resolve(2, train_batch_size=64, train_micro_batch_size_per_gpu=8, gradient_accumulation_steps=2)
    assert_expected_inline(
        str(info.value),
        """train_batch_size (64) != train_micro_batch_size_per_gpu (8) * gradient_accumulation_steps (2) * world_size (2) = 32; the batch sizes must satisfy train_batch_size == train_micro_batch_size_per_gpu * gradient_accumulation_steps * world_size""",
    )


def test_resolve_batch_derivations():
    # train + micro -> gas
    assert resolve(2, train_batch_size=64, train_micro_batch_size_per_gpu=8) == (64, 8, 4)
    # train + gas -> micro
    assert resolve(2, train_batch_size=64, gradient_accumulation_steps=4) == (64, 8, 4)
    # micro + gas -> train
    assert resolve(2, train_micro_batch_size_per_gpu=8, gradient_accumulation_steps=4) == (64, 8, 4)
    # only micro -> train with gas 1
    assert resolve(4, train_micro_batch_size_per_gpu=8) == (32, 8, 1)
    # only train -> micro with gas 1
    assert resolve(4, train_batch_size=32) == (32, 8, 1)
    # nothing given
    assert resolve(8) == (None, None, 1)
    assert resolve(8, gradient_accumulation_steps=3) == (None, None, 3)


def test_resolve_batch_not_divisible():
    with pytest.raises(ConfigError) as info:
        resolve(2, train_batch_size=60, train_micro_batch_size_per_gpu=8)
    assert_expected_inline(
        str(info.value),
        """cannot derive gradient_accumulation_steps: train_batch_size (60) is not divisible by train_micro_batch_size_per_gpu (8) * world_size (2) = 16""",
    )
    with pytest.raises(ConfigError) as info:
        resolve(4, train_batch_size=30, gradient_accumulation_steps=2)
    assert_expected_inline(
        str(info.value),
        """cannot derive train_micro_batch_size_per_gpu: train_batch_size (30) is not divisible by gradient_accumulation_steps (2) * world_size (4) = 8""",
    )


def test_resolve_batch_bad_world_size():
    with pytest.raises(ConfigError, match=r"world_size must be a positive integer; got 0"):
        Config().resolve_batch(0)


# -- settings with no effect yet ----------------------------------------------


def test_inactive_settings():
    cfg = Config.load(
        {
            "zero_optimization": {
                "stage": 3,
                "reduce_scatter": False,
                "stage3_max_reuse_distance": 1000,
                "reduce_bucket_size": 5e8,  # equal to the default: not listed
            }
        }
    )
    assert cfg.inactive_settings() == [
        "zero_optimization.reduce_scatter=false: no effect yet: zerograph picks the reduction per stage and lays "
        "gradients out in its bucket buffers",
    ]  # stage3_max_reuse_distance takes effect (zero_policy)
    assert Config().inactive_settings() == []
    assert Config.load({"zero_optimization": {"stage": 3}, "gradient_clipping": 1.0}).inactive_settings() == []


def test_hugging_face_trainer_zero3_config_loads():
    """The ZeRO-3 config of Hugging Face's Trainer docs (its "auto" values
    filled in) loads: the DeepSpeed-only keys are accepted and listed as
    inactive when changed; keys zerograph cannot honour get a message naming
    what to use instead."""
    cfg = Config.load({
        "bf16": {"enabled": True},
        "zero_optimization": {
            "stage": 3, "overlap_comm": True, "contiguous_gradients": True, "sub_group_size": 1e9,
            "reduce_bucket_size": 1048576, "stage3_prefetch_bucket_size": 943718,
            "stage3_param_persistence_threshold": 10240, "stage3_max_live_parameters": 1e9,
            "stage3_max_reuse_distance": 1e9, "stage3_gather_16bit_weights_on_model_save": True,
        },
        "gradient_accumulation_steps": 1, "gradient_clipping": 1.0, "steps_per_print": 2000,
        "train_micro_batch_size_per_gpu": 4, "wall_clock_breakdown": False, "zero_allow_untested_optimizer": True,
    })
    assert cfg.stage == 3 and cfg.zero_optimization.stage3_param_persistence_threshold == 10240
    # steps_per_print works (zerograph.initialize's engine logs progress)
    assert [line.split("=")[0] for line in cfg.inactive_settings()] == [
        "zero_allow_untested_optimizer", "zero_optimization.stage3_gather_16bit_weights_on_model_save"]
    with pytest.raises(ConfigError) as info:
        Config.load({"amp": {"enabled": True}, "communication_data_type": "fp16", "elasticity": {}})
    message = str(info.value)
    assert "amp is a DeepSpeed feature zerograph does not have (NVIDIA Apex AMP): use the 'bf16' or 'fp16' section" in message
    assert 'communication_data_type="fp16": zerograph reduces gradients in fp32' in message
    assert Config.load({"elasticity": {}}).elasticity is None  # empty: off


# -- documentation -------------------------------------------------------------


def test_reference_markdown_describes_every_field():
    text = reference_markdown()
    for model in (Config, FP16Config, BF16Config, ZeroConfig, OffloadParamConfig, OffloadOptimizerConfig, ZerographOptions):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            assert f"| `{name}` |" in text
    assert "### `zero_optimization.offload_optimizer`" in text and "### `zero_optimization.offload_param`" in text
    assert "| `stage` | one of 0, 1, 2, 3 | `0` |" in text
    assert "| `train_batch_size` | integer >= 1, or null | `null` |" in text


def test_docs_match_generated_reference():
    doc = (REPO / "docs" / "config.md").read_text()
    assert reference_markdown() in doc, (
        "docs/config.md is out of date: replace everything from the '<!-- Generated' line on with the output of "
        "python -c \"import zerograph.config as c; print(c.reference_markdown())\""
    )


def test_from_deepspeed_doc_matches_generated_tables():
    doc = (REPO / "docs" / "from_deepspeed.md").read_text()
    assert deepspeed_markdown() in doc, (
        "docs/from_deepspeed.md is out of date: replace everything from the '<!-- Generated' line on with the output "
        "of python -c \"import zerograph.config as c; print(c.deepspeed_markdown())\""
    )
    assert "| `zero_optimization.zero_quantized_nontrainable_weights` | only `false`; otherwise rejected:" in doc
    assert "| `zero_optimization.max_live_parameters` | DeepSpeed's other name for " in doc
    assert "| `sparse_attention` | not in zerograph (block-sparse attention kernels)" in doc
    assert "| `zerograph" not in doc  # zerograph's own section is not a DeepSpeed key


def test_with_resolved_batch_fills_in_what_the_rule_derives():
    cfg = Config.load({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 8})
    resolved = cfg.with_resolved_batch(4)
    assert (resolved.train_batch_size, resolved.train_micro_batch_size_per_gpu,
            resolved.gradient_accumulation_steps) == (64, 8, 2)
    assert cfg.gradient_accumulation_steps == 1  # the original is unchanged
    assert Config().with_resolved_batch(2) == Config()
