"""Graph verification, run after every pass when ``zerograph.verify_graphs`` is set."""

from __future__ import annotations

import torch.fx as fx

from zerograph._torch_private import c10d_functional
from zerograph.graph.tags import COLLECTIVE_ROLES, get_tag


class GraphVerificationError(AssertionError):
    pass


def verify_graph(gm: fx.GraphModule, where: str) -> None:
    """Lint the graph and check zerograph's invariants on collectives:
    every collective is tagged and is waited on exactly once before any use."""
    try:
        gm.graph.lint()
    except Exception as exc:  # lint raises plain RuntimeError/AssertionError
        raise GraphVerificationError(f"invalid graph {where}: {exc}") from exc
    wait = c10d_functional.wait_tensor.default
    for node in gm.graph.nodes:
        if node.target is wait:
            continue
        tag = get_tag(node)
        is_collective = tag is not None and tag.role in COLLECTIVE_ROLES
        if getattr(node.target, "namespace", None) == "_c10d_functional" and not is_collective:
            raise GraphVerificationError(f"untagged collective {node.name} {where}")
        if is_collective:
            users = list(node.users)
            if len(users) != 1 or users[0].target is not wait:
                raise GraphVerificationError(
                    f"collective {node.name} {where} must have exactly one user, its wait_tensor; has {users}"
                )
