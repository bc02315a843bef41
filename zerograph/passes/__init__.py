"""zerograph's graph passes and the default pipeline (order is data)."""

from __future__ import annotations

from zerograph.passes.accumulation import defer_grad_sync
from zerograph.passes.analysis import comm_analysis
from zerograph.passes.checkpointing import activation_checkpointing
from zerograph.passes.liveness import liveness
from zerograph.passes.fusion import FUSION_PASSES
from zerograph.passes.inplace import reuse_comm_buffers
from zerograph.passes.manager import GraphPass, PassContext, PassList, PassRecord, PassResult, run_passes
from zerograph.passes.scheduling import schedule_collectives
from zerograph.passes.tagging import tag_nodes
from zerograph.passes.zero import dedupe_markers, lower_markers, zero_policy

__all__ = [
    "GraphPass",
    "PassContext",
    "PassList",
    "PassRecord",
    "PassResult",
    "default_passes",
    "run_passes",
]


def dce(gm, ctx) -> PassResult:
    """Remove nodes whose results nobody uses."""
    changed = gm.graph.eliminate_dead_code()
    if changed:
        gm.recompile()
    return PassResult(changed=changed)


def default_passes() -> PassList:
    """The built-in pipeline, in order."""
    return PassList(
        [
            GraphPass("dedupe_markers", dedupe_markers, phases=("dynamo",)),
            *(GraphPass(name, fn, phases=("dynamo",)) for name, fn in FUSION_PASSES),
            GraphPass("tag_nodes", tag_nodes, phases=("joint", "forward", "backward", "inference")),
            GraphPass("zero_policy", zero_policy, phases=("joint",)),
            GraphPass("activation_checkpointing", activation_checkpointing, phases=("joint",)),
            GraphPass("defer_grad_sync", defer_grad_sync, phases=("backward",)),
            GraphPass("lower_markers", lower_markers),
            GraphPass("schedule_collectives", schedule_collectives),
            GraphPass("dce", dce),
            GraphPass("reuse_comm_buffers", reuse_comm_buffers),
            GraphPass("comm_analysis", comm_analysis, analysis=True),
            GraphPass("liveness", liveness, analysis=True),
        ]
    )
