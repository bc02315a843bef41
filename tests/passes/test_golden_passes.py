"""Golden output of the ZeRO passes on a tiny MLP, traced in one process
with the fake process group (world size 2)."""

from __future__ import annotations

import logging

import torch
from expecttest import assert_expected_inline
from torch import nn

import zerograph
from tests._models import TinyMLP
from zerograph.graph.format import format_graph


UNBUCKETED = {"allgather_bucket_size": 0, "reduce_bucket_size": 0}


def _compiled_graphs(stage, bucketed=False, **compile_kwargs):
    torch.manual_seed(0)
    zero = {"stage": stage, **({} if bucketed else UNBUCKETED)}
    model = zerograph.compile(TinyMLP(), {"zero_optimization": zero, "zerograph": {"verify_graphs": True, "device": "cpu"}},
                              **compile_kwargs)
    model(torch.randn(5, 4)).backward()
    info = zerograph.inspect(model)
    assert len(info.forward) == 1 and len(info.backward) == 1
    return model, info


def test_stage3_forward_gathers_and_saves_only_shards(fake_world):
    _, info = _compiled_graphs(3)
    assert_expected_inline(format_graph(info.forward[0], canonical=True), """\
primals_1: f32[3, 4]
primals_2: f32[3]
primals_3: f32[5, 4]
primals_4: f32[2, 6]
all_gather_into_tensor_default: f32[6, 4] = _c10d_functional.all_gather_into_tensor(primals_1, 2, '0')  # all_gather fc1.weight
wait_tensor_default: f32[6, 4] = _c10d_functional.wait_tensor(all_gather_into_tensor_default)  # wait fc1.weight
all_gather_into_tensor_default_1: f32[6] = _c10d_functional.all_gather_into_tensor(primals_2, 2, '0')  # all_gather fc1.bias
wait_tensor_default_1: f32[6] = _c10d_functional.wait_tensor(all_gather_into_tensor_default_1)  # wait fc1.bias
all_gather_into_tensor_default_2: f32[4, 6] = _c10d_functional.all_gather_into_tensor(primals_4, 2, '0')  # all_gather fc2.weight
t: f32[4, 6] = aten.t(wait_tensor_default)
addmm: f32[5, 6] = aten.addmm(wait_tensor_default_1, primals_3, t)
relu: f32[5, 6] = aten.relu(addmm)
detach: f32[5, 6] = aten.detach(relu)
wait_tensor_default_2: f32[4, 6] = _c10d_functional.wait_tensor(all_gather_into_tensor_default_2)  # wait fc2.weight
slice_tensor: f32[3, 6] = aten.slice.Tensor(wait_tensor_default_2, 0, 0, 3)  # comm_prep fc2.weight
t_1: f32[6, 3] = aten.t(slice_tensor)
mm: f32[5, 3] = aten.mm(relu, t_1)
sum: f32[] = aten.sum(mm)
return [sum, primals_3, relu, detach, primals_4]""")


