"""ZeRO++ with bucketed collectives (docs/zeropp.md, "Buckets and small
parameters"): blocks restart at each parameter inside a bucket, so a small
parameter of small values packed next to a large one keeps its own scales.
Real gloo ranks (world 2): qwZ through the compiled model with the default
bucket sizes, and qgZ's quantized reduce-scatter of a two-parameter bucket."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

import zerograph
from tests import _harness, _pool
from zerograph.kernels.quantize_int8 import dequantize_int8_reference, quantize_int8_reference

TIMEOUT = _harness.TIMEOUT
BLOCK = 256  # zerograph.zeropp_block_size's default
SLACK = 0.5 + 2.0 ** -16  # tests/kernels/test_quantize_int8.py: scale / 2 plus fp32 rounding


class _SmallNextToLarge(nn.Module):
    """One module, so ``lower_markers`` gathers both parameters in one bucket:
    300 values of magnitude ~1 (a rank's shard: 150, not a multiple of the
    block) and 20 of magnitude ~1e-4 (a LayerNorm-like parameter). The
    forward returns the gathered values themselves (times 1)."""

    def __init__(self):
        super().__init__()
        self.large = nn.Parameter(torch.randn(60, 5))
        self.small = nn.Parameter(torch.randn(20) * 1e-4)

    def forward(self, x):
        return self.large * x, self.small * x


def _own_bound(p: torch.Tensor, world: int) -> torch.Tensor:
    """Per element: half its own block's scale (each rank's shard of ``p``
    alone, blocks of BLOCK), with fp32 slack."""
    shards = p.detach().reshape(world, -1)
    _, s = quantize_int8_reference(shards, BLOCK)
    return (s.repeat_interleave(BLOCK, -1)[:, :shards.shape[1]] * SLACK).reshape(p.shape)


def _qwz_bucket_rank(world: int):
    torch.manual_seed(0)
    config = {"zero_optimization": {"stage": 3, "zero_quantized_weights": True},
              "zerograph": {"verify_graphs": True}}
    module = _SmallNextToLarge()
    large, small = module.large.detach().clone(), module.small.detach().clone()
    model = zerograph.compile(module, config)
    with torch.no_grad():
        out_large, out_small = model(torch.ones(()))
    info = zerograph.inspect(model)
    record = next(r.details for r in info.passes if r.name == "quantize_weight_gathers")
    # what one row of blocks over the packed bucket (before segments) would have sent
    packed = torch.cat([large.reshape(world, -1), small.reshape(world, -1)], 1)
    q, s = quantize_int8_reference(packed, BLOCK)
    one_row = dequantize_int8_reference(q, s, BLOCK, torch.float32)[:, large.numel() // world:].reshape(-1)
    return {"record": record,
            "err_small": (out_small - small).abs(), "bound_small": _own_bound(small, world),
            "err_large": (out_large - large).abs(), "bound_large": _own_bound(large, world),
            "err_one_row": (one_row - small).abs()}


@pytest.mark.timeout(TIMEOUT + 30)
def test_qwz_bucket_keeps_each_parameters_own_block_bound():
    """qwZ, world 2, default bucket sizes: both parameters go in one int8
    gather, and every gathered element of each is within half its own
    block's scale (blocks of 256 over that parameter's shard alone). One row
    of blocks over the packed bucket (the behaviour before segments) puts
    the small parameter's 10 values in the large one's second block, at an
    error far over that bound: the test fails on it."""
    for r in _pool.run(_qwz_bucket_rank, 2, 2, timeout=TIMEOUT):
        assert r["record"]["collectives"] == 1 and r["record"]["quantized"] == ["large", "small"], r["record"]
        assert bool((r["err_small"] <= r["bound_small"]).all()), float((r["err_small"] / r["bound_small"]).max())
        assert bool((r["err_large"] <= r["bound_large"]).all())
        assert float(r["err_small"].max()) > 0  # quantized, not sent in full precision
        assert float(r["err_one_row"].max()) > 100 * float(r["bound_small"].max())


def _qgz_bucket_rank(world: int):
    """The quantized reduce-scatter of a bucket [large 150 | small 10] per
    rank's part, with segments and as one row of blocks: the small
    parameter's error against the sum over ranks of its own half scales."""
    from zerograph.passes.quantized_collectives import Codec, Hop, quantized_reduce_scatter

    rank = dist.get_rank()
    hops = [Hop(dist.group.WORLD.group_name, world, "dp")]
    rows = []
    for r in range(world):
        g = torch.Generator().manual_seed(10 + r)
        rows.append(torch.cat([torch.randn(world, 150, generator=g), torch.randn(world, 10, generator=g) * 1e-4], 1))
    exact = sum(rows)[rank]
    out = {}
    for name, codec in (("segments", Codec(8, BLOCK, segments=(150, 10))), ("one_row", Codec(8, BLOCK))):
        got = quantized_reduce_scatter(rows[rank].reshape(-1), (world * 160,), torch.float32, hops, codec)
        out[name] = (got - exact)[150:].abs()
    own = [quantize_int8_reference(x[rank, 150:], BLOCK)[1] for x in rows]  # each sender's small block
    out["bound"] = sum(own) * SLACK * (1 + 1e-5)
    return out


@pytest.mark.timeout(TIMEOUT + 30)
def test_qgz_bucket_keeps_each_parameters_own_block_bound():
    """qgZ's int8 all-to-all of a two-parameter bucket (world 2): with the
    bucket's segments the small parameter's reduced gradient is within the
    sum over senders of half its own block's scale; as one row of blocks it
    is not."""
    for r in _pool.run(_qgz_bucket_rank, 2, 2, timeout=TIMEOUT):
        assert float(r["segments"].max()) <= float(r["bound"].max()), (r["segments"].max(), r["bound"])
        assert float(r["one_row"].max()) > 100 * float(r["bound"].max())


def _collectives(net, opt) -> dict:
    """How many collectives each quantization pass rewrote (the last compile)."""
    info = zerograph.inspect(net)
    return {"collectives": sum(r.details.get("collectives", 0) for r in info.passes
                               if r.name in ("quantize_weight_gathers", "quantize_grad_reduction"))}


@pytest.mark.timeout(TIMEOUT + 30)
def test_bucketed_training_equals_one_message_per_parameter():
    """qwZ + qgZ (world 2, stage 3, small GPT, 2 AdamW steps): with blocks
    restarting at each parameter, a bucket quantizes every parameter exactly
    as its own message would (the same blocks, the same fp32 sums), so the
    default bucket sizes give bitwise the losses and parameters of bucket
    sizes 0, with the same bytes in fewer collectives."""
    zero = {"stage": 3, "zero_quantized_weights": True, "zero_quantized_gradients": True}
    configs = [{"zero_optimization": zero, "zerograph": {"verify_graphs": True}},
               {"zero_optimization": {**zero, "allgather_bucket_size": 0, "reduce_bucket_size": 0},
                "zerograph": {"verify_graphs": True}}]
    for bucketed, single in _harness.train("gpt_untied", configs, 2, 2, report=_collectives):
        assert bucketed["losses"] == single["losses"]
        assert all(torch.equal(bucketed["params"][k], v) for k, v in single["params"].items())
        assert bucketed["comm_by_phase"] == single["comm_by_phase"]
        assert 0 < bucketed["collectives"] < single["collectives"], (bucketed["collectives"], single["collectives"])
