"""Megatron sequence parallelism across pipeline stages: the markers of a
stage boundary (``zerograph.tp_sequence_parallel`` with ``pipeline.stages``).

With sequence parallelism the residual stream between tensor-parallel
regions is cut along the sequence (:mod:`zerograph.graph.tp_seq_markers`):
tp rank ``i`` holds positions ``[i·s/tp, (i+1)·s/tp)``. A stage boundary
falls between blocks, where the stream is so cut, so each rank sends its
shard ``[b, s/tp, h]`` to the same tp index of the next stage (p2p bytes
1/tp of the whole value's) and nothing is gathered or scattered for it.

The pipeline builder (:mod:`zerograph.pipeline.tp_boundary`) puts two
markers into the stage graphs before they are compiled, so Dynamo traces a
stage on the whole shapes its ATen ops were exported with while the stage
is called with shards:

* ``zerograph::tp_seq_enter(x, dim, tp)``: a received shard ``[.., s/tp, h]``
  read as the whole value ``[.., s, h]`` (its fake's shape);
* ``zerograph::tp_seq_leave(x, dim, tp)``: a value sent on, as this rank's
  shard ``[.., s/tp, h]``.

The ``tensor_parallel`` pass replaces both (they have no eager meaning: the
tp rank is not known to them): ``tp_seq_enter`` by an alias of the shard
whose tp state is "cut along the sequence", ``tp_seq_leave`` by an alias
when its input is so cut and by ``tp_seq_scatter`` (this rank's block, no
traffic) when it is whole.
"""

from __future__ import annotations

import torch


def _resized(x: torch.Tensor, dim: int, times: int, over: int) -> torch.Tensor:
    shape = list(x.shape)
    shape[dim] = shape[dim] * times // over
    return x.new_empty(shape)


def _no_eager(op: str):
    raise RuntimeError(f"zerograph::{op} marks a pipeline stage boundary under zerograph.tp_sequence_parallel; "
                       "the tensor_parallel pass replaces it, so it runs only in a stage compiled with that pass "
                       "(do not remove tensor_parallel from the pass list)")


@torch.library.custom_op("zerograph::tp_seq_enter", mutates_args=())
def tp_seq_enter(x: torch.Tensor, dim: int, tp: int) -> torch.Tensor:
    """A received sequence shard read as the whole value (marker)."""
    _no_eager("tp_seq_enter")


@tp_seq_enter.register_fake
def _enter_fake(x: torch.Tensor, dim: int, tp: int) -> torch.Tensor:
    return _resized(x, dim, tp, 1)


@torch.library.custom_op("zerograph::tp_seq_leave", mutates_args=())
def tp_seq_leave(x: torch.Tensor, dim: int, tp: int) -> torch.Tensor:
    """A value sent to the next stage as this rank's sequence shard (marker)."""
    _no_eager("tp_seq_leave")


@tp_seq_leave.register_fake
def _leave_fake(x: torch.Tensor, dim: int, tp: int) -> torch.Tensor:
    return _resized(x, dim, 1, tp)


TP_SEQ_ENTER = torch.ops.zerograph.tp_seq_enter.default
TP_SEQ_LEAVE = torch.ops.zerograph.tp_seq_leave.default