def test_stage3_backward_regathers_and_reduce_scatters(fake_world):
    _, info = _compiled_graphs(3)
    assert_expected_inline(format_graph(info.backward[0], canonical=True), """\
primals_1: f32[5, 4]
relu: f32[5, 6]
detach: f32[5, 6]
view: f32[2, 6]
tangents_1: f32[]
expand: f32[5, 3] = aten.expand(tangents_1, [5, 3])
t: f32[3, 5] = aten.t(expand)
mm: f32[3, 6] = aten.mm(t, relu)
t_1: f32[6, 3] = aten.t(mm)
all_gather_into_tensor_default: f32[4, 6] = _c10d_functional.all_gather_into_tensor(view, 2, '0')  # all_gather fc2.weight
wait_tensor_default: f32[4, 6] = _c10d_functional.wait_tensor(all_gather_into_tensor_default)  # wait fc2.weight
slice_tensor: f32[3, 6] = aten.slice.Tensor(wait_tensor_default, 0, 0, 3)  # comm_prep fc2.weight
t_2: f32[6, 3] = aten.t(slice_tensor)
t_3: f32[3, 6] = aten.t(t_2)
mm_1: f32[5, 6] = aten.mm(expand, t_3)
t_4: f32[3, 6] = aten.t(t_1)
constant_pad_nd_default: f32[4, 6] = aten.constant_pad_nd(t_4, [0, 0, 0, 1], 0.0)  # comm_prep fc2.weight
reduce_scatter_tensor_default: f32[2, 6] = _c10d_functional.reduce_scatter_tensor(constant_pad_nd_default, 'sum', 2, '0')  # reduce_scatter fc2.weight
detach_1: f32[5, 6] = aten.detach(detach)
threshold_backward: f32[5, 6] = aten.threshold_backward(mm_1, detach_1, 0)
t_5: f32[6, 5] = aten.t(threshold_backward)
mm_2: f32[6, 4] = aten.mm(t_5, primals_1)
t_6: f32[4, 6] = aten.t(mm_2)
sum: f32[1, 6] = aten.sum.dim_IntList(threshold_backward, [0], True)
view_1: f32[6] = aten.view(sum, [6])
t_7: f32[6, 4] = aten.t(t_6)
wait_tensor_default_1: f32[2, 6] = _c10d_functional.wait_tensor(reduce_scatter_tensor_default)  # wait fc2.weight
mul_tensor: f32[2, 6] = aten.mul_.Tensor(wait_tensor_default_1, 0.5)  # comm_prep fc2.weight
reduce_scatter_tensor_default_1: f32[3] = _c10d_functional.reduce_scatter_tensor(view_1, 'sum', 2, '0')  # reduce_scatter fc1.bias
wait_tensor_default_2: f32[3] = _c10d_functional.wait_tensor(reduce_scatter_tensor_default_1)  # wait fc1.bias
mul_tensor_1: f32[3] = aten.mul_.Tensor(wait_tensor_default_2, 0.5)  # comm_prep fc1.bias
reduce_scatter_tensor_default_2: f32[3, 4] = _c10d_functional.reduce_scatter_tensor(t_7, 'sum', 2, '0')  # reduce_scatter fc1.weight
wait_tensor_default_3: f32[3, 4] = _c10d_functional.wait_tensor(reduce_scatter_tensor_default_2)  # wait fc1.weight
mul_tensor_2: f32[3, 4] = aten.mul_.Tensor(wait_tensor_default_3, 0.5)  # comm_prep fc1.weight
return [mul_tensor_2, mul_tensor_1, None, mul_tensor]""")


def _reuse_graphs(distance):
    torch.manual_seed(0)
    zero = {"stage": 3, "stage3_max_reuse_distance": distance, **UNBUCKETED}
    model = zerograph.compile(TinyMLP(), {"zero_optimization": zero, "zerograph": {"verify_graphs": True, "device": "cpu"}})
    model(torch.randn(5, 4)).backward()
    info = zerograph.inspect(model)
    policy = next(r.details for r in info.passes if r.name == "zero_policy")
    return info, policy


def test_stage3_reuse_distance_zero_regathers_in_backward(fake_world):
    info, policy = _reuse_graphs(0)
    assert policy == {"must_recompute": 6}
    # the default (0): the same graphs as test_stage3_*: the backward gathers fc2.weight again
    assert info.memory.regions[0].comm_bytes == {"all_gather": 312, "reduce_scatter": 216, "all_reduce": 0}
    # Tensor inputs only: every DTensor parameter also brings its DeviceMesh in
    # as an opaque graph input (one object, three placeholders), and which of
    # those equal placeholders AOTAutograd binds the gradients' mesh to depends
    # on torch-internal state left by earlier compiles in the process.
    saved = [n.name for n in info.backward[0].graph.nodes
             if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.Tensor)]
    assert_expected_inline(" ".join(saved), """primals_5 relu detach view_2 tangents_1""")


