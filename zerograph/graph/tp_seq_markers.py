"""Megatron sequence parallelism's marker ops (``zerograph.tp_sequence_parallel``).

Between tensor-parallel regions the activations ``[b, s, h]`` are cut along
the sequence over the tp ranks: rank ``i`` holds positions
``[i·s/tp, (i+1)·s/tp)`` (dim ``dim``, the one before the features). Three
markers move values in and out of that layout:

* ``zerograph::tp_seq_gather(x, tag, dim)``: in front of a group of
  column-split linears: all-gather of the sequence shards (forward), and
  reduce-scatter of the gradient along the sequence (backward): Megatron's
  *g* in sequence-parallel form (it replaces ``tp_copy``);
* ``zerograph::tp_seq_reduce_scatter(x, tag, dim)``: after a row-split
  linear: reduce-scatter of the partial products along the sequence
  (forward), all-gather of the gradient (backward); it replaces
  ``tp_all_reduce``;
* ``zerograph::tp_seq_scatter(x, tag, dim)``: a value every tp rank holds
  whole enters the sequence-parallel region: this rank's block (forward, no
  traffic), all-gather of the gradient (backward).

A sequence shard that leaves the region for an op that needs every position
(a whole LM head, a loss, the graph's output) is gathered with
``tp_all_gather``, whose backward takes this rank's block (no traffic).

Under AOTAutograd each stays one node; ``lower_tp_markers`` lowers them to
functional collectives on the tp group (``all_gather_into_tensor``,
``reduce_scatter_tensor``) tagged ``mesh_dim="tp"``, counted as
``tp_all_gather`` / ``tp_reduce_scatter``. The eager implementations
communicate on the model's tp group and count the same bytes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from zerograph.runtime import registry
from zerograph.runtime.errors import naming_failed_ranks


def _tp(tag: str):
    return registry.lookup(tag).tp


def _count(tag: str, kind: str, numel: int, t: torch.Tensor) -> None:
    registry.lookup(tag).stats.add(kind, numel * t.element_size())


def _gathered_shape(x: torch.Tensor, dim: int, tp: int) -> list[int]:
    shape = list(x.shape)
    shape[dim] *= tp
    return shape


@torch.library.custom_op("zerograph::tp_seq_gather", mutates_args=())
def tp_seq_gather(x: torch.Tensor, tag: str, dim: int) -> torch.Tensor:
    """Every tp rank's sequence shard ``x``, concatenated along ``dim``."""
    ctx = registry.lookup(tag)
    parts = [torch.empty_like(x) for _ in range(ctx.tp.world_size)]
    with naming_failed_ranks(ctx, "forward"):
        dist.all_gather(parts, x.contiguous(), group=ctx.tp.group)
    _count(tag, "tp_all_gather", x.numel() * ctx.tp.world_size, x)
    return torch.cat(parts, dim)


@tp_seq_gather.register_fake
def _tp_seq_gather_fake(x: torch.Tensor, tag: str, dim: int) -> torch.Tensor:
    return x.new_empty(_gathered_shape(x, dim, _tp(tag).world_size))


@torch.library.custom_op("zerograph::tp_seq_reduce_scatter", mutates_args=())
def tp_seq_reduce_scatter(x: torch.Tensor, tag: str, dim: int) -> torch.Tensor:
    """This rank's sequence block of the sum of ``x`` over the tp ranks."""
    ctx = registry.lookup(tag)
    tp = ctx.tp
    out = x.clone()
    with naming_failed_ranks(ctx, "forward"):
        dist.all_reduce(out, group=tp.group)
    _count(tag, "tp_reduce_scatter", x.numel(), x)
    return out.chunk(tp.world_size, dim)[tp.rank].contiguous()


def _sequence_block_fake(x: torch.Tensor, tag: str, dim: int) -> torch.Tensor:
    """One tp rank's block of ``x`` along ``dim`` (the fake of both cuts)."""
    shape = list(x.shape)
    shape[dim] //= _tp(tag).world_size
    return x.new_empty(shape)


tp_seq_reduce_scatter.register_fake(_sequence_block_fake)


@torch.library.custom_op("zerograph::tp_seq_scatter", mutates_args=())
def tp_seq_scatter(x: torch.Tensor, tag: str, dim: int) -> torch.Tensor:
    """This rank's sequence block of ``x`` (which every tp rank holds whole)."""
    tp = _tp(tag)
    return x.chunk(tp.world_size, dim)[tp.rank].contiguous()


tp_seq_scatter.register_fake(_sequence_block_fake)


def _setup(ctx, inputs, output):
    _x, ctx.tag, ctx.dim = inputs


def _gather_backward(ctx, grad):
    return torch.ops.zerograph.tp_seq_reduce_scatter(grad, ctx.tag, ctx.dim), None, None


def _to_gather_backward(ctx, grad):
    return torch.ops.zerograph.tp_seq_gather(grad, ctx.tag, ctx.dim), None, None


tp_seq_gather.register_autograd(_gather_backward, setup_context=_setup)
tp_seq_reduce_scatter.register_autograd(_to_gather_backward, setup_context=_setup)
tp_seq_scatter.register_autograd(_to_gather_backward, setup_context=_setup)

TP_SEQ_GATHER = torch.ops.zerograph.tp_seq_gather.default
TP_SEQ_REDUCE_SCATTER = torch.ops.zerograph.tp_seq_reduce_scatter.default
TP_SEQ_SCATTER = torch.ops.zerograph.tp_seq_scatter.default
TP_SEQ_MARKERS = (TP_SEQ_GATHER, TP_SEQ_REDUCE_SCATTER, TP_SEQ_SCATTER)
