"""The built-in pass pipeline, in order."""

from __future__ import annotations

from zerograph.passes.activation_checkpointing import activation_checkpointing
from zerograph.passes.comm_analysis import comm_analysis
from zerograph.passes.dce import dce
from zerograph.passes.dedupe_markers import dedupe_markers
from zerograph.passes.defer_grad_sync import defer_grad_sync
from zerograph.passes.fusion import FUSION_PASSES
from zerograph.passes.liveness import liveness
from zerograph.passes.lower_markers import lower_markers
from zerograph.passes.manager import GraphPass, PassList
from zerograph.passes.reuse_comm_buffers import reuse_comm_buffers
from zerograph.passes.schedule_collectives import schedule_collectives
from zerograph.passes.tag_nodes import tag_nodes
from zerograph.passes.zero_policy import zero_policy


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