def test_stage3_reuse_distance_infinite_keeps_last_layer(fake_world):
    info, policy = _reuse_graphs(10**9)
    # nothing is used between fc2.weight's forward use and its backward use: distance 0 < 1e9
    assert policy == {"must_recompute": 3, "kept": ["fc2.weight"], "kept_gather_elements": 24}
    assert info.memory.regions[0].comm_bytes == {"all_gather": 216, "reduce_scatter": 216, "all_reduce": 0}
    assert_expected_inline(format_graph(info.forward[0], canonical=True), """\
primals_1: f32[3, 4]
primals_2: f32[3]
primals_3: f32[5, 4]
primals_4: f32[2, 6]
all_gather_into_tensor_default: f32[6, 4] = _c10d_functional.all_gather_into_tensor(primals_1, 2, '0')  # all_gather fc1.weight
wait_tensor_default: f32[6, 4] = _c10d_functional.wait_tensor(all_gather_into_tensor_default)  # wait fc1.weight
all_gather_into_tensor_default_1: f32[6] = _c10d_functional.all_gather_into_tensor(primals_2, 2, '0')  # all_gather fc1.bias
wait_tensor_default_1: f32[6] = _c10d_functional.wait_tensor(all_gather_into_tensor_default_1)  # wait fc1.bias
all_gather_into_tensor_default_2: f32[4, 6] = _c10d_functional.all_gather_into_tensor(primals_4, 2, '0')  # all_gather fc2.weight
t: f32[4, 6] = aten.t(wait_tensor_default)
addmm: f32[5, 6] = aten.addmm(wait_tensor_default_1, primals_3, t)
relu: f32[5, 6] = aten.relu(addmm)
detach: f32[5, 6] = aten.detach(relu)
wait_tensor_default_2: f32[4, 6] = _c10d_functional.wait_tensor(all_gather_into_tensor_default_2)  # wait fc2.weight
slice_tensor: f32[3, 6] = aten.slice.Tensor(wait_tensor_default_2, 0, 0, 3)  # comm_prep fc2.weight
t_1: f32[6, 3] = aten.t(slice_tensor)
mm: f32[5, 3] = aten.mm(relu, t_1)
sum: f32[] = aten.sum(mm)
return [sum, primals_3, relu, detach, t_1]""")
    assert_expected_inline(format_graph(info.backward[0], canonical=True), """\
primals_1: f32[5, 4]
relu: f32[5, 6]
detach: f32[5, 6]
t: f32[6, 3]
tangents_1: f32[]
expand: f32[5, 3] = aten.expand(tangents_1, [5, 3])
t_1: f32[3, 5] = aten.t(expand)
mm: f32[3, 6] = aten.mm(t_1, relu)
t_2: f32[6, 3] = aten.t(mm)
t_3: f32[3, 6] = aten.t(t)
mm_1: f32[5, 6] = aten.mm(expand, t_3)
t_4: f32[3, 6] = aten.t(t_2)
constant_pad_nd_default: f32[4, 6] = aten.constant_pad_nd(t_4, [0, 0, 0, 1], 0.0)  # comm_prep fc2.weight
reduce_scatter_tensor_default: f32[2, 6] = _c10d_functional.reduce_scatter_tensor(constant_pad_nd_default, 'sum', 2, '0')  # reduce_scatter fc2.weight
detach_1: f32[5, 6] = aten.detach(detach)
threshold_backward: f32[5, 6] = aten.threshold_backward(mm_1, detach_1, 0)
t_5: f32[6, 5] = aten.t(threshold_backward)
mm_2: f32[6, 4] = aten.mm(t_5, primals_1)
t_6: f32[4, 6] = aten.t(mm_2)
sum: f32[1, 6] = aten.sum.dim_IntList(threshold_backward, [0], True)
view: f32[6] = aten.view(sum, [6])
t_7: f32[6, 4] = aten.t(t_6)
wait_tensor_default: f32[2, 6] = _c10d_functional.wait_tensor(reduce_scatter_tensor_default)  # wait fc2.weight
mul_tensor: f32[2, 6] = aten.mul_.Tensor(wait_tensor_default, 0.5)  # comm_prep fc2.weight
reduce_scatter_tensor_default_1: f32[3] = _c10d_functional.reduce_scatter_tensor(view, 'sum', 2, '0')  # reduce_scatter fc1.bias
wait_tensor_default_1: f32[3] = _c10d_functional.wait_tensor(reduce_scatter_tensor_default_1)  # wait fc1.bias
mul_tensor_1: f32[3] = aten.mul_.Tensor(wait_tensor_default_1, 0.5)  # comm_prep fc1.bias
reduce_scatter_tensor_default_2: f32[3, 4] = _c10d_functional.reduce_scatter_tensor(t_7, 'sum', 2, '0')  # reduce_scatter fc1.weight
wait_tensor_default_2: f32[3, 4] = _c10d_functional.wait_tensor(reduce_scatter_tensor_default_2)  # wait fc1.weight
mul_tensor_2: f32[3, 4] = aten.mul_.Tensor(wait_tensor_default_2, 0.5)  # comm_prep fc1.weight
return [mul_tensor_2, mul_tensor_1, None, mul_tensor]""")


