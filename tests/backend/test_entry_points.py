"""The ways in: ``zerograph.shard`` run eagerly, ``torch.compile(model,
backend="zerograph")`` found through the entry point, on sharded and plain
models."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests import _harness, _models
from tests._harness import TIMEOUT


def test_backend_registered_through_entry_point_without_import():
    code = (
        "import sys, torch\n"
        "from torch._dynamo.backends.registry import lookup_backend\n"
        "fn = lookup_backend('zerograph')\n"
        "assert fn.__module__ == 'zerograph.backend', fn.__module__\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.timeout(TIMEOUT + 30)
@pytest.mark.parametrize("entry", ["torch_compile", "eager"])
def test_sharded_model_trains_like_eager_via(entry):
    world = 2
    ref_losses, ref_params = _harness.reference_run("gpt", world)
    configs = [{"zero_optimization": {"stage": 3}}]
    results = _harness.train("gpt", configs, _harness.STEPS, world, entry=entry)
    result = results[0][0]
    _harness.assert_same_training(result, ref_losses, ref_params)
    if entry == "torch_compile":
        assert result["regions"] >= 1
        assert result["comm_by_phase"]["forward"]["all_gather"] > 0, "collectives must be in the compiled graphs"
    else:
        assert result["regions"] == 0
        assert result["comm"]["all_gather"] > 0 and result["comm"]["reduce_scatter"] > 0


def test_plain_model_with_zerograph_backend_matches_eager():
    torch.manual_seed(0)
    ref = _models.make_gpt()
    model = _models.make_gpt()
    compiled = torch.compile(model, backend="zerograph")
    idx, targets = _models.global_batch(0, 4)
    torch.testing.assert_close(compiled(idx, targets).loss, ref(idx, targets).loss, rtol=1e-6, atol=1e-6)


def test_plain_model_with_zerograph_backend_refuses_a_config_that_needs_sharding():
    """A plain model compiled with options={"config": ...}: the backend alone
    runs passes, so a config asking for ZeRO, precision, clipping or
    accumulation (which need zerograph.shard) is an error naming the keys and
    the fix, not ranks silently training on their own. Pass-only settings work."""
    from zerograph.config import ConfigError

    idx, targets = _models.global_batch(0, 4)
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_clipping": 1.0, "bf16": {"enabled": True},
              "zero_optimization": {"stage": 3}}
    compiled = torch.compile(_models.make_gpt(), backend="zerograph", options={"config": config})
    with pytest.raises(Exception) as info:  # Dynamo reports the backend's ConfigError as BackendCompilerFailed
        compiled(idx, targets)
    message = str(info.value)
    assert f"{ConfigError.__name__}: torch.compile(model, backend=" in message
    assert "gradient_clipping, bf16.enabled, zero_optimization.stage" in message
    assert "torch.compile(zerograph.shard(model, config), backend=\"zerograph\")" in message
    assert "train_micro_batch_size_per_gpu" not in message

    torch._dynamo.reset()
    ref = _models.make_gpt()
    ok = torch.compile(_models.make_gpt(), backend="zerograph",
                       options={"config": {"train_micro_batch_size_per_gpu": 4,
                                           "activation_checkpointing": {"policy": "per_layer"}}})
    torch.testing.assert_close(ok(idx, targets).loss, ref(idx, targets).loss, rtol=1e-6, atol=1e-6)


def test_preparing_a_prepared_model_again_is_an_error_naming_the_fix():
    import zerograph

    model = zerograph.compile(_models.make_gpt(), {"zero_optimization": {"stage": 3}})
    with pytest.raises(ValueError, match=r"already prepared by zerograph.compile/shard \(ZeRO stage 3\).*"
                                         r"full_state_dict"):
        zerograph.compile(model, {})
    with pytest.raises(ValueError, match="already prepared"):
        zerograph.shard(torch.compile(model, backend="zerograph"), {"zero_optimization": {"stage": 1}})


def test_many_models_in_one_process_each_compile():
    """Each compiled model has a Dynamo cache of its own (its call frame's
    own code object): past torch._dynamo.config.recompile_limit models in one
    process, a new model still compiles instead of silently running eagerly."""
    import zerograph
    from tests._models import TinyMLP

    limit = torch._dynamo.config.recompile_limit
    models = [zerograph.compile(TinyMLP(), {}) for _ in range(limit + 2)]
    for model in models:
        model(torch.randn(2, 4)).backward()
    assert [len(zerograph.inspect(m).regions) for m in models] == [1] * len(models)


def test_compile_applies_the_derived_accumulation_steps(fake_world):
    """DeepSpeed's batch rule: train_batch_size 8 = micro 2 x accumulation x 2
    ranks, so the model accumulates 2 micro-batches per optimizer step (the
    plan and the runtime's config say so), as deepspeed.initialize would."""
    import zerograph
    from tests._models import TinyMLP

    model = zerograph.compile(TinyMLP(), {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2,
                                          "zero_optimization": {"stage": 2}})
    ctx = model._zg_runtime.ctx
    assert ctx.config.gradient_accumulation_steps == 2 and ctx.plan.accumulation == 2
