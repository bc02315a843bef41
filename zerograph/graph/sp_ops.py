"""Sequence parallelism's (Ulysses) marker ops.

* ``zerograph::sp_seq_to_heads(x, tag)``: ``x`` is this rank's sequence
  shard of an attention input ``[b, heads, s/sp, d]``; the result is this
  rank's head shard of the whole sequence ``[b, heads/sp, s, d]`` (rank ``i``
  gets heads ``[i·heads/sp, (i+1)·heads/sp)``). One all-to-all over the sp
  group. Backward: ``sp_heads_to_seq``.
* ``zerograph::sp_heads_to_seq(x, tag)``: the inverse (attention's output
  back to sequence shards). Backward: ``sp_seq_to_heads``.
* ``zerograph::sp_all_reduce(x, tag)``: the sum over the sp group, whose
  backward is the sum of the gradients over the group (the loss: each rank's
  share of the global token sum; every rank then holds the global loss).

Under AOTAutograd each stays one node; ``lower_sp_markers`` lowers them to
functional collectives (``all_to_all_single``, ``all_reduce``) with their
reshapes, built by :func:`seq_to_heads_ops` / :func:`heads_to_seq_ops`, the
same functions the eager implementations run. Eager runs count their bytes
as ``sp_all_to_all`` / ``sp_all_reduce``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from zerograph.runtime import registry
from zerograph.runtime.errors import naming_failed_ranks


def _plain(_role, value):
    return value


def seq_to_heads_ops(x, shape, sp: int, exchange, emit=_plain):
    """``x`` (of ``shape``): ``[b, h, s/sp, d]`` sequence shard -> ``[b, h/sp, s, d]`` head shard.
    ``exchange(buf)`` is the all-to-all of a ``[sp, ...]`` buffer along dim 0
    (chunk ``j`` to rank ``j``; chunk ``j`` of the result from rank ``j``);
    ``emit(role, value)`` sees every value made."""
    b, h, s_local, d = shape
    buf = emit("comm_prep", torch.ops.aten.reshape.default(x, [b, sp, h // sp, s_local, d]))
    buf = emit("comm_prep", torch.ops.aten.permute.default(buf, [1, 0, 2, 3, 4]))
    buf = emit("comm_prep", torch.ops.aten.clone.default(buf, memory_format=torch.contiguous_format))
    got = exchange(buf)  # [sp (source rank = sequence shard), b, h/sp, s/sp, d]
    got = emit("comm_prep", torch.ops.aten.permute.default(got, [1, 2, 0, 3, 4]))
    got = emit("comm_prep", torch.ops.aten.clone.default(got, memory_format=torch.contiguous_format))
    return emit("comm_prep", torch.ops.aten.view.default(got, [b, h // sp, sp * s_local, d]))


def heads_to_seq_ops(x, shape, sp: int, exchange, emit=_plain):
    """``[b, h/sp, s, d]`` head shard -> ``[b, h, s/sp, d]`` sequence shard."""
    b, h_local, s, d = shape
    buf = emit("comm_prep", torch.ops.aten.reshape.default(x, [b, h_local, sp, s // sp, d]))
    buf = emit("comm_prep", torch.ops.aten.permute.default(buf, [2, 0, 1, 3, 4]))
    buf = emit("comm_prep", torch.ops.aten.clone.default(buf, memory_format=torch.contiguous_format))
    got = exchange(buf)  # [sp (source rank = head group), b, h/sp, s/sp, d]
    got = emit("comm_prep", torch.ops.aten.permute.default(got, [1, 0, 2, 3, 4]))
    got = emit("comm_prep", torch.ops.aten.clone.default(got, memory_format=torch.contiguous_format))
    return emit("comm_prep", torch.ops.aten.view.default(got, [b, sp * h_local, s // sp, d]))


def _eager_exchange(tag: str, what: str):
    ctx = registry.lookup(tag)

    def exchange(buf):
        out = torch.empty_like(buf)
        with naming_failed_ranks(ctx, what):
            dist.all_to_all_single(out, buf, group=ctx.sp.group)
        ctx.stats.add("sp_all_to_all", buf.numel() * buf.element_size())
        return out

    return exchange


def _sp(tag: str) -> int:
    return registry.lookup(tag).sp.world_size


@torch.library.custom_op("zerograph::sp_seq_to_heads", mutates_args=())
def sp_seq_to_heads(x: torch.Tensor, tag: str) -> torch.Tensor:
    """This rank's heads of the whole sequence, from every rank's sequence shard."""
    return seq_to_heads_ops(x, tuple(x.shape), _sp(tag), _eager_exchange(tag, "sequence-parallel all-to-all"))


@sp_seq_to_heads.register_fake
def _seq_to_heads_fake(x: torch.Tensor, tag: str) -> torch.Tensor:
    sp = _sp(tag)
    b, h, s_local, d = x.shape
    return x.new_empty((b, h // sp, s_local * sp, d))


@torch.library.custom_op("zerograph::sp_heads_to_seq", mutates_args=())
def sp_heads_to_seq(x: torch.Tensor, tag: str) -> torch.Tensor:
    """This rank's sequence shard of every head, from every rank's head shard."""
    return heads_to_seq_ops(x, tuple(x.shape), _sp(tag), _eager_exchange(tag, "sequence-parallel all-to-all"))


@sp_heads_to_seq.register_fake
def _heads_to_seq_fake(x: torch.Tensor, tag: str) -> torch.Tensor:
    sp = _sp(tag)
    b, h_local, s, d = x.shape
    return x.new_empty((b, h_local * sp, s // sp, d))


def _tag_setup(ctx, inputs, output):
    ctx.tag = inputs[1]


def _seq_to_heads_backward(ctx, grad):
    return torch.ops.zerograph.sp_heads_to_seq(grad.contiguous(), ctx.tag), None


def _heads_to_seq_backward(ctx, grad):
    return torch.ops.zerograph.sp_seq_to_heads(grad.contiguous(), ctx.tag), None


sp_seq_to_heads.register_autograd(_seq_to_heads_backward, setup_context=_tag_setup)
sp_heads_to_seq.register_autograd(_heads_to_seq_backward, setup_context=_tag_setup)


@torch.library.custom_op("zerograph::sp_all_reduce", mutates_args=())
def sp_all_reduce(x: torch.Tensor, tag: str) -> torch.Tensor:
    """The sum of ``x`` over the sequence-parallel group."""
    ctx = registry.lookup(tag)
    out = x.clone()
    with naming_failed_ranks(ctx, "sequence-parallel loss"):
        dist.all_reduce(out, group=ctx.sp.group)
    ctx.stats.add("sp_all_reduce", out.numel() * out.element_size())
    return out


@sp_all_reduce.register_fake
def _sp_all_reduce_fake(x: torch.Tensor, tag: str) -> torch.Tensor:
    return torch.empty_like(x)


def _sp_all_reduce_backward(ctx, grad):
    return torch.ops.zerograph.sp_all_reduce(grad, ctx.tag), None


sp_all_reduce.register_autograd(_sp_all_reduce_backward, setup_context=_tag_setup)

SP_SEQ_TO_HEADS = torch.ops.zerograph.sp_seq_to_heads.default
SP_HEADS_TO_SEQ = torch.ops.zerograph.sp_heads_to_seq.default
SP_ALL_REDUCE = torch.ops.zerograph.sp_all_reduce.default
SP_MARKERS = (SP_SEQ_TO_HEADS, SP_HEADS_TO_SEQ, SP_ALL_REDUCE)