def test_stage2_keeps_gathered_parameters_for_backward(fake_world):
    _, info = _compiled_graphs(2)
    assert_expected_inline(format_graph(info.backward[0], canonical=True), """\
primals_1: f32[5, 4]
relu: f32[5, 6]
detach: f32[5, 6]
t: f32[6, 3]
tangents_1: f32[]
expand: f32[5, 3] = aten.expand(tangents_1, [5, 3])
t_1: f32[3, 5] = aten.t(expand)
mm: f32[3, 6] = aten.mm(t_1, relu)
t_2: f32[6, 3] = aten.t(mm)
t_3: f32[3, 6] = aten.t(t)
mm_1: f32[5, 6] = aten.mm(expand, t_3)
t_4: f32[3, 6] = aten.t(t_2)
constant_pad_nd_default: f32[4, 6] = aten.constant_pad_nd(t_4, [0, 0, 0, 1], 0.0)  # comm_prep fc2.weight
reduce_scatter_tensor_default: f32[2, 6] = _c10d_functional.reduce_scatter_tensor(constant_pad_nd_default, 'sum', 2, '0')  # reduce_scatter fc2.weight
detach_1: f32[5, 6] = aten.detach(detach)
threshold_backward: f32[5, 6] = aten.threshold_backward(mm_1, detach_1, 0)
t_5: f32[6, 5] = aten.t(threshold_backward)
mm_2: f32[6, 4] = aten.mm(t_5, primals_1)
t_6: f32[4, 6] = aten.t(mm_2)
sum: f32[1, 6] = aten.sum.dim_IntList(threshold_backward, [0], True)
view: f32[6] = aten.view(sum, [6])
t_7: f32[6, 4] = aten.t(t_6)
wait_tensor_default: f32[2, 6] = _c10d_functional.wait_tensor(reduce_scatter_tensor_default)  # wait fc2.weight
mul_tensor: f32[2, 6] = aten.mul_.Tensor(wait_tensor_default, 0.5)  # comm_prep fc2.weight
reduce_scatter_tensor_default_1: f32[3] = _c10d_functional.reduce_scatter_tensor(view, 'sum', 2, '0')  # reduce_scatter fc1.bias
wait_tensor_default_1: f32[3] = _c10d_functional.wait_tensor(reduce_scatter_tensor_default_1)  # wait fc1.bias
mul_tensor_1: f32[3] = aten.mul_.Tensor(wait_tensor_default_1, 0.5)  # comm_prep fc1.bias
reduce_scatter_tensor_default_2: f32[3, 4] = _c10d_functional.reduce_scatter_tensor(t_7, 'sum', 2, '0')  # reduce_scatter fc1.weight
wait_tensor_default_2: f32[3, 4] = _c10d_functional.wait_tensor(reduce_scatter_tensor_default_2)  # wait fc1.weight
mul_tensor_2: f32[3, 4] = aten.mul_.Tensor(wait_tensor_default_2, 0.5)  # comm_prep fc1.weight
return [mul_tensor_2, mul_tensor_1, None, mul_tensor]""")


