"""``quantize_weight_gathers`` (qwZ) and ``quantize_grad_reduction`` (qgZ):
ZeRO++'s int8 (or int4: ``zerograph.zeropp_weight_bits`` /
``zeropp_gradient_bits``) collectives, as rewrites of the lowered collectives.

Both run after ``lower_markers`` and before scheduling, read the collective
nodes' tags (role, group) and replace a collective and its wait with the
sequences of :mod:`zerograph.passes.quantized_collectives`; the new nodes keep the
collective's tag (parameter, bucket, phase) with their own role and
``pass_name``, so ``comm_analysis`` counts the int8 values and scales
exactly and ``schedule_collectives`` prefetches them like any gather.

**qwZ** (forward and inference graphs, stage 3): every parameter all-gather
over the data-parallel ranks. ``TinyMLP``'s ``fc2.weight`` (3×6, 2 ranks,
blocks of 256) goes from::

    constant_pad_nd = aten.constant_pad_nd(primals_4, [0, 0, 0, 1], 0.0)
    all_gather_into_tensor = _c10d_functional.all_gather_into_tensor(constant_pad_nd, 2, '0')
    wait_tensor = _c10d_functional.wait_tensor(all_gather_into_tensor)

to::

    view = aten.view(constant_pad_nd, [1, 12])
    quantize_int8 = zerograph.quantize_int8(view, 256)
    getitem, getitem_1 = quantize_int8[0], quantize_int8[1]      # i8[1, 12], f32[1, 1]
    cat = aten.cat([view(getitem, [1, 12]), view(view.dtype(getitem_1, i8), [1, 4])], 1)
    all_gather_into_tensor = _c10d_functional.all_gather_into_tensor(view(cat, [16]), 2, '0')  # 32 bytes
    view_5 = aten.view(wait_tensor(all_gather_into_tensor), [2, 16])
    dequantize_int8 = zerograph.dequantize_int8(slice(view_5, 1, 0, 12), view.dtype(clone(slice(view_5, 1, 12, 16)), f32), 256, f32)
    view_6 = aten.view(dequantize_int8, [4, 6])

The backward graph's re-gather is not rewritten (full precision; with hpZ
it reads the secondary shard, cut from the forward's dequantized gather).

**qgZ** (backward graphs, stages 2-3): every reduce-scatter of gradients
becomes one int8 all-to-all over the data-parallel ranks, or with nodes
(``zero_hpz_partition_size`` or ``zerograph.ranks_per_node``) two: inside the
node, then across nodes; each hop dequantizes and sums in fp32. With
``zerograph.zeropp_error_feedback`` each hop quantizes with
``zerograph::quantize_with_feedback(x, bits, block, model_tag, "<params>/<hop>")``
(:mod:`zerograph.passes.error_feedback`) instead. Gradients all-reduced whole (parameters below the persistence
threshold) stay full precision.

**Buckets.** A collective that carries a bucket (``lower_markers`` with
``allgather_bucket_size`` / ``reduce_bucket_size``) holds, in each rank's
part, every parameter's padded shard one after another; the quantize and
dequantize ops get those lengths as ``segments`` (read from the bucket's
parameter specs), so blocks restart at each parameter: a small parameter
next to a large one keeps its own scales and its own error bound.

Details: ``quantized`` (the parameters of the rewritten collectives),
``collectives`` (how many), ``bytes_before`` / ``bytes_after`` (their
buffers, ``comm_analysis``'s unit).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from zerograph._torch_private import c10d_functional, detect_fake_mode
from zerograph.passes.quantized_collectives import Codec, Hop, quantized_all_gather, quantized_reduce_scatter
from zerograph.graph.tags import get_tag, set_tag
from zerograph.passes.manager import PassContext, PassResult
from zerograph.runtime.stats import collective_buffer_bytes

_WAIT = c10d_functional.wait_tensor.default


def _nbytes(val) -> int:
    return val.numel() * val.element_size() if val is not None and hasattr(val, "numel") else 0


def _wait_of(start: fx.Node) -> fx.Node:
    return next(u for u in start.users if u.target is _WAIT)


def _rewrite(gm: fx.GraphModule, start: fx.Node, fn, pass_name: str) -> int:
    """Replace ``start`` (a collective) and its wait with ``fn(x, emit)``,
    emitted before ``start``; returns the new collectives' bytes."""
    graph, wait = gm.graph, _wait_of(start)
    base = get_tag(start)
    new_nodes: list[fx.Node] = []

    def emit(role: str, proxy, group: str | None = None, **_):
        node = proxy.node
        set_tag(node, base.replace(role=role, pass_name=pass_name, group=group or base.group))
        new_nodes.append(node)
        return proxy

    src = start.args[0]
    with graph.inserting_before(start):
        out = fn(fx.Proxy(src, fx.proxy.GraphAppendingTracer(graph)), emit)
    vals: list = []

    def record(_role, v, **_tag):
        vals.append(v)
        return v

    mode = detect_fake_mode([src.meta.get("val")])
    if mode is not None:
        with mode:
            fn(src.meta["val"], record)
        for node, val in zip(new_nodes, vals):
            node.meta["val"] = val
    wait.replace_all_uses_with(out.node)
    graph.erase_node(wait)
    graph.erase_node(start)
    total = 0
    for node in new_nodes:
        tag = get_tag(node)
        if tag.role in ("all_gather", "all_to_all"):
            total += collective_buffer_bytes(tag.role, _nbytes(node.args[0].meta.get("val")),
                                             _nbytes(node.meta.get("val")))
    return total


