"""ZeRO++ qwZ and qgZ (docs/zeropp.md): the passes' graphs and bytes on the
fake process group, the quantized reduce-scatter's error bound on real gloo
ranks, and training against the fp32 ZeRO-3 run (real gloo, worlds 2 and 4)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from expecttest import assert_expected_inline

import zerograph
from tests import _harness, _models, _pool
from tests._models import TinyMLP
from zerograph.graph.format import format_graph
from zerograph.kernels.quantize_int8 import dequantize_int8_reference, num_blocks, quantize_int8_reference

TIMEOUT = _harness.TIMEOUT
BLOCK = 256  # zerograph.zeropp_block_size's default


def _config(world_zero: dict | None = None, **own):
    return {"zero_optimization": {"stage": 3, "allgather_bucket_size": 0, "reduce_bucket_size": 0,
                                  **(world_zero or {})},
            "zerograph": {"verify_graphs": True, **own}}


def _packed(n: int, block: int = BLOCK) -> int:
    """Bytes of one rank's quantized part of ``n`` elements: int8 values and fp32 scales."""
    return n + 4 * num_blocks(n, block)


def _chunk(p, ranks: int) -> int:
    """Elements of one rank's padded shard of ``p`` (rows padded to a multiple of ``ranks``)."""
    return -(-p.shape[0] // ranks) * (p.numel() // p.shape[0])


# --------------------------------------------------------------------------- graphs (fake process group)


@pytest.fixture
def fake_world4():
    """Rank 1 of a four-rank fake process group (rank 1: index 1 of node 0 with nodes of 2)."""
    from zerograph._torch_private import fake_store

    dist.init_process_group("fake", store=fake_store(), rank=1, world_size=4)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    dist.destroy_process_group()


def _graphs(zero: dict, **own):
    torch.manual_seed(0)
    config = _config(zero, device="cpu", **own)
    model = zerograph.compile(TinyMLP(), config)
    model(torch.randn(5, 4)).backward()
    info = zerograph.inspect(model)
    groups = zerograph.api.context_of(model).node_groups

    def fmt(gm):
        text = format_graph(gm, canonical=True)
        if groups is not None:
            text = text.replace(repr(groups.node.group_name), "'<node>'").replace(
                repr(groups.peer.group_name), "'<peer>'")
        return text

    return model, info, fmt


def _lines(text: str, param: str) -> str:
    return "\n".join(line for line in text.splitlines() if line.endswith(f"# comm_prep {param}")
                     or line.endswith(f"all_gather {param}") or line.endswith(f"wait {param}")
                     or line.endswith(f"all_to_all {param}"))


def test_qwz_golden_graph_and_bytes(fake_world):
    """The forward's gather of fc2.weight (3x6 on 2 ranks: 2 padded rows =
    12 elements per rank, one block) sends 12 int8 values + one fp32 scale
    per rank; the backward's re-gather stays fp32. Bytes are the formula
    W * (n + 4 * ceil(n / block)) per gather."""
    model, info, fmt = _graphs({"zero_quantized_weights": True})
    assert_expected_inline(_lines(fmt(info.forward[0]), "fc2.weight"), """\
view_default_12: f32[1, 12] = aten.view(primals_4, [1, 12])  # comm_prep fc2.weight
quantize_int8_default_2:  = zerograph.quantize_int8(view_default_12, 256)  # comm_prep fc2.weight
getitem_4: int8[1, 12] = getitem(quantize_int8_default_2, 0)  # comm_prep fc2.weight
view_default_13: int8[1, 12] = aten.view(getitem_4, [1, 12])  # comm_prep fc2.weight
getitem_5: f32[1, 1] = getitem(quantize_int8_default_2, 1)  # comm_prep fc2.weight
view_dtype_4: int8[1, 4] = aten.view.dtype(getitem_5, int8)  # comm_prep fc2.weight
view_default_14: int8[1, 4] = aten.view(view_dtype_4, [1, 4])  # comm_prep fc2.weight
cat_default_2: int8[1, 16] = aten.cat([view_default_13, view_default_14], 1)  # comm_prep fc2.weight
view_default_15: int8[16] = aten.view(cat_default_2, [16])  # comm_prep fc2.weight
all_gather_into_tensor_default_2: int8[32] = _c10d_functional.all_gather_into_tensor(view_default_15, 2, '0')  # all_gather fc2.weight
wait_tensor_default_2: int8[32] = _c10d_functional.wait_tensor(all_gather_into_tensor_default_2)  # wait fc2.weight
view_default_16: int8[2, 16] = aten.view(wait_tensor_default_2, [2, 16])  # comm_prep fc2.weight
slice_tensor_4: int8[2, 12] = aten.slice.Tensor(view_default_16, 1, 0, 12)  # comm_prep fc2.weight
slice_tensor_5: int8[2, 4] = aten.slice.Tensor(view_default_16, 1, 12, 16)  # comm_prep fc2.weight
clone_default_2: int8[2, 4] = aten.clone(slice_tensor_5, memory_format=torch.contiguous_format)  # comm_prep fc2.weight
view_dtype_5: f32[2, 1] = aten.view.dtype(clone_default_2, float32)  # comm_prep fc2.weight
dequantize_int8_default_2: f32[2, 12] = zerograph.dequantize_int8(slice_tensor_4, view_dtype_5, 256, float32)  # comm_prep fc2.weight
view_default_17: f32[4, 6] = aten.view(dequantize_int8_default_2, [4, 6])  # comm_prep fc2.weight
slice_tensor_6: f32[3, 6] = aten.slice.Tensor(view_default_17, 0, 0, 3)  # comm_prep fc2.weight""")
    assert "zerograph.quantize_int8(view_default_12, 256)" in fmt(info.forward[0])
    backward = fmt(info.backward[0])
    assert "quantize" not in backward and "f32[4, 6] = _c10d_functional.all_gather_into_tensor" in backward
    params = dict(model.named_parameters())
    expected = sum(2 * _packed(_chunk(p, 2)) for p in params.values())
    records = {(r.phase, r.name): r for r in info.passes}
    assert records[("forward", "quantize_weight_gathers")].details == {
        "quantized": ["fc1.weight", "fc1.bias", "fc2.weight"], "collectives": 3,
        "bytes_before": 4 * sum(2 * _chunk(p, 2) for p in params.values()), "bytes_after": expected}
    assert ("backward", "quantize_weight_gathers") not in records
    assert info.regions[0]["comm_bytes"]["forward"] == {"all_gather": expected}


def test_qgz_golden_graph_two_hops_and_bytes(fake_world4):
    """fc2.weight's gradient (3x6 padded to 4 rows on 4 ranks: m = 6 elements
    per rank) goes inside the node (k = 2: 2 parts of P = 2 rows) and then
    across nodes (P = 2 parts of one row), each part int8 + one scale per
    row; the sums are fp32. Bytes: intra W * (m + 4nb), cross P * (m + 4nb)."""
    model, info, fmt = _graphs({"zero_quantized_gradients": True}, ranks_per_node=2)
    assert_expected_inline(_lines(fmt(info.backward[0]), "fc2.weight"), """\
all_gather_into_tensor_default: f32[4, 6] = _c10d_functional.all_gather_into_tensor(view, 4, '0')  # all_gather fc2.weight
wait_tensor_default: f32[4, 6] = _c10d_functional.wait_tensor(all_gather_into_tensor_default)  # wait fc2.weight
slice_tensor: f32[3, 6] = aten.slice.Tensor(wait_tensor_default, 0, 0, 3)  # comm_prep fc2.weight
constant_pad_nd_default: f32[4, 6] = aten.constant_pad_nd(t_4, [0, 0, 0, 1], 0.0)  # comm_prep fc2.weight
view_default: f32[2, 2, 6] = aten.view(constant_pad_nd_default, [2, 2, 6])  # comm_prep fc2.weight
permute_default: f32[2, 2, 6] = aten.permute(view_default, [1, 0, 2])  # comm_prep fc2.weight
clone_default: f32[2, 2, 6] = aten.clone(permute_default, memory_format=torch.contiguous_format)  # comm_prep fc2.weight
view_default_1: f32[4, 6] = aten.view(clone_default, [4, 6])  # comm_prep fc2.weight
quantize_int8_default:  = zerograph.quantize_int8(view_default_1, 256)  # comm_prep fc2.weight
getitem: int8[4, 6] = getitem(quantize_int8_default, 0)  # comm_prep fc2.weight
getitem_1: f32[4, 1] = getitem(quantize_int8_default, 1)  # comm_prep fc2.weight
view_default_2: int8[2, 12] = aten.view(getitem, [2, 12])  # comm_prep fc2.weight
view_dtype: int8[4, 4] = aten.view.dtype(getitem_1, int8)  # comm_prep fc2.weight
view_default_3: int8[2, 8] = aten.view(view_dtype, [2, 8])  # comm_prep fc2.weight
cat_default: int8[2, 20] = aten.cat([view_default_2, view_default_3], 1)  # comm_prep fc2.weight
view_default_4: int8[40] = aten.view(cat_default, [40])  # comm_prep fc2.weight
all_to_all_single_default: int8[40] = _c10d_functional.all_to_all_single(view_default_4, [20, 20], [20, 20], '<node>')  # all_to_all fc2.weight
wait_tensor_default_1: int8[40] = _c10d_functional.wait_tensor(all_to_all_single_default)  # wait fc2.weight
view_default_5: int8[2, 20] = aten.view(wait_tensor_default_1, [2, 20])  # comm_prep fc2.weight
slice_tensor_1: int8[2, 12] = aten.slice.Tensor(view_default_5, 1, 0, 12)  # comm_prep fc2.weight
slice_tensor_2: int8[2, 8] = aten.slice.Tensor(view_default_5, 1, 12, 20)  # comm_prep fc2.weight
clone_default_1: int8[2, 8] = aten.clone(slice_tensor_2, memory_format=torch.contiguous_format)  # comm_prep fc2.weight
view_dtype_1: f32[2, 2] = aten.view.dtype(clone_default_1, float32)  # comm_prep fc2.weight
view_default_6: int8[2, 2, 6] = aten.view(slice_tensor_1, [2, 2, 6])  # comm_prep fc2.weight
view_default_7: f32[2, 2, 1] = aten.view(view_dtype_1, [2, 2, 1])  # comm_prep fc2.weight
dequantize_int8_default: f32[2, 2, 6] = zerograph.dequantize_int8(view_default_6, view_default_7, 256, float32)  # comm_prep fc2.weight
sum_dim_int_list: f32[2, 6] = aten.sum.dim_IntList(dequantize_int8_default, [0])  # comm_prep fc2.weight
view_default_8: f32[2, 1, 6] = aten.view(sum_dim_int_list, [2, 1, 6])  # comm_prep fc2.weight
view_default_9: f32[2, 6] = aten.view(view_default_8, [2, 6])  # comm_prep fc2.weight
quantize_int8_default_1:  = zerograph.quantize_int8(view_default_9, 256)  # comm_prep fc2.weight
getitem_2: int8[2, 6] = getitem(quantize_int8_default_1, 0)  # comm_prep fc2.weight
getitem_3: f32[2, 1] = getitem(quantize_int8_default_1, 1)  # comm_prep fc2.weight
view_default_10: int8[2, 6] = aten.view(getitem_2, [2, 6])  # comm_prep fc2.weight
view_dtype_2: int8[2, 4] = aten.view.dtype(getitem_3, int8)  # comm_prep fc2.weight
view_default_11: int8[2, 4] = aten.view(view_dtype_2, [2, 4])  # comm_prep fc2.weight
cat_default_1: int8[2, 10] = aten.cat([view_default_10, view_default_11], 1)  # comm_prep fc2.weight
view_default_12: int8[20] = aten.view(cat_default_1, [20])  # comm_prep fc2.weight
all_to_all_single_default_1: int8[20] = _c10d_functional.all_to_all_single(view_default_12, [10, 10], [10, 10], '<peer>')  # all_to_all fc2.weight
wait_tensor_default_2: int8[20] = _c10d_functional.wait_tensor(all_to_all_single_default_1)  # wait fc2.weight
view_default_13: int8[2, 10] = aten.view(wait_tensor_default_2, [2, 10])  # comm_prep fc2.weight
slice_tensor_3: int8[2, 6] = aten.slice.Tensor(view_default_13, 1, 0, 6)  # comm_prep fc2.weight
slice_tensor_4: int8[2, 4] = aten.slice.Tensor(view_default_13, 1, 6, 10)  # comm_prep fc2.weight
clone_default_2: int8[2, 4] = aten.clone(slice_tensor_4, memory_format=torch.contiguous_format)  # comm_prep fc2.weight
view_dtype_3: f32[2, 1] = aten.view.dtype(clone_default_2, float32)  # comm_prep fc2.weight
view_default_14: int8[2, 1, 6] = aten.view(slice_tensor_3, [2, 1, 6])  # comm_prep fc2.weight
view_default_15: f32[2, 1, 1] = aten.view(view_dtype_3, [2, 1, 1])  # comm_prep fc2.weight
dequantize_int8_default_1: f32[2, 1, 6] = zerograph.dequantize_int8(view_default_14, view_default_15, 256, float32)  # comm_prep fc2.weight
sum_dim_int_list_1: f32[1, 6] = aten.sum.dim_IntList(dequantize_int8_default_1, [0])  # comm_prep fc2.weight
view_default_16: f32[1, 6] = aten.view(sum_dim_int_list_1, [1, 6])  # comm_prep fc2.weight
mul_tensor: f32[1, 6] = aten.mul_.Tensor(view_default_16, 0.25)  # comm_prep fc2.weight""")
    params = dict(model.named_parameters())
    m = {name: _chunk(p, 4) for name, p in params.items()}
    intra = sum(4 * _packed(n) for n in m.values())
    cross = sum(2 * _packed(n) for n in m.values())
    assert info.regions[0]["comm_bytes_by_scope"]["backward"] == {
        "intra_group": {"all_to_all": intra}, "cross_group": {"all_to_all": cross, "all_gather": 4 * 4 * 6}}