def test_stage3_bucketed_forward_gathers_one_module_at_once(fake_world):
    _, info = _compiled_graphs(3, bucketed=True)
    assert_expected_inline(format_graph(info.forward[0], canonical=True), """\
primals_1: f32[3, 4]
primals_2: f32[3]
primals_3: f32[5, 4]
primals_4: f32[2, 6]
view_default: f32[12] = aten.view(primals_1, [12])  # comm_prep fc1.weight,fc1.bias
view_default_1: f32[3] = aten.view(primals_2, [3])  # comm_prep fc1.weight,fc1.bias
cat_default: f32[15] = aten.cat([view_default, view_default_1])  # comm_prep fc1.weight,fc1.bias
all_gather_into_tensor_default: f32[30] = _c10d_functional.all_gather_into_tensor(cat_default, 2, '0')  # all_gather fc1.weight,fc1.bias
wait_tensor_default: f32[30] = _c10d_functional.wait_tensor(all_gather_into_tensor_default)  # wait fc1.weight,fc1.bias
view_default_2: f32[2, 15] = aten.view(wait_tensor_default, [2, 15])  # comm_prep fc1.weight,fc1.bias
slice_tensor: f32[2, 12] = aten.slice.Tensor(view_default_2, 1, 0, 12)  # comm_prep fc1.weight,fc1.bias
clone_default: f32[2, 12] = aten.clone(slice_tensor, memory_format=torch.contiguous_format)  # comm_prep fc1.weight,fc1.bias
view_default_3: f32[6, 4] = aten.view(clone_default, [6, 4])  # comm_prep fc1.weight,fc1.bias
slice_tensor_1: f32[2, 3] = aten.slice.Tensor(view_default_2, 1, 12, 15)  # comm_prep fc1.weight,fc1.bias
clone_default_1: f32[2, 3] = aten.clone(slice_tensor_1, memory_format=torch.contiguous_format)  # comm_prep fc1.weight,fc1.bias
view_default_4: f32[6] = aten.view(clone_default_1, [6])  # comm_prep fc1.weight,fc1.bias
all_gather_into_tensor_default_1: f32[4, 6] = _c10d_functional.all_gather_into_tensor(primals_4, 2, '0')  # all_gather fc2.weight
t: f32[4, 6] = aten.t(view_default_3)
addmm: f32[5, 6] = aten.addmm(view_default_4, primals_3, t)
relu: f32[5, 6] = aten.relu(addmm)
detach: f32[5, 6] = aten.detach(relu)
wait_tensor_default_1: f32[4, 6] = _c10d_functional.wait_tensor(all_gather_into_tensor_default_1)  # wait fc2.weight
slice_tensor_2: f32[3, 6] = aten.slice.Tensor(wait_tensor_default_1, 0, 0, 3)  # comm_prep fc2.weight
t_1: f32[6, 3] = aten.t(slice_tensor_2)
mm: f32[5, 3] = aten.mm(relu, t_1)
sum: f32[] = aten.sum(mm)
return [sum, primals_3, relu, detach, primals_4]""")


def test_stage3_bucketed_backward_reduce_scatters_one_module_at_once(fake_world):
    _, info = _compiled_graphs(3, bucketed=True)
    assert_expected_inline(format_graph(info.backward[0], canonical=True), """\
primals_1: f32[5, 4]
relu: f32[5, 6]
detach: f32[5, 6]
view: f32[2, 6]
tangents_1: f32[]
expand: f32[5, 3] = aten.expand(tangents_1, [5, 3])
t: f32[3, 5] = aten.t(expand)
mm: f32[3, 6] = aten.mm(t, relu)
t_1: f32[6, 3] = aten.t(mm)
all_gather_into_tensor_default: f32[4, 6] = _c10d_functional.all_gather_into_tensor(view, 2, '0')  # all_gather fc2.weight
wait_tensor_default: f32[4, 6] = _c10d_functional.wait_tensor(all_gather_into_tensor_default)  # wait fc2.weight
slice_tensor: f32[3, 6] = aten.slice.Tensor(wait_tensor_default, 0, 0, 3)  # comm_prep fc2.weight
t_2: f32[6, 3] = aten.t(slice_tensor)
t_3: f32[3, 6] = aten.t(t_2)
mm_1: f32[5, 6] = aten.mm(expand, t_3)
t_4: f32[3, 6] = aten.t(t_1)
constant_pad_nd_default: f32[4, 6] = aten.constant_pad_nd(t_4, [0, 0, 0, 1], 0.0)  # comm_prep fc2.weight
reduce_scatter_tensor_default: f32[2, 6] = _c10d_functional.reduce_scatter_tensor(constant_pad_nd_default, 'sum', 2, '0')  # reduce_scatter fc2.weight
detach_1: f32[5, 6] = aten.detach(detach)
threshold_backward: f32[5, 6] = aten.threshold_backward(mm_1, detach_1, 0)
t_5: f32[6, 5] = aten.t(threshold_backward)
mm_2: f32[6, 4] = aten.mm(t_5, primals_1)
t_6: f32[4, 6] = aten.t(mm_2)
sum: f32[1, 6] = aten.sum.dim_IntList(threshold_backward, [0], True)
view_1: f32[6] = aten.view(sum, [6])
t_7: f32[6, 4] = aten.t(t_6)
view_default: f32[2, 3] = aten.view(view_1, [2, 3])  # comm_prep fc1.bias,fc1.weight
view_default_1: f32[2, 12] = aten.view(t_7, [2, 12])  # comm_prep fc1.bias,fc1.weight
cat_default: f32[2, 15] = aten.cat([view_default, view_default_1], 1)  # comm_prep fc1.bias,fc1.weight
view_default_2: f32[30] = aten.view(cat_default, [30])  # comm_prep fc1.bias,fc1.weight
wait_tensor_default_1: f32[2, 6] = _c10d_functional.wait_tensor(reduce_scatter_tensor_default)  # wait fc2.weight
mul_tensor: f32[2, 6] = aten.mul_.Tensor(wait_tensor_default_1, 0.5)  # comm_prep fc2.weight
reduce_scatter_tensor_default_1: f32[15] = _c10d_functional.reduce_scatter_tensor(view_default_2, 'sum', 2, '0')  # reduce_scatter fc1.bias,fc1.weight
wait_tensor_default_2: f32[15] = _c10d_functional.wait_tensor(reduce_scatter_tensor_default_1)  # wait fc1.bias,fc1.weight
mul_tensor_1: f32[15] = aten.mul_.Tensor(wait_tensor_default_2, 0.5)  # comm_prep fc1.bias,fc1.weight
slice_tensor_1: f32[3] = aten.slice.Tensor(mul_tensor_1, 0, 0, 3)  # comm_prep fc1.bias,fc1.weight
view_default_3: f32[3] = aten.view(slice_tensor_1, [3])  # comm_prep fc1.bias,fc1.weight
slice_tensor_2: f32[12] = aten.slice.Tensor(mul_tensor_1, 0, 3, 15)  # comm_prep fc1.bias,fc1.weight
view_default_4: f32[3, 4] = aten.view(slice_tensor_2, [3, 4])  # comm_prep fc1.bias,fc1.weight
return [view_default_4, view_default_3, None, mul_tensor]""")