def _params(nodes: list[fx.Node]) -> list[str]:
    out: list[str] = []
    for node in nodes:
        tag = get_tag(node)
        out += [p for p in (tag.bucket or (tag.param,)) if p and p not in out]
    return out


def _segments(state, start: fx.Node, n: int) -> tuple[int, ...] | None:
    """A bucket's parameters' lengths in each part of ``start``'s message
    (``n`` elements): blocks restart at each. None for one parameter."""
    tag = get_tag(start)
    if not tag.bucket or len(tag.bucket) < 2:
        return None
    lengths = tuple(state.specs[p].chunk_rows * state.specs[p].row_numel for p in tag.bucket)
    if sum(lengths) != n:
        raise RuntimeError(f"zeropp: bucket {list(tag.bucket)} has parts of {n} elements, but its parameters' "
                           f"shards sum to {sum(lengths)} ({list(lengths)}); {start.format_node()}")
    return lengths


def _finish(gm: fx.GraphModule, done: list[fx.Node], before: int, after: int) -> PassResult:
    if not done:
        return PassResult()
    gm.graph.lint()
    gm.recompile()
    return PassResult(changed=True, details={"quantized": _params(done), "collectives": len(done),
                                             "bytes_before": before, "bytes_after": after})


def quantize_weight_gathers(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    if ctx.state is None or not ctx.plan.zero.zeropp.qwz or ctx.phase not in ("forward", "inference"):
        return PassResult()
    codec = Codec(ctx.plan.zero.zeropp.weight_bits, ctx.plan.zero.zeropp.block)
    starts = [n for n in gm.graph.nodes
              if (t := get_tag(n)) is not None and t.role == "all_gather" and t.group == "dp" and t.mesh_dim == "dp"]
    before = after = 0
    for start in starts:
        x = start.args[0].meta["val"]
        before += _nbytes(_wait_of(start).meta.get("val"))
        world, group = start.args[1], start.args[2]
        part = dataclasses.replace(codec, segments=_segments(ctx.state, start, x.numel()))

        def fn(src, emit, shape=tuple(x.shape), dtype=x.dtype, world=world, group=group, part=part):
            return quantized_all_gather(src, shape, dtype, world, group, part, emit)

        after += _rewrite(gm, start, fn, "quantize_weight_gathers")
    return _finish(gm, starts, before, after)


def _hops(state, world: int, group_name: str) -> list[Hop]:
    groups = state.node_groups
    if groups is None:
        return [Hop(group_name, world, "dp")]
    if groups.peer.size == 1:
        return [Hop(groups.node.group_name, groups.node.size, "node")]
    return [Hop(groups.node.group_name, groups.node.size, "node"), Hop(groups.peer.group_name, groups.peer.size, "peer")]


def quantize_grad_reduction(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    if ctx.state is None or not ctx.plan.zero.zeropp.qgz or ctx.phase != "backward":
        return PassResult()
    zpp = ctx.plan.zero.zeropp
    codec = Codec(zpp.grad_bits, zpp.block, ctx.state.tag if zpp.error_feedback else None)
    starts = [n for n in gm.graph.nodes
              if (t := get_tag(n)) is not None and t.role == "reduce_scatter" and t.group == "dp"
              and t.mesh_dim == "dp"]
    before = after = 0
    for start in starts:
        x = start.args[0].meta["val"]
        before += _nbytes(x)
        hops = _hops(ctx.state, start.args[2], start.args[3])
        if start.args[1] != "sum" or torch.Size(x.shape).numel() % start.args[2]:
            raise RuntimeError(f"quantize_grad_reduction: unexpected reduce-scatter {start.format_node()}")

        tag = get_tag(start)
        key = ",".join(tag.bucket or (tag.param,))
        part = dataclasses.replace(codec, segments=_segments(ctx.state, start, x.numel() // start.args[2]))

        def fn(src, emit, shape=tuple(x.shape), dtype=x.dtype, hops=hops, key=key, part=part):
            return quantized_reduce_scatter(src, shape, dtype, hops, part, emit, key)

        after += _rewrite(gm, start, fn, "quantize_grad_reduction")
    return _finish(gm, starts, before, after)
