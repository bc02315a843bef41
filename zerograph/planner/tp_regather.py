"""Which tensor-parallel collectives the backward may repeat (policy only, no
graph changes).

Megatron sequence parallelism (``zerograph.tp_sequence_parallel``) gathers
the sequence shards in front of each column-split group
(``zerograph::tp_seq_gather``: ``[b, s/tp, h] -> [b, s, h]``). The group's
weight gradient needs that whole input in the backward. Saving it keeps
``b·s·h`` per group from the forward to the backward; Megatron-LM instead
keeps the shard (``b·s·h/tp``, which the forward holds anyway as the
gather's input) and all-gathers it again in the backward. That re-gather is
the policy here (``zerograph.tp_sequence_parallel_regather``, on by default
with Megatron-SP):

* :func:`regather_decisions`: each forward ``tp_seq_gather`` whose value the
  backward reads, and the views and casts of it the backward reads (the
  flattened ``[b·s, h]`` of the weight-gradient matmul), ``MUST_RECOMPUTE``. The
  partitioner then saves the shard instead, and the backward graph gets its
  own copy of the gather (one more all-gather of ``b·s·h`` per column group
  and step).

Every other tp collective is never recomputed: :func:`is_tp_collective`
names them, and the activation checkpointing policies
(:mod:`zerograph.planner.recompute_policy`) save their outputs, so a
recomputed block never repeats an all-reduce or reduce-scatter, and a
gather that this policy re-gathers is copied into the backward once (the
recomputed matmul and the weight gradient read the same copy).
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.utils.checkpoint import CheckpointPolicy

from zerograph._torch_private import is_view_op
from zerograph.graph.tags import get_tag
from zerograph.graph.tp_markers import TP_ALL_GATHER, TP_ALL_REDUCE, TP_ALL_REDUCE_MAX
from zerograph.graph.tp_seq_markers import TP_SEQ_GATHER, TP_SEQ_REDUCE_SCATTER

# casts between a gather and the matmul (cheap to recompute; saving one would keep a whole [b, s, h])
_CASTS = (torch.ops.aten._to_copy.default, torch.ops.prims.convert_element_type.default)
# the tp markers that move bytes in the forward (tp_copy and tp_seq_scatter do not)
TP_COLLECTIVES = (TP_ALL_REDUCE, TP_ALL_REDUCE_MAX, TP_ALL_GATHER, TP_SEQ_GATHER, TP_SEQ_REDUCE_SCATTER)


def is_tp_collective(node: fx.Node) -> bool:
    """A forward tp marker that communicates (recomputing it repeats its collective)."""
    return node.op == "call_function" and node.target in TP_COLLECTIVES


def _forward(node: fx.Node) -> bool:
    tag = get_tag(node)
    return tag is not None and tag.phase == "forward"


def _read_by_backward(node: fx.Node) -> bool:
    return any(u.op != "output" and not _forward(u) for u in node.users)


def regather_decisions(gm: fx.GraphModule) -> dict[fx.Node, CheckpointPolicy]:
    """``MUST_RECOMPUTE`` for each forward ``tp_seq_gather`` of the joint graph
    ``gm`` that the backward reads (itself or through views and casts), and
    for the views and casts between it and those backward reads; nothing
    else."""
    decision: dict[fx.Node, CheckpointPolicy] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not TP_SEQ_GATHER or not _forward(node):
            continue
        for view in _views_read_by_backward(node):
            decision[view] = CheckpointPolicy.MUST_RECOMPUTE
    return decision


def _views_read_by_backward(gather: fx.Node) -> list[fx.Node]:
    """The forward views and casts of ``gather`` on a path to a backward read
    (``[gather]`` included first when the backward reads anything of it);
    ``[]`` if none."""
    keep: dict[fx.Node, bool] = {}

    def visit(node: fx.Node) -> bool:
        if node in keep:
            return keep[node]
        keep[node] = False
        needed = _read_by_backward(node)
        for user in node.users:
            if user.op == "call_function" and _forward(user) and (is_view_op(user.target) or user.target in _CASTS) \
                    and visit(user):
                needed = True
        keep[node] = needed
        return needed

    if not visit(gather):
        return []
    return [n for n, needed in keep.items() if needed]
