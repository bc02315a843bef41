"""Analyses: read the graph, never change it."""

from __future__ import annotations

from collections import Counter

import torch.fx as fx

from zerograph.graph.tags import COLLECTIVE_ROLES, get_tag
from zerograph.passes.manager import PassContext, PassResult
from zerograph.runtime.hierarchy import scope_of
from zerograph.runtime.stats import collective_buffer_bytes


def _nbytes(val) -> int:
    return val.numel() * val.element_size() if val is not None and hasattr(val, "numel") else 0


def comm_bytes(gm: fx.GraphModule) -> dict[str, int]:
    """Bytes of the full buffer of every collective in ``gm``, by kind
    (``"all_reduce"``; ``"tp_all_reduce"`` for one over the tensor-parallel ranks)."""
    out: Counter = Counter()
    for node in gm.graph.nodes:
        tag = get_tag(node)
        if tag is None or tag.role not in COLLECTIVE_ROLES:
            continue
        in_val = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
        kind = tag.role if tag.mesh_dim == "dp" else f"{tag.mesh_dim}_{tag.role}"
        out[kind] += collective_buffer_bytes(tag.role, _nbytes(in_val), _nbytes(node.meta.get("val")))
    return dict(out)


def comm_bytes_by_scope(gm: fx.GraphModule) -> dict[str, dict[str, int]]:
    """:func:`comm_bytes` split by scope: collectives on the node group
    (``NodeTag.group == "node"``) are ``"intra_group"``, the others
    ``"cross_group"`` (:mod:`zerograph.runtime.hierarchy`); scopes without
    traffic are left out."""
    out: dict[str, Counter] = {}
    for node in gm.graph.nodes:
        tag = get_tag(node)
        if tag is None or tag.role not in COLLECTIVE_ROLES:
            continue
        in_val = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
        nbytes = collective_buffer_bytes(tag.role, _nbytes(in_val), _nbytes(node.meta.get("val")))
        out.setdefault(scope_of(tag.group), Counter())[tag.role] += nbytes
    return {scope: dict(counts) for scope, counts in out.items()}


def comm_analysis(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    return PassResult(details={"comm_bytes": comm_bytes(gm), "comm_bytes_by_scope": comm_bytes_by_scope(gm)})
