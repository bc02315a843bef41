"""Trace-time tagging: every node gets a :class:`~zerograph.graph.tags.NodeTag`.

* ``phase``: on the joint graph, a node is in the backward iff it depends on a
  tangent input; on partitioned graphs, the graph's own phase.
* ``module_path`` and ``layer``: from Dynamo's ``nn_module_stack``.
* ``role`` and ``param``: marker ops name their parameter; the chain of
  views and casts computed only from one gathered parameter in the forward
  inherits that parameter's name (so policies can find "everything that is
  just the full parameter").
"""

from __future__ import annotations

import torch
import torch.fx as fx

from zerograph._torch_private import is_view_op
from zerograph.graph.tags import NodeTag, get_tag, layer_of, module_path_from_meta, set_tag
from zerograph.graph.markers import REDUCE_GRAD, UNSHARD
from zerograph.passes.manager import PassContext, PassResult

_CASTS = {
    torch.ops.aten._to_copy.default,
    torch.ops.aten.clone.default,
    torch.ops.prims.convert_element_type.default,
}


def is_view_or_cast(node: fx.Node) -> bool:
    target = node.target
    if target in _CASTS:
        return True
    return is_view_op(target)


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes]


def _backward_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    seeds = [n for n in gm.graph.nodes if n.op == "placeholder" and n.name.startswith("tangents")]
    seen: set[fx.Node] = set()
    stack = list(seeds)
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(u for u in n.users if u.op != "output")
    return seen


def tag_nodes(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    backward = _backward_nodes(gm) if ctx.phase == "joint" else set()
    graph_phase = "backward" if ctx.phase == "backward" else "forward"
    param_of: dict[fx.Node, str] = {}
    counts = {"unshard": 0, "reduce_grad": 0, "param_chain": 0}
    for node in gm.graph.nodes:
        phase = ("backward" if node in backward else "forward") if ctx.phase == "joint" else graph_phase
        old = get_tag(node)
        path = module_path_from_meta(node) or (old.module_path if old else None)
        role, param = (old.role, old.param) if old else ("compute", None)
        if node.target is UNSHARD or node.target is REDUCE_GRAD:
            role = "unshard" if node.target is UNSHARD else "reduce_grad"
            param = node.args[2]
            counts[role] += 1
        elif role == "compute" and phase == "forward" and is_view_or_cast(node):
            sources = {param_of.get(a) for a in _tensor_inputs(node)}
            if len(sources) == 1 and None not in sources:
                param = sources.pop()
                counts["param_chain"] += 1
        if param is not None and phase == "forward":
            param_of[node] = param
        set_tag(
            node,
            NodeTag(
                phase=phase,
                role=role,
                module_path=path,
                layer=layer_of(path),
                param=param,
                pass_name=old.pass_name if old else None,
                location=old.location if old else "device",
                mesh_dim=old.mesh_dim if old else "dp",
            ),
        )
    return PassResult(changed=False, details=counts)