def test_custom_pass_inserted_after_builtin_runs_on_lowered_graph(fake_world):
    seen = []

    def count_waits(gm, ctx):
        waits = [n for n in gm.graph.nodes if getattr(n.target, "__name__", "").startswith("wait_tensor")]
        seen.append((ctx.phase, len(waits)))
        return zerograph.PassResult(details={"waits": len(waits)})

    passes = zerograph.default_passes().insert_after(
        "lower_markers", zerograph.GraphPass("count_waits", count_waits, phases=("forward", "backward"))
    )
    _, info = _compiled_graphs(3, passes=passes)
    assert seen == [("forward", 3), ("backward", 4)]
    names = [(r.phase, r.name) for r in info.passes]
    assert names.index(("forward", "count_waits")) == names.index(("forward", "lower_markers")) + 1
    record = next(r for r in info.passes if r.name == "count_waits" and r.phase == "backward")
    assert record.details == {"waits": 4}


def test_disabling_lowering_leaves_markers_visible(fake_world):
    passes = zerograph.default_passes().disable("lower_markers")
    _, info = _compiled_graphs(3, passes=passes)
    text = format_graph(info.forward[0], canonical=True)
    # the markers stay single nodes (their eager implementations communicate)
    assert text.count("= zerograph.unshard(") == 3 and "all_gather" not in text


def test_debug_mode_logs_pass_times_and_node_diffs(fake_world, caplog):
    torch.manual_seed(0)
    with caplog.at_level(logging.INFO, logger="zerograph.passes.manager"):
        model = zerograph.compile(TinyMLP(), {"zero_optimization": {"stage": 3}, "zerograph": {"debug": True}})
        model(torch.randn(5, 4)).backward()
    text = caplog.text
    assert "lower_markers" in text and " ms " in text
    assert "+ all_gather_into_tensor_default=call_function:all_gather_into_tensor.default" in text
    assert "- unshard=call_function:unshard.default" in text


class TiedEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        return self.head(self.emb(idx)).sum()


def test_tied_parameter_is_gathered_and_reduced_once(fake_world):
    from zerograph.graph.tags import get_tag

    model = zerograph.compile(TiedEmbedding(), {"zero_optimization": {"stage": 3}})
    model(torch.tensor([[1, 2, 3]])).backward()
    info = zerograph.inspect(model)

    def count(graphs, role):
        return sum(
            1 for g in graphs for n in g.graph.nodes
            if (t := get_tag(n)) is not None and t.role == role and "emb.weight" in (t.param, *t.bucket)
        )

    assert count(info.forward, "all_gather") == 1
    assert count(info.backward, "reduce_scatter") == 1
    dedupe = next(r for r in info.passes if r.name == "dedupe_markers")
    assert dedupe.details == {"removed": 1}


