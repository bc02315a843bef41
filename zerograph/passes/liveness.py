"""``liveness`` (analysis pass on every partitioned graph): peak live bytes by kind.

The analysis itself is :mod:`zerograph.planner.liveness`; this pass records
its result for one graph alone in the pass record's details.
"""

from __future__ import annotations

import torch.fx as fx

from zerograph.passes.manager import PassContext, PassResult
from zerograph.planner.liveness import KINDS, comm_by_kind, storages, timeline


def liveness(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """The pass: peaks of this graph alone. Without the other graph, every
    forward output counts as saved (``activation``, the loss too) and each
    backward input is its own storage, classed by its tag. Details: ``peak_bytes`` by kind and
    ``comm_elements`` by collective kind."""
    phase = "backward" if ctx.phase == "backward" else "forward"
    out = list(gm.graph.nodes)[-1]
    # without the backward at hand, every forward output counts as saved
    returned = {a.name for a in out.all_input_nodes} if phase == "forward" and ctx.phase != "inference" else set()
    stores, _, _ = storages(gm, phase, saved=returned)
    tl = timeline(gm, phase, stores)
    _, elems = comm_by_kind(gm)
    peak = {k: max((e.live[k] for e in tl), default=0) for k in KINDS}
    details = {"peak_bytes": peak, "comm_elements": elems}
    host = {k: max((e.host[k] for e in tl), default=0) for k in KINDS}
    if any(host.values()):  # offload copies in host memory
        details["host_peak_bytes"] = host
    return PassResult(details=details)
