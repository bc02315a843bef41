"""ZeRO++'s rank hierarchy: nodes of consecutive data-parallel ranks.

With ``zero_optimization.zero_hpz_partition_size`` ``k`` (``ZeroPPPlan.node_size``),
the ``W`` data-parallel ranks form ``W / k`` nodes of ``k`` consecutive ranks
(on one machine, simulated nodes). Each rank belongs to two subgroups:

* its **node** group: the ``k`` ranks of its node (hpZ's backward all-gather,
  qgZ's first hop); its traffic is *intra-group*;
* its **peer** group: the ``W / k`` ranks with its own index inside their
  node, one per node (qgZ's second hop); its traffic is *cross-group*, as is
  every collective on the whole data-parallel group.

Data-parallel rank ``d`` is in node ``d // k`` at index ``d % k``. Every
model creates its own groups (``torch.distributed.new_group`` with local
synchronization: only the member ranks take part, so pipeline stages with
their own data-parallel groups each create theirs).
"""

from __future__ import annotations

import dataclasses
import logging

import torch.distributed as dist

from zerograph.runtime.dist import DataParallelGroup, apply_collective_timeout
from zerograph.runtime.stats import SCOPES  # noqa: F401  (the scopes scope_of returns)

log = logging.getLogger(__name__)

# the label of a collective's process group (NodeTag.group)
GROUP_LABELS = ("dp", "node", "peer")


def scope_of(label: str | None) -> str:
    """``"intra_group"`` for collectives on the node group, else ``"cross_group"``."""
    return "intra_group" if label == "node" else "cross_group"


@dataclasses.dataclass(frozen=True)
class SubGroup:
    """One process group: its name (functional collectives take it), this
    rank's index in it and its size."""

    group_name: str
    rank: int
    size: int


@dataclasses.dataclass(frozen=True)
class NodeGroups:
    """This rank's node and peer groups (module docstring)."""

    node: SubGroup
    peer: SubGroup


def node_groups(dp: DataParallelGroup, node_size: int, timeout_s: float) -> NodeGroups | None:
    """The node and peer groups of this rank on ``dp`` with nodes of
    ``node_size`` ranks (collective over ``dp``'s ranks); ``None`` when there
    is no hierarchy (one rank, or nodes of one rank)."""
    if dp.world_size <= 1 or node_size <= 1:
        return None
    if dp.world_size % node_size:
        raise ValueError(f"nodes of {node_size} ranks do not divide the {dp.world_size} data-parallel ranks")
    ranks = dist.get_process_group_ranks(dp.group)
    node, index = divmod(dp.rank, node_size)
    node_ranks = ranks[node * node_size:(node + 1) * node_size]
    peer_ranks = ranks[index::node_size]
    groups = []
    for members in (node_ranks, peer_ranks):
        group = dist.new_group(members, use_local_synchronization=True)
        apply_collective_timeout(group, timeout_s)
        groups.append(SubGroup(group.group_name, members.index(ranks[dp.rank]), len(members)))
    log.info("zerograph ZeRO++: node %d of %d (ranks %s), peers %s", node, dp.world_size // node_size,
             node_ranks, peer_ranks)
    return NodeGroups(node=groups[0], peer=groups[1])