def _functional_backward(stage):
    """The bucketed backward graph with every pass but reuse_comm_buffers, and the model's config."""
    passes = zerograph.default_passes().disable("reuse_comm_buffers")
    model, info = _compiled_graphs(stage, bucketed=True, passes=passes)
    return info.backward[0], zerograph.inspect(model)


def _in_place_targets(gm):
    return sorted(str(n.target) for n in gm.graph.nodes if str(n.target).endswith("_.default") or
                  str(n.target).endswith("_.Tensor"))


def test_stage1_bucketed_all_reduce_and_average_run_in_place(fake_world):
    _, info = _compiled_graphs(1, bucketed=True)
    text = format_graph(info.backward[0], canonical=True)
    tail = text[text.index("cat_default"):]
    assert_expected_inline(tail, """\
cat_default: f32[30] = aten.cat([view_default, view_default_1])  # comm_prep fc1.bias,fc1.weight
wait_tensor_default: f32[3, 6] = _c10d_functional.wait_tensor(all_reduce_default)  # wait fc2.weight
slice_tensor: f32[2, 6] = aten.slice.Tensor(wait_tensor_default, 0, 0, 2)  # comm_prep fc2.weight
mul_tensor: f32[2, 6] = aten.mul_.Tensor(slice_tensor, 0.5)  # comm_prep fc2.weight
all_reduce_default_1: f32[30] = _c10d_functional.all_reduce_(cat_default, 'sum', '0')  # all_reduce fc1.bias,fc1.weight
wait_tensor_default_1: f32[30] = _c10d_functional.wait_tensor(all_reduce_default_1)  # wait fc1.bias,fc1.weight
mul_tensor_1: f32[30] = aten.mul_.Tensor(wait_tensor_default_1, 0.5)  # comm_prep fc1.bias,fc1.weight
slice_tensor_1: f32[6] = aten.slice.Tensor(mul_tensor_1, 0, 0, 6)  # comm_prep fc1.bias,fc1.weight
view_default_2: f32[6] = aten.view(slice_tensor_1, [6])  # comm_prep fc1.bias,fc1.weight
slice_tensor_2: f32[3] = aten.slice.Tensor(view_default_2, 0, 0, 3)  # comm_prep fc1.bias,fc1.weight
slice_tensor_3: f32[24] = aten.slice.Tensor(mul_tensor_1, 0, 6, 30)  # comm_prep fc1.bias,fc1.weight
view_default_3: f32[6, 4] = aten.view(slice_tensor_3, [6, 4])  # comm_prep fc1.bias,fc1.weight
slice_tensor_4: f32[3, 4] = aten.slice.Tensor(view_default_3, 0, 0, 3)  # comm_prep fc1.bias,fc1.weight
return [slice_tensor_4, slice_tensor_2, None, mul_tensor]""")
    record = next(r for r in info.passes if r.name == "reuse_comm_buffers" and r.phase == "backward")
    assert record.details == {"in_place": ["all_reduce_default", "mul_tensor", "all_reduce_default_1", "mul_tensor_1"]}
    # the planner sees the in-place results as the buckets' storage: no second bucket-sized buffer
    assert record.nodes_after == record.nodes_before


def test_reuse_comm_buffers_leaves_buffers_with_other_readers_and_inductor_graphs(fake_world):
    from zerograph.config import Config
    from zerograph.passes.reuse_comm_buffers import reuse_comm_buffers
    from zerograph.passes.manager import PassContext

    gm, _ = _functional_backward(1)
    assert _in_place_targets(gm) == []
    eager = Config.load({"zero_optimization": {"stage": 1}})
    inductor = Config.load({"zero_optimization": {"stage": 1}, "zerograph": {"compiler": "inductor"}})
    assert not reuse_comm_buffers(gm, PassContext("backward", None, inductor)).changed
    # a second reader of the first bucket's buffer, after the all-reduce, keeps that all-reduce functional
    cat = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.cat.default)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(output):
        extra = gm.graph.call_function(torch.ops.aten.sum.default, (cat,))
    output.args = (list(output.args[0]) + [extra],)
    (kept,) = [u for u in cat.users if u is not extra]
    result = reuse_comm_buffers(gm, PassContext("backward", None, eager))
    assert kept.target is torch.ops._c10d_functional.all_reduce.default  # still functional
    assert len(result.details["in_place"]) == 3 and kept.name not in result.details["in_place"]
    assert _in_place_targets(gm) == ["_c10d_functional.all_reduce_.default", "aten.mul_.Tensor", "aten.mul_.Tensor"]
