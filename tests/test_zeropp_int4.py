"""ZeRO++ with int4 codes (zerograph.zeropp_weight_bits / zeropp_gradient_bits
4, docs/zeropp.md): the passes' graphs and bytes on the fake process group,
the config errors, and training against the fp32 ZeRO-3 run (gloo). The
int4 reduction's error bound is tested with int8's on gloo
(tests/test_zeropp_quantized.py), the kernels in
tests/kernels/test_quantize_int4.py."""

from __future__ import annotations

import pytest
import torch
from expecttest import assert_expected_inline

from tests import _harness, _models
from tests.test_zeropp_quantized import _chunk, _config, _graphs, _lines, _relative_gap
from zerograph.kernels.quantize_int4 import dequantize_int4_reference, packed_bytes, quantize_int4_reference

TIMEOUT = _harness.TIMEOUT
BLOCK = 256


def test_qgz_int4_golden_graph_and_bytes(fake_world):
    """fc2.weight's gradient (3x6 padded to 4 rows on 2 ranks: m = 12 elements
    per rank) goes in one all-to-all of 2 parts of 6 packed bytes + one fp32
    scale each; every gradient's bytes are W * (ceil(m/2) + 4 * ceil(m/256))."""
    model, info, fmt = _graphs({"stage": 2, "zero_quantized_gradients": True}, zeropp_gradient_bits=4)
    assert_expected_inline(_lines(fmt(info.backward[0]), "fc2.weight"), """\
constant_pad_nd_default: f32[4, 6] = aten.constant_pad_nd(t_4, [0, 0, 0, 1], 0.0)  # comm_prep fc2.weight
view_default: f32[2, 1, 12] = aten.view(constant_pad_nd_default, [2, 1, 12])  # comm_prep fc2.weight
view_default_1: f32[2, 12] = aten.view(view_default, [2, 12])  # comm_prep fc2.weight
quantize_int4_default:  = zerograph.quantize_int4(view_default_1, 256)  # comm_prep fc2.weight
getitem: int8[2, 6] = getitem(quantize_int4_default, 0)  # comm_prep fc2.weight
getitem_1: f32[2, 1] = getitem(quantize_int4_default, 1)  # comm_prep fc2.weight
view_default_2: int8[2, 6] = aten.view(getitem, [2, 6])  # comm_prep fc2.weight
view_dtype: int8[2, 4] = aten.view.dtype(getitem_1, int8)  # comm_prep fc2.weight
view_default_3: int8[2, 4] = aten.view(view_dtype, [2, 4])  # comm_prep fc2.weight
cat_default: int8[2, 10] = aten.cat([view_default_2, view_default_3], 1)  # comm_prep fc2.weight
view_default_4: int8[20] = aten.view(cat_default, [20])  # comm_prep fc2.weight
all_to_all_single_default: int8[20] = _c10d_functional.all_to_all_single(view_default_4, [10, 10], [10, 10], '0')  # all_to_all fc2.weight
wait_tensor_default: int8[20] = _c10d_functional.wait_tensor(all_to_all_single_default)  # wait fc2.weight
view_default_5: int8[2, 10] = aten.view(wait_tensor_default, [2, 10])  # comm_prep fc2.weight
slice_tensor: int8[2, 6] = aten.slice.Tensor(view_default_5, 1, 0, 6)  # comm_prep fc2.weight
slice_tensor_1: int8[2, 4] = aten.slice.Tensor(view_default_5, 1, 6, 10)  # comm_prep fc2.weight
clone_default: int8[2, 4] = aten.clone(slice_tensor_1, memory_format=torch.contiguous_format)  # comm_prep fc2.weight
view_dtype_1: f32[2, 1] = aten.view.dtype(clone_default, float32)  # comm_prep fc2.weight
view_default_6: int8[2, 1, 6] = aten.view(slice_tensor, [2, 1, 6])  # comm_prep fc2.weight
view_default_7: f32[2, 1, 1] = aten.view(view_dtype_1, [2, 1, 1])  # comm_prep fc2.weight
dequantize_int4_default: f32[2, 1, 12] = zerograph.dequantize_int4(view_default_6, view_default_7, 256, 12, float32)  # comm_prep fc2.weight
sum_dim_int_list: f32[1, 12] = aten.sum.dim_IntList(dequantize_int4_default, [0])  # comm_prep fc2.weight
view_default_8: f32[2, 6] = aten.view(sum_dim_int_list, [2, 6])  # comm_prep fc2.weight
mul_tensor: f32[2, 6] = aten.mul_.Tensor(view_default_8, 0.5)  # comm_prep fc2.weight""")
    params = dict(model.named_parameters())
    expected = sum(2 * packed_bytes(_chunk(p, 2), BLOCK) for p in params.values())
    assert expected == sum(2 * ((_chunk(p, 2) + 1) // 2 + 4) for p in params.values())  # one block each
    assert info.regions[0]["comm_bytes"]["backward"]["all_to_all"] == expected
    assert "reduce_scatter" not in info.regions[0]["comm_bytes"]["backward"]


def test_qwz_int4_gathers_packed_bytes(fake_world):
    """qwZ with int4: fc2.weight's 12-element shard is 6 packed bytes + one
    scale per rank; the forward gathers W * (ceil(n/2) + 4 * ceil(n/256))."""
    model, info, fmt = _graphs({"zero_quantized_weights": True}, zeropp_weight_bits=4)
    lines = _lines(fmt(info.forward[0]), "fc2.weight")
    assert "zerograph.quantize_int4(view_default_12, 256)" in lines
    assert "int8[20] = _c10d_functional.all_gather_into_tensor(view_default_15, 2, '0')" in lines
    assert "f32[2, 12] = zerograph.dequantize_int4(slice_tensor_4, view_dtype_5, 256, 12, float32)" in lines
    params = dict(model.named_parameters())
    assert info.regions[0]["comm_bytes"]["forward"] == {
        "all_gather": sum(2 * packed_bytes(_chunk(p, 2), BLOCK) for p in params.values())}


def test_bits_config_errors_name_the_allowed_values():
    from zerograph.config import Config, ConfigError

    with pytest.raises(ConfigError, match="zerograph.zeropp_gradient_bits: got 2; allowed: 8, 4"):
        Config.load({"zerograph": {"zeropp_gradient_bits": 2}})
    with pytest.raises(ConfigError, match="zerograph.zeropp_weight_bits: got 16; allowed: 8, 4"):
        Config.load({"zerograph": {"zeropp_weight_bits": 16}})
    from zerograph.runtime.plan import ParallelPlan

    cfg = Config.load({"zero_optimization": {"stage": 3, "zero_quantized_gradients": True},
                       "zerograph": {"zeropp_gradient_bits": 4}})
    plan = ParallelPlan.build(cfg, {"dp": 2}).zero.zeropp
    assert (plan.grad_bits, plan.weight_bits) == (4, 8)


# --------------------------------------------------------------------------- training (gloo)

STEPS = 5


def _int4_weights(model, world: int) -> dict[str, torch.Tensor]:
    """Each parameter as qwZ's int4 forward gather returns it."""
    out = {}
    for name, p in model.named_parameters():
        rows = p.shape[0]
        c = -(-rows // world)
        full = torch.nn.functional.pad(p.detach().reshape(rows, -1), (0, 0, 0, world * c - rows))
        n = full.numel() // world
        q, s = quantize_int4_reference(full.reshape(world, n), BLOCK)
        out[name] = dequantize_int4_reference(q, s, BLOCK, n, torch.float32).reshape(full.shape)[:rows].reshape(
            p.shape)
    return out


@pytest.mark.timeout(TIMEOUT + 30)
def test_int4_qgz_and_qwz_train_against_fp32():
    """World 2, 5 AdamW steps of the nanoGPT test model. qgZ int4 (stage 2, one
    hop) and qwZ int4 (stage 3). Derived: qwZ's step-0 loss is the eager loss
    at the int4-dequantized weights (rtol 1e-5); qgZ's step-0 forward is exact.
    Stated: losses within 3e-3 (relative) and each parameter within 50% of
    the fp32 run's update over 5 steps (measured: qgZ int4 1.1e-3 / 34%, qwZ
    int4 8.7e-4 / 32%; int8: 1e-4 / 4%, 6e-5 / 2.6%: AdamW's normalized
    update magnifies the error of small gradient entries; the 200-step
    benchmark is where int4 is judged, docs/zeropp.md). Bytes:
    W * (ceil(m/2) + 4 * ceil(m/256)) per gradient / gather."""
    world = 2
    ref_losses, ref_params = _harness.reference_run("gpt_untied", world)
    configs = [_config({"stage": 2, "zero_quantized_gradients": True}, zeropp_gradient_bits=4),
               _config({"zero_quantized_weights": True}, zeropp_weight_bits=4)]
    qgz, qwz = _harness.train("gpt_untied", configs, STEPS, world)[0]
    model = _models.make_gpt_untied()
    idx, targets = _models.global_batch(0, _harness.PER_RANK_BATCH * world)
    step0 = torch.func.functional_call(model, _int4_weights(model, world), (idx, targets)).loss
    assert qwz["losses"][0] == pytest.approx(float(step0), rel=1e-5)
    assert qgz["losses"][0] == pytest.approx(ref_losses[0], rel=1e-5)
    gaps = {name: _relative_gap(r, ref_losses, ref_params) for name, r in (("qgz", qgz), ("qwz", qwz))}
    assert all(loss < 3e-3 and param < 0.5 for loss, param in gaps.values()), gaps
    packed = sum(world * packed_bytes(_chunk(p, world), BLOCK) for p in model.parameters())
    assert qgz["comm_by_scope"]["cross_group"]["all_to_all"] == packed
    assert qwz["comm_by_phase"]["forward"] == {"all_gather": packed}


@pytest.mark.slow
@pytest.mark.timeout(3 * TIMEOUT)
def test_200_steps_end_within_one_percent_of_fp32_zero3():
    """The issue's convergence claim, on the benchmark's run (benchmarks/
    bench_zeropp.py defaults: world 4, nodes of 2, a byte-level GPT on the
    demo corpus, 200 AdamW steps at lr 1e-3, validation on 32 held-out
    batches): all three techniques with int8, and with int4 everywhere plus
    error feedback, end within 1% of ZeRO-3's fp32 validation loss (measured
    2.3801 fp32, 2.3835 int8 all three, 2.3923 int4 with feedback;
    docs/benchmarks.md). New processes: ZeRO++ node groups at world 4."""
    from benchmarks.bench_zeropp import rank_main
    from zerograph.runtime.launch import spawn

    args = {"systems": ["zero3", "all three", "all three int4 EF"], "steps": 200, "warmup": 5, "n_layer": 2,
            "n_head": 4, "n_embd": 64, "block_size": 64, "batch": 16, "lr": 1e-3, "eval_batches": 32, "seed": 0,
            "node": 2}
    rows = spawn(rank_main, 4, args, timeout=3 * TIMEOUT - 30)[0]
    base = rows[0]["val_loss"]
    for row in rows[1:]:
        assert abs(row["val_loss"] / base - 1) < 0.01, (row["system"], row["val_loss"], base)
        assert row["val_loss"] != base  # the quantization shows
