"""``hpz_secondary`` (joint graph): ZeRO++'s hierarchical partitioning (hpZ).

At stage 3 the backward re-gathers every parameter it reads from the shards
over all data-parallel ranks (``zero_policy`` tags the forward's ``unshard``
marker ``MUST_RECOMPUTE``). With ``zero_hpz_partition_size`` ``k`` this pass
makes it gather inside the rank's node instead: right after the forward's
gather each rank cuts its *secondary shard* (its node's ``1/k`` of the full
parameter, :mod:`zerograph.graph.hpz`), which the partitioner saves for the
backward (``MUST_SAVE``), and the backward's copy of the parameter comes from
``zerograph::hpz_unshard(secondary)``, which ``lower_markers`` lowers to an
all-gather over the node group. Exact: the backward sees the same values.

It runs on the joint graph because what the forward hands to the backward is
decided there, before the partitioner splits the graph. On ``TinyMLP``'s
``fc2.weight`` (4 ranks, nodes of 2)::

    unshard_2 = zerograph.unshard(primals_4, 'zg0', 'fc2.weight')     # forward: all ranks
    slice_1 = aten.slice(unshard_2, 0, 2, 3)                           # secondary (rank 1: rows 2..3)
    clone = aten.clone(slice_1)                                        # secondary, MUST_SAVE
    hpz_unshard = zerograph.hpz_unshard(clone, 'zg0', 'fc2.weight')    # MUST_RECOMPUTE: in the backward
    t_1 = aten.t(unshard_2)                                            # forward users
    t_9 = aten.t(hpz_unshard)                                          # the copy the backward reads
    t_4 = aten.t(t_9)                                                  # backward

Every node that the partitioner would recompute from the parameter in the
backward (its view/cast chain, and with activation checkpointing the
recomputed layer ops) gets a copy rooted at ``hpz_unshard``, and the
backward's nodes read the copies; the forward keeps the originals.
Parameters the backward does not read (an embedding's gradient, a bias's)
get no secondary shard.

Details: ``secondary`` (parameters with a secondary shard),
``secondary_elements`` (their elements in this rank's secondary shards) and
``copied`` (recompute nodes copied for the backward).
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.utils.checkpoint import CheckpointPolicy

from zerograph._torch_private import detect_fake_mode
from zerograph.graph.hpz import HPZ_UNSHARD, secondary_rows, secondary_shard, secondary_spec
from zerograph.graph.markers import UNSHARD
from zerograph.graph.tags import get_tag, set_tag
from zerograph.passes.manager import PassContext, PassResult

_RECOMPUTE = (CheckpointPolicy.MUST_RECOMPUTE, CheckpointPolicy.PREFER_RECOMPUTE)


def _recomputed(node: fx.Node) -> bool:
    return node.meta.get("recompute") in _RECOMPUTE


def _phase(node: fx.Node) -> str | None:
    tag = get_tag(node)
    return tag.phase if tag is not None else None


def _recompute_closure(marker: fx.Node) -> list[fx.Node]:
    """The marker and every forward node recomputed from it (in graph order):
    what the backward would rebuild from the shard."""
    members = {marker}
    for node in marker.graph.nodes:
        if node in members or _phase(node) != "forward" or not _recomputed(node):
            continue
        if any(a in members for a in node.all_input_nodes):
            members.add(node)
    return [n for n in marker.graph.nodes if n in members]


def _backward_users(closure: list[fx.Node]) -> bool:
    return any(_phase(u) == "backward" for n in closure for u in n.users)


def _fake_val(fn, *vals):
    mode = detect_fake_mode(vals)
    if mode is None:
        return None
    with mode:
        return fn(*vals)


def _new_node(graph: fx.Graph, like: fx.Node, target, args, role: str, recompute, val) -> fx.Node:
    node = graph.call_function(target, args)
    node.meta.update({k: v for k, v in like.meta.items() if k not in ("val", "tensor_meta", "recompute")})
    node.meta["val"] = val
    node.meta["recompute"] = recompute
    tag = get_tag(like)
    if tag is not None:
        set_tag(node, tag.replace(role=role, pass_name="hpz_secondary"))
    return node


def _add_secondary(gm: fx.GraphModule, marker: fx.Node, sec) -> fx.Node:
    """Insert the secondary shard after ``marker`` (saved for the backward)
    and the backward's gather of it (recomputed there); returns the gather."""
    graph = gm.graph
    vals: list = []

    def record(_role, value, **_tag):
        vals.append(value)
        return value

    val = marker.meta.get("val")
    _fake_val(lambda v: secondary_shard(v, sec, record), val)
    vals += [None] * (2 - len(vals))
    with graph.inserting_after(marker):
        part = _new_node(graph, marker, torch.ops.aten.slice.Tensor, (marker, 0, *secondary_rows(sec)),
                         "secondary", CheckpointPolicy.MUST_RECOMPUTE, vals[0])
    with graph.inserting_after(part):
        saved = _new_node(graph, marker, torch.ops.aten.clone.default, (part,), "secondary",
                          CheckpointPolicy.MUST_SAVE, vals[1])
    saved.kwargs = {"memory_format": torch.contiguous_format}
    with graph.inserting_after(saved):
        return _new_node(graph, marker, HPZ_UNSHARD, (saved, marker.args[1], marker.args[2]), "unshard",
                         CheckpointPolicy.MUST_RECOMPUTE, _fake_val(torch.clone, val))


def hpz_secondary(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    state = ctx.state
    if state is None or not ctx.plan.zero.zeropp.hpz or state.node_groups is None:
        return PassResult()
    node_group = state.node_groups.node
    secondary, elements, copied = [], 0, 0
    for marker in [n for n in gm.graph.nodes if n.target is UNSHARD]:
        spec = state.specs.get(marker.args[2])
        if spec is None or spec.storage != "sharded" or not _recomputed(marker):
            continue
        closure = _recompute_closure(marker)
        if not _backward_users(closure):
            continue
        sec = secondary_spec(spec, node_group)
        copies = {marker: _add_secondary(gm, marker, sec)}
        for node in closure[1:]:
            with gm.graph.inserting_after(node):
                copies[node] = gm.graph.node_copy(node, lambda a: copies.get(a, a))
            copied += 1
        for node in closure:
            for user in list(node.users):
                if _phase(user) == "backward":
                    user.replace_input_with(node, copies[node])
        secondary.append(spec.name)
        elements += sec.local_rows * sec.row_numel
    if not secondary:
        return PassResult()
    gm.graph.lint()
    gm.recompile()
    return PassResult(changed=True, details={"secondary": secondary, "secondary_elements": elements,
                                             "copied": copied})
