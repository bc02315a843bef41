"""Replace one node by the ops a function emits, with their fake values.

Lowering passes turn a marker node into a short sequence of aten ops and
functional collectives (``lower_tp_markers``' gather, ``lower_sp_markers``'
all-to-all). They describe that sequence once, as ``build(value, emit)``
over a value that is either an ``fx.Proxy`` or a fake tensor;
:func:`expand_node` runs it on proxies to insert the nodes (each tagged by
``tag(role)``), then on the source's fake value to give every new node its
``meta["val"]``::

    y = zerograph.sp_seq_to_heads(x, 'zg0')
        ->  reshape = aten.reshape(x, ...)                 # comm_prep
            all_to_all_single = ...(clone, ...)            # all_to_all
            wait_tensor = ...(all_to_all_single)           # wait
"""

from __future__ import annotations

from typing import Callable

import torch.fx as fx

from zerograph._torch_private import detect_fake_mode
from zerograph.graph.tags import NodeTag, set_tag


def expand_node(gm: fx.GraphModule, node: fx.Node, source: fx.Node, build: Callable,
                tag: Callable[[str], NodeTag]) -> list[fx.Node]:
    """Insert ``build(source, emit)``'s ops before ``node``, route ``node``'s
    users to its result and erase ``node``. ``emit(role, value)`` returns
    ``value`` after recording it (tagged ``tag(role)`` when it is a proxy).
    Returns the new nodes."""
    new_nodes: list[fx.Node] = []

    def emit(role: str, proxy):
        set_tag(proxy.node, tag(role))
        new_nodes.append(proxy.node)
        return proxy

    tracer = fx.proxy.GraphAppendingTracer(gm.graph)
    with gm.graph.inserting_before(node):
        out = build(fx.Proxy(source, tracer), emit)
    fake = source.meta.get("val")
    mode = detect_fake_mode([fake]) if fake is not None else None
    if mode is not None:
        vals: list = []
        with mode:
            build(fake, lambda _role, value: vals.append(value) or value)
        for new, val in zip(new_nodes, vals):
            new.meta["val"] = val
    node.replace_all_uses_with(out.node)
    gm.graph.erase_node(node)
    return new_nodes
