"""Tensor parallelism's marker ops.

* ``zerograph::unshard_whole(shard, tag, name)``: how a module reads a
  parameter split over the tp ranks: the *whole* parameter, as the user's
  model holds it (gathered over dp by ``unshard``, then over tp). Dynamo
  traces the model with these full shapes. The ``tensor_parallel`` pass then
  replaces every one of them by ``unshard`` (this rank's tp slice) and
  rewrites the graph to compute on slices; code that Dynamo leaves outside a
  compiled region (a graph break, ``torch.compiler.disable``) keeps the eager
  implementation, which really gathers, so it computes on whole parameters
  and stays correct. Its backward, ``reduce_whole_grad``, takes this rank's
  tp slice of the whole gradient and reduces it over dp (``reduce_grad``).
* ``zerograph::tp_copy(x, tag)``: Megatron's *f*, in front of a group of
  column-split linears: identity forward, all-reduce over tp backward.
* ``zerograph::tp_all_reduce(x, tag)``: Megatron's *g*, after a row-split
  linear: all-reduce over tp forward, identity backward.

Under AOTAutograd each stays one node; ``lower_tp_markers`` turns
``tp_all_reduce`` into a functional all-reduce with its wait and drops
``tp_copy``. Their eager implementations communicate on the model's tp group
and count their bytes as ``tp_all_gather`` / ``tp_all_reduce``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from zerograph.graph.markers import spec_of
from zerograph.runtime import registry
from zerograph.runtime.errors import naming_failed_ranks


def _count(tag: str, kind: str, t: torch.Tensor) -> None:
    registry.lookup(tag).stats.add(kind, t.numel() * t.element_size())


@torch.library.custom_op("zerograph::unshard_whole", mutates_args=())
def unshard_whole(shard: torch.Tensor, tag: str, name: str) -> torch.Tensor:
    """The whole parameter ``name``: gathered over dp, then over tp."""
    ctx = registry.lookup(tag)
    layout = ctx.specs[name].tp
    local = torch.ops.zerograph.unshard(shard, tag, name).contiguous()
    parts = [torch.empty_like(local) for _ in range(layout.size)]
    with naming_failed_ranks(ctx, "forward"):
        dist.all_gather(parts, local, group=ctx.tp.group)
    _count(tag, "tp_all_gather", local.new_empty((layout.size * local.numel(),)))
    return layout.assemble(parts)


@unshard_whole.register_fake
def _unshard_whole_fake(shard: torch.Tensor, tag: str, name: str) -> torch.Tensor:
    spec = spec_of(tag, name)
    return shard.new_empty(spec.tp.whole_shape, dtype=spec.compute_dtype, device=spec.gathered_device(shard.device))


@torch.library.custom_op("zerograph::reduce_whole_grad", mutates_args=())
def reduce_whole_grad(grad: torch.Tensor, tag: str, name: str) -> torch.Tensor:
    """This rank's gradient shard of ``name`` from the whole gradient (the
    same on every tp rank): its tp slice, reduced over dp."""
    local = spec_of(tag, name).tp.local_part(grad).contiguous()
    return torch.ops.zerograph.reduce_grad(local, tag, name)


@reduce_whole_grad.register_fake
def _reduce_whole_grad_fake(grad: torch.Tensor, tag: str, name: str) -> torch.Tensor:
    spec = spec_of(tag, name)
    return grad.new_empty(spec.local_shape, dtype=spec.master_dtype, device=spec.grad_shard_device(grad.device))


def _unshard_whole_setup(ctx, inputs, output):
    _shard, ctx.tag, ctx.name = inputs


def _unshard_whole_backward(ctx, grad):
    return torch.ops.zerograph.reduce_whole_grad(grad, ctx.tag, ctx.name), None, None


unshard_whole.register_autograd(_unshard_whole_backward, setup_context=_unshard_whole_setup)


@torch.library.custom_op("zerograph::tp_all_reduce", mutates_args=())
def tp_all_reduce(x: torch.Tensor, tag: str) -> torch.Tensor:
    """The sum of ``x`` over the model's tp ranks."""
    ctx = registry.lookup(tag)
    out = x.clone()
    with naming_failed_ranks(ctx, "forward"):
        dist.all_reduce(out, group=ctx.tp.group)
    _count(tag, "tp_all_reduce", out)
    return out


