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
of the gathered blocks. Megatron sequence parallelism's markers
(:mod:`zerograph.graph.tp_seq_markers`): ``tp_seq_gather(x, dim)`` becomes
the same all-gather along ``dim``, ``tp_seq_reduce_scatter(x, dim)`` a
``reduce_scatter_tensor`` of the blocks along ``dim``::

    view = aten.view(x, [b, tp, s/tp, h]); movedim = aten.movedim(view, 1, 0)   # comm_prep
    clone = aten.clone(movedim); view_1 = aten.view(clone, [tp*b, s/tp, h])      # blocks in rank order
    reduce_scatter_tensor = _c10d_functional.reduce_scatter_tensor(view_1, 'sum', tp, <tp group>)
    wait_tensor = _c10d_functional.wait_tensor(reduce_scatter_tensor)           # [b, s/tp, h]

and ``tp_seq_scatter(x, dim)`` this rank's block (``slice`` + ``clone``). The
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
from zerograph.graph.tp_seq_markers import TP_SEQ_GATHER, TP_SEQ_MARKERS, TP_SEQ_REDUCE_SCATTER
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


def _seq_gather_ops(x, dim: int, shape, tp: int, group: str, emit):
    """Every rank's block ``x`` (of ``shape``) concatenated along ``dim``: the
    all-gather stacks them along dim 0, a permuted copy puts them in place
    (the result is contiguous, as the marker's traced value)."""
    x = emit("comm_prep", aten.clone.default(x, memory_format=torch.contiguous_format))
    x = emit("all_gather", c10d_functional.all_gather_into_tensor.default(x, tp, group))
    x = emit("wait", c10d_functional.wait_tensor.default(x))
    if dim == 0:
        return x
    x = emit("comm_prep", aten.view.default(x, [tp, *shape]))
    x = emit("comm_prep", aten.movedim.int(x, 0, dim))
    x = emit("comm_prep", aten.clone.default(x, memory_format=torch.contiguous_format))
    whole = list(shape)
    whole[dim] *= tp
    return emit("comm_prep", aten.view.default(x, whole))


def _seq_reduce_scatter_ops(x, dim: int, shape, tp: int, group: str, emit):
    """This rank's block along ``dim`` of the sum of ``x`` (of ``shape``)
    over the tp ranks: the blocks are stacked along dim 0 by a permuted copy,
    then reduce-scattered (the result is contiguous)."""
    if dim != 0:
        blocks = list(shape)
        blocks[dim] //= tp
        x = emit("comm_prep", aten.view.default(x, [*shape[:dim], tp, *blocks[dim:]]))
        x = emit("comm_prep", aten.movedim.int(x, dim, 0))
    x = emit("comm_prep", aten.clone.default(x, memory_format=torch.contiguous_format))
    if dim != 0:
        x = emit("comm_prep", aten.view.default(x, [tp * shape[0], *blocks[1:]]))
    x = emit("reduce_scatter", c10d_functional.reduce_scatter_tensor.default(x, "sum", tp, group))
    return emit("wait", c10d_functional.wait_tensor.default(x))


def _scatter_ops(x, dim: int, tp: int, index: int, shape, emit):
    """This rank's block of ``x`` along ``dim`` (no traffic)."""
    n = shape[dim] // tp
    x = emit("comm_prep", aten.slice.Tensor(x, dim, index * n, (index + 1) * n))
    return emit("comm_prep", aten.clone.default(x, memory_format=torch.contiguous_format))


def _lower_seq(gm: fx.GraphModule, node: fx.Node, state, base: NodeTag) -> None:
    x, _tag, dim = node.args
    tp, group = state.tp.world_size, state.tp.group_name
    shape = list(x.meta["val"].shape)

    def build(value, emit):
        if node.target is TP_SEQ_GATHER:
            return _seq_gather_ops(value, dim, shape, tp, group, emit)
        if node.target is TP_SEQ_REDUCE_SCATTER:
            return _seq_reduce_scatter_ops(value, dim, shape, tp, group, emit)
        return _scatter_ops(value, dim, tp, state.tp.rank, shape, emit)

    expand_node(gm, node, x, build, lambda role: base.replace(role=role, param=None, bucket=(),
                                                              pass_name="lower_tp_markers", mesh_dim="tp"))


def _lower_gather(gm: fx.GraphModule, node: fx.Node, tp: int, group: str, base: NodeTag) -> None:
    x, _tag, dim, parts = node.args
    if len(parts) == 1:  # one part (a sequence shard, a value split once): the contiguous gather
        shape = list(x.meta["val"].shape)
        build = lambda value, emit: _seq_gather_ops(value, dim, shape, tp, group, emit)  # noqa: E731
    else:
        build = lambda value, emit: _gather_ops(value, dim, list(parts), tp, group, emit)  # noqa: E731
    expand_node(gm, node, x, build,
                lambda role: base.replace(role=role, param=None, bucket=(), pass_name="lower_tp_markers",
                                          mesh_dim="tp"))


def lower_tp_markers(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    state = ctx.state
    if state is None or getattr(state, "tp", None) is None:
        return PassResult()
    group = state.tp.group_name
    counts = {"tp_all_reduce": 0, "tp_copy": 0, "tp_all_gather": 0, "tp_seq": 0}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (TP_ALL_REDUCE, TP_ALL_REDUCE_MAX, TP_COPY, TP_ALL_GATHER,
                                                             *TP_SEQ_MARKERS):
            continue
        if node.target in TP_SEQ_MARKERS:
            _lower_seq(gm, node, state, get_tag(node) or NodeTag(phase="backward" if ctx.phase == "backward"
                                                                  else "forward"))
            counts["tp_seq"] += 1
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
