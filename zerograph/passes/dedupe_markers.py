"""``dedupe_markers`` (Dynamo graph): read each parameter once per graph."""

from __future__ import annotations

import torch
import torch.fx as fx

from zerograph.graph.markers import UNSHARD
from zerograph.passes.manager import PassContext, PassResult


def dedupe_markers(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Read each parameter once per Dynamo graph (runs before AOTAutograd).

    A tied parameter (an embedding shared with the LM head) is read by two
    modules, so the Dynamo graph has two ``unshard`` markers for it. Keeping
    the first makes autograd sum both uses' gradients before the single
    ``reduce_grad``: one gather and one reduction per step instead of two.
    """
    first: dict[tuple, fx.Node] = {}
    removed = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (UNSHARD, torch.ops.zerograph.unshard):
            continue
        key = (node.args[1], node.args[2])
        if key in first:
            node.replace_all_uses_with(first[key])
            gm.graph.erase_node(node)
            removed += 1
        else:
            first[key] = node
    if removed:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return PassResult(changed=removed > 0, details={"removed": removed})
