"""``defer_grad_sync``: gradient accumulation without a collective per
micro-batch, for ZeRO stages 0 and 1 (which keep full local gradients).

Micro-batches before an accumulation boundary read parameters under the
model's no-sync tag, so Dynamo compiles a second graph variant. In that
variant's backward every gradient marker becomes a local stash::

    reduce_grad(g, 'zg0/nosync', 'fc.weight')
        ->  stash_grad(g, 'zg0/nosync', 'fc.weight')   # zeros shaped like the grad shard

and in the boundary variant the stashed sum joins the last micro-batch's
gradient before the single reduction::

    reduce_grad(g, 'zg0', 'fc.weight')
        ->  reduce_grad(unstash_grad(g, 'zg0', 'fc.weight'), 'zg0', 'fc.weight')

``lower_markers`` then lowers the remaining ``reduce_grad`` markers as usual.
Stages 2 and 3 keep only gradient shards, so they reduce every micro-batch
(as DeepSpeed does); this pass leaves them alone.
"""

from __future__ import annotations

import torch.fx as fx

from zerograph.graph.markers import REDUCE_GRAD, STASH_GRAD, UNSTASH_GRAD
from zerograph.passes.manager import PassResult


def _copy_meta(new: fx.Node, like: fx.Node, val) -> None:
    new.meta.update({k: v for k, v in like.meta.items() if k != "val"})
    new.meta["val"] = val


def defer_grad_sync(gm: fx.GraphModule, ctx) -> PassResult:
    sharding = ctx.state
    if sharding is None or not sharding.defers_grad_sync:
        return PassResult()
    stashed, merged = [], []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not REDUCE_GRAD:
            continue
        grad, tag, name = node.args
        with gm.graph.inserting_before(node):
            if tag == sharding.nosync_tag:
                new = gm.graph.call_function(STASH_GRAD, (grad, tag, name))
                _copy_meta(new, node, node.meta.get("val"))
                node.replace_all_uses_with(new)
                gm.graph.erase_node(node)
                stashed.append(name)
            else:
                total = gm.graph.call_function(UNSTASH_GRAD, (grad, tag, name))
                _copy_meta(total, node, grad.meta.get("val"))
                node.replace_input_with(grad, total)
                merged.append(name)
    if stashed or merged:
        gm.recompile()
    return PassResult(changed=bool(stashed or merged), details={"stashed": stashed, "reduced_with_stash": merged})