@tp_all_reduce.register_fake
def _tp_all_reduce_fake(x: torch.Tensor, tag: str) -> torch.Tensor:
    return torch.empty_like(x)


def _tag_setup(ctx, inputs, output):
    ctx.tag = inputs[1]


def _tp_all_reduce_backward(ctx, grad):
    return grad, None


tp_all_reduce.register_autograd(_tp_all_reduce_backward, setup_context=_tag_setup)


@torch.library.custom_op("zerograph::tp_copy", mutates_args=())
def tp_copy(x: torch.Tensor, tag: str) -> torch.Tensor:
    """``x`` (the input of column-split linears); its gradient is summed over tp."""
    return x.clone()


@tp_copy.register_fake
def _tp_copy_fake(x: torch.Tensor, tag: str) -> torch.Tensor:
    return torch.empty_like(x)


def _tp_copy_backward(ctx, grad):
    return torch.ops.zerograph.tp_all_reduce(grad, ctx.tag), None


tp_copy.register_autograd(_tp_copy_backward, setup_context=_tag_setup)

UNSHARD_WHOLE = torch.ops.zerograph.unshard_whole.default
REDUCE_WHOLE_GRAD = torch.ops.zerograph.reduce_whole_grad.default
TP_ALL_REDUCE = torch.ops.zerograph.tp_all_reduce.default
TP_COPY = torch.ops.zerograph.tp_copy.default


@torch.library.custom_op("zerograph::tp_all_gather", mutates_args=())
def tp_all_gather(x: torch.Tensor, tag: str, dim: int, parts: list[int]) -> torch.Tensor:
    """The whole tensor from every tp rank's slice ``x`` along ``dim``, whose
    fused parts have the (whole) sizes ``parts``: a tp-split value that leaves
    a compiled graph (a Hugging Face KV cache, a graph break in a layer)."""
    ctx = registry.lookup(tag)
    tp = ctx.tp.world_size
    gathered = [torch.empty_like(x) for _ in range(tp)]
    with naming_failed_ranks(ctx, "forward"):
        dist.all_gather(gathered, x.contiguous(), group=ctx.tp.group)
    _count(tag, "tp_all_gather", x.new_empty((tp * x.numel(),)))
    local = [p // tp for p in parts]
    pieces = [g.split(local, dim) for g in gathered]
    return torch.cat([pieces[r][j] for j in range(len(parts)) for r in range(tp)], dim)


@tp_all_gather.register_fake
def _tp_all_gather_fake(x: torch.Tensor, tag: str, dim: int, parts: list[int]) -> torch.Tensor:
    shape = list(x.shape)
    shape[dim] = sum(parts)
    return x.new_empty(shape)


def _gather_setup(ctx, inputs, output):
    _x, ctx.tag, ctx.dim, ctx.parts = inputs


def _tp_all_gather_backward(ctx, grad):
    tp_ctx = registry.lookup(ctx.tag).tp
    pieces = [p.chunk(tp_ctx.world_size, ctx.dim)[tp_ctx.rank] for p in grad.split(list(ctx.parts), ctx.dim)]
    return torch.cat(pieces, ctx.dim), None, None, None


tp_all_gather.register_autograd(_tp_all_gather_backward, setup_context=_gather_setup)
TP_ALL_GATHER = torch.ops.zerograph.tp_all_gather.default


@torch.library.custom_op("zerograph::tp_all_reduce_max", mutates_args=())
def tp_all_reduce_max(x: torch.Tensor, tag: str) -> torch.Tensor:
    """The elementwise maximum of ``x`` over the model's tp ranks (the
    vocab-parallel cross-entropy's row maxima; not differentiated: its input
    is detached)."""
    ctx = registry.lookup(tag)
    out = x.clone()
    with naming_failed_ranks(ctx, "forward"):
        dist.all_reduce(out, op=dist.ReduceOp.MAX, group=ctx.tp.group)
    _count(tag, "tp_all_reduce", out)
    return out


@tp_all_reduce_max.register_fake
def _tp_all_reduce_max_fake(x: torch.Tensor, tag: str) -> torch.Tensor:
    return torch.empty_like(x)


TP_ALL_REDUCE_MAX = torch.ops.zerograph.tp_all_reduce_max.default
