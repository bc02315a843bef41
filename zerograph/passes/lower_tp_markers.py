"""``lower_tp_markers`` (forward, backward and inference graphs): tensor
parallelism's markers become collectives.

``tp_all_reduce(x)`` (after a row-split linear in the forward, and the
backward of ``tp_copy`` in front of a column-split group) becomes::

    all_reduce = _c10d_functional.all_reduce(x, 'sum', <tp group>)   # all_reduce, mesh_dim "tp"
    wait_tensor = _c10d_functional.wait_tensor(all_reduce)

``tp_all_reduce_max`` (the vocab-parallel cross-entropy's row maxima) the
same with ``'max'``; and ``tp_copy(x)`` (an identity in the forward) becomes ``x``. A
``tp_all_gather`` (a split value a graph returns) becomes an
``all_gather_into_tensor`` along dim 0 and, for fused parts, the reordering
of the gathered blocks. The
collectives are tagged with ``mesh_dim="tp"``, so ``comm_analysis`` and
``zerograph.inspect`` count their bytes as ``tp_all_reduce``.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from zerograph._torch_private import c10d_functional
from zerograph.graph.expand import expand_node
from zerograph.graph.tags import NodeTag, get_tag, set_tag
from zerograph.graph.tp_markers import TP_ALL_GATHER, TP_ALL_REDUCE, TP_ALL_REDUCE_MAX, TP_COPY
from zerograph.passes.manager import PassContext, PassResult

aten = torch.ops.aten


def _gather_ops(x, dim: int, parts: list[int], tp: int, group: str, emit):
    """The whole tensor from every rank's slice ``x`` along ``dim`` (fused
    ``parts``): all-gather along dim 0, then each part's blocks in rank order."""
    if dim != 0:
        x = emit("comm_prep", aten.movedim.int(x, dim, 0))
    x = emit("comm_prep", aten.clone.default(x, memory_format=torch.contiguous_format))
    x = emit("all_gather", c10d_functional.all_gather_into_tensor.default(x, tp, group))
    x = emit("wait", c10d_functional.wait_tensor.default(x))
    if len(parts) > 1:
        local = [p // tp for p in parts]
        rows, pieces, offset = sum(local), [], 0
        for size in local:
            for r in range(tp):
                start = r * rows + offset
                pieces.append(emit("comm_prep", aten.slice.Tensor(x, 0, start, start + size)))
            offset += size
        x = emit("comm_prep", aten.cat.default(pieces))
    if dim != 0:
        x = emit("comm_prep", aten.movedim.int(x, 0, dim))
    return x


def _lower_gather(gm: fx.GraphModule, node: fx.Node, tp: int, group: str, base: NodeTag) -> None:
    x, _tag, dim, parts = node.args
    expand_node(gm, node, x, lambda value, emit: _gather_ops(value, dim, list(parts), tp, group, emit),
                lambda role: base.replace(role=role, param=None, bucket=(), pass_name="lower_tp_markers",
                                          mesh_dim="tp"))


def lower_tp_markers(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    state = ctx.state
    if state is None or getattr(state, "tp", None) is None:
        return PassResult()
    group = state.tp.group_name
    counts = {"tp_all_reduce": 0, "tp_copy": 0, "tp_all_gather": 0}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (TP_ALL_REDUCE, TP_ALL_REDUCE_MAX, TP_COPY, TP_ALL_GATHER):
            continue
        if node.target is TP_ALL_GATHER:
            base = get_tag(node) or NodeTag(phase="backward" if ctx.phase == "backward" else "forward")
            _lower_gather(gm, node, state.tp.world_size, group, base)
            counts["tp_all_gather"] += 1
            continue
        if node.target is TP_COPY:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            counts["tp_copy"] += 1
            continue
        base = get_tag(node) or NodeTag(phase="backward" if ctx.phase == "backward" else "forward")
        with gm.graph.inserting_before(node):
            start = gm.graph.call_function(c10d_functional.all_reduce.default,
                                            (node.args[0], "max" if node.target is TP_ALL_REDUCE_MAX else "sum", group))
            wait = gm.graph.call_function(c10d_functional.wait_tensor.default, (start,))
        for new, role in ((start, "all_reduce"), (wait, "wait")):
            if "val" in node.meta:
                new.meta["val"] = node.meta["val"]
            set_tag(new, base.replace(role=role, param=None, bucket=(), pass_name="lower_tp_markers", mesh_dim="tp"))
        node.replace_all_uses_with(wait)
        gm.graph.erase_node(node)
        counts["tp_all_reduce"] += 1
    if any(counts.values()):
        gm.recompile()
    return PassResult(changed=any(counts.values()), details=counts)
