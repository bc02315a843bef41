"""Rewrite ``aten._to_copy`` into the ops Inductor's decomposition traces to.

zerograph's passes insert ``aten._to_copy`` after AOTAutograd traced with
Inductor's decompositions (the ``host_copy`` of offload_param, the dtype casts
of mixed precision), and Inductor has no lowering for it. Before Inductor
compiles a graph, a copy of it gets::

    _to_copy = aten._to_copy(x, dtype=torch.bfloat16)            # before
    convert_element_type = prims.convert_element_type(x, torch.bfloat16)  # after
"""

from __future__ import annotations

import torch


def decompose_copies(gm) -> int:
    """Replace every ``aten._to_copy`` node of ``gm`` by what Inductor's
    decomposition of it traces to: ``prims.device_put`` for a device change,
    ``prims.convert_element_type`` for a dtype change (on the source device
    when copying to the CPU, as the decomposition does), ``aten.clone`` when
    neither changes (a cpu -> cpu host copy on a CPU-only machine). Node
    metadata (zerograph's tags, ``val``) is kept on the last new node.
    Returns the number of nodes replaced."""
    prims, aten = torch.ops.prims, torch.ops.aten
    graph = gm.graph
    replaced = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not aten._to_copy.default:
            continue
        # pin_memory (offload_activations' host copies on CUDA): Inductor's own
        # decomposition has no pinned buffers; the copy is made, unpinned
        unsupported = set(node.kwargs) - {"dtype", "device", "non_blocking", "pin_memory"}
        if unsupported or len(node.args) != 1 or "val" not in node.args[0].meta:
            raise NotImplementedError(f"zerograph: cannot decompose {node.format_node()} for Inductor")
        source = node.args[0]
        src, out = source.meta["val"], node.meta["val"]
        steps = []  # (op, extra args, fake value)
        value = src
        dtype_first = out.dtype != value.dtype and out.device != value.device and out.device.type == "cpu"
        if dtype_first:
            value = prims.convert_element_type.default(value, out.dtype)
            steps.append((prims.convert_element_type.default, (out.dtype,), value))
        if out.device != value.device:
            value = prims.device_put.default(value, out.device, node.kwargs.get("non_blocking", False))
            steps.append((prims.device_put.default, (out.device, node.kwargs.get("non_blocking", False)), value))
        if out.dtype != value.dtype:
            value = prims.convert_element_type.default(value, out.dtype)
            steps.append((prims.convert_element_type.default, (out.dtype,), value))
        if not steps:
            steps.append((aten.clone.default, (), aten.clone.default(value)))
        current = source
        with graph.inserting_before(node):
            for op, extra, val in steps:
                current = graph.call_function(op, (current, *extra))
                current.meta["val"] = val
        current.meta.update({k: v for k, v in node.meta.items() if k != "val"})
        node.replace_all_uses_with(current)
        graph.erase_node(node)
        replaced += 1
    if replaced:
        gm.recompile()
    return replaced


