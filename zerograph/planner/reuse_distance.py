"""Stage-3 residency policy: which gathered parameters stay resident from
forward to backward (reuse distance, ``stage3_max_reuse_distance`` and
``stage3_max_live_parameters``). An analysis of the joint graph; the
``zero_policy`` pass applies it."""

from __future__ import annotations

import dataclasses

import torch.fx as fx

from zerograph.graph.tags import get_tag


@dataclasses.dataclass(frozen=True)
class ReuseDecision:
    """Whether one gathered parameter stays resident from forward to backward."""

    param: str
    distance: int  # elements of other parameters used between its last forward and first backward use
    gathered: int  # elements of its gathered (padded) buffer
    kept: bool


def reuse_decisions(gm: fx.GraphModule, specs: dict, *, max_reuse_distance: int, max_live: int) -> list[ReuseDecision]:
    """Residency policy on the joint graph (an analysis: it never mutates).

    For each sharded parameter whose gathered value the backward reads, the
    *reuse distance* is the number of elements of the other sharded
    parameters whose gathered values are used (in forward or backward)
    strictly between its last forward use and its first backward use. It is
    kept gathered (no backward re-gather) when ``distance <
    max_reuse_distance``, smallest distance first, while the kept gathered
    elements stay within ``max_live`` (``stage3_max_live_parameters``).
    How early a gather starts (launch distance) is the scheduler's business,
    not this policy's.
    """
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    chains: dict[str, set[fx.Node]] = {}
    for node in gm.graph.nodes:
        tag = get_tag(node)
        if tag is None or tag.phase != "forward" or tag.param is None:
            continue
        spec = specs.get(tag.param)
        if spec is None or spec.storage != "sharded":
            continue
        if tag.role == "unshard" or (tag.role == "compute" and node.op == "call_function"):
            chains.setdefault(tag.param, set()).add(node)
    uses: dict[str, list[tuple[int, str]]] = {}
    for param, chain in chains.items():
        for node in chain:
            for user in node.users:
                if user in chain or user.op == "output":
                    continue
                tag = get_tag(user)
                uses.setdefault(param, []).append((order[user], tag.phase if tag is not None else "forward"))
    decisions = []
    for param, where in uses.items():
        fwd = [i for i, phase in where if phase == "forward"]
        bwd = [i for i, phase in where if phase == "backward"]
        if not fwd or not bwd:
            continue
        lo, hi = max(fwd), min(bwd)
        distance = sum(
            specs[other].numel for other, other_uses in uses.items()
            if other != param and any(lo < i < hi for i, _ in other_uses)
        )
        spec = specs[param]
        decisions.append(ReuseDecision(param, distance, spec.chunk_rows * spec.world_size * spec.row_numel, False))
    kept_total = 0
    out = {}
    for d in sorted(decisions, key=lambda d: (d.distance, d.param)):
        keep = d.distance < max_reuse_distance and kept_total + d.gathered <= max_live
        if keep:
            kept_total += d.gathered
        out[d.param] = dataclasses.replace(d, kept=keep)
    return [out[d.param] for d in decisions]
