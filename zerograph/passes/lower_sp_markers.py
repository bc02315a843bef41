"""``lower_sp_markers`` (forward, backward and inference graphs): sequence
parallelism's markers become functional collectives on the sp group.

``sp_seq_to_heads(x)`` (``x``: ``[b, h, s/sp, d]``) becomes::

    reshape = aten.reshape(x, [b, sp, h/sp, s/sp, d])      # comm_prep
    permute = aten.permute(view, [1, 0, 2, 3, 4])            # chunk j: the heads rank j gets
    clone = aten.clone(permute)                              # contiguous send buffer
    all_to_all_single = _c10d_functional.all_to_all_single(clone, [1]*sp, [1]*sp, <sp group>)  # sp all_to_all
    wait_tensor = _c10d_functional.wait_tensor(all_to_all_single)
    permute_1 = aten.permute(wait_tensor, [1, 2, 0, 3, 4])  # sequence shards in rank order
    clone_1 = aten.clone(permute_1); view_1 = aten.view(clone_1, [b, h/sp, s, d])

``sp_heads_to_seq`` is the mirror image, and ``sp_all_reduce`` an
``all_reduce`` + ``wait_tensor``. Every collective is tagged
``mesh_dim="sp"``, so ``comm_analysis`` and ``zerograph.inspect`` count its
bytes as ``sp_all_to_all`` / ``sp_all_reduce``.
"""

from __future__ import annotations

import torch.fx as fx

from zerograph._torch_private import c10d_functional
from zerograph.graph.expand import expand_node
from zerograph.graph.sp_ops import SP_ALL_REDUCE, SP_HEADS_TO_SEQ, SP_MARKERS, heads_to_seq_ops, seq_to_heads_ops
from zerograph.graph.tags import NodeTag, get_tag
from zerograph.passes.manager import PassContext, PassResult


def _lower(gm: fx.GraphModule, node: fx.Node, sp: int, group: str, base: NodeTag) -> None:
    x = node.args[0]

    def exchange(buf, emit):
        start = emit("all_to_all", c10d_functional.all_to_all_single.default(buf, [1] * sp, [1] * sp, group))
        return emit("wait", c10d_functional.wait_tensor.default(start))

    def reduce(buf, emit):
        start = emit("all_reduce", c10d_functional.all_reduce.default(buf, "sum", group))
        return emit("wait", c10d_functional.wait_tensor.default(start))

    def build(value, emit):
        if node.target is SP_ALL_REDUCE:
            return reduce(value, emit)
        ops = heads_to_seq_ops if node.target is SP_HEADS_TO_SEQ else seq_to_heads_ops
        return ops(value, tuple(x.meta["val"].shape), sp, lambda buf: exchange(buf, emit), emit)

    expand_node(gm, node, x, build, lambda role: base.replace(role=role, param=None, bucket=(),
                                                              pass_name="lower_sp_markers", mesh_dim="sp"))


def lower_sp_markers(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    state = ctx.state
    if state is None or getattr(state, "sp", None) is None:
        return PassResult()
    counts = {"sp_all_to_all": 0, "sp_all_reduce": 0}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in SP_MARKERS:
            continue
        base = get_tag(node) or NodeTag(phase="backward" if ctx.phase == "backward" else "forward")
        _lower(gm, node, state.sp.world_size, state.sp.group_name, base)
        counts["sp_all_reduce" if node.target is SP_ALL_REDUCE else "sp_all_to_all"] += 1
    if any(counts.values()):
        gm.recompile()
    return PassResult(changed=any(counts.values()), details=counts)
