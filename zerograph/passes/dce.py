"""``dce``: remove nodes whose results nobody uses."""

from __future__ import annotations

import torch.fx as fx

from zerograph.passes.manager import PassContext, PassResult


def dce(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Remove nodes whose results nobody uses."""
    changed = gm.graph.eliminate_dead_code()
    if changed:
        gm.recompile()
    return PassResult(changed=changed)
