"""``zero_policy`` (joint graph): what the partitioner keeps from forward to backward.

Per ``unshard`` marker, whether the gathered parameter is kept:

* stage 3: the marker and its view/cast chain are tagged ``MUST_RECOMPUTE``,
  so the partitioner saves only the shard and the backward graph gets its own
  copy of the marker (a second all-gather), except the parameters that
  :func:`zerograph.planner.reuse_distance.reuse_decisions` keeps resident;
* stages 0-2: untagged, so the partitioner saves what eager autograd would
  (the gathered parameter lives from forward into backward, as in ZeRO-1/2).
"""

from __future__ import annotations

import torch.fx as fx
from torch.utils.checkpoint import CheckpointPolicy

from zerograph.graph.tags import get_tag
from zerograph.passes.manager import PassContext, PassResult
from zerograph.planner.reuse_distance import reuse_decisions


def zero_policy(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Stage 3: tag every gathered parameter's marker and view/cast chain
    ``MUST_RECOMPUTE`` (the backward re-gathers it), except the parameters
    that :func:`reuse_decisions` keeps resident (``stage3_max_reuse_distance``).

    Details: ``must_recompute`` (nodes tagged), ``kept`` (parameters kept
    gathered from forward to backward) and ``kept_gather_elements`` (the
    backward all-gather elements per micro-batch this saves)."""
    if ctx.state is None or not ctx.plan.zero.regathers_in_backward:
        return PassResult()
    zero = ctx.config.zero_optimization
    decisions = reuse_decisions(gm, ctx.state.specs, max_reuse_distance=zero.stage3_max_reuse_distance,
                                max_live=zero.stage3_max_live_parameters)
    kept = {d.param for d in decisions if d.kept}
    recompute = 0
    for node in gm.graph.nodes:
        tag = get_tag(node)
        if tag is None or tag.phase != "forward" or tag.param is None or tag.param in kept:
            continue
        spec = ctx.state.specs.get(tag.param)
        if spec is None or spec.storage != "sharded":
            continue
        if tag.role == "unshard" or (tag.role == "compute" and node.op == "call_function"):
            node.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
            recompute += 1
    details = {"must_recompute": recompute}
    if kept:
        details["kept"] = sorted(kept)
        details["kept_gather_elements"] = sum(d.gathered for d in decisions if d.kept)
    return PassResult(changed=recompute > 0, details=details)

