"""The ZeRO passes: policy on the joint graph, mechanism on the partitioned graphs.

``zero_policy`` (joint graph) decides, per ``unshard`` marker, whether the
gathered parameter is kept from forward to backward:

* stage 3: the marker and its view/cast chain are tagged ``MUST_RECOMPUTE``,
  so the partitioner saves only the shard and the backward graph gets its own
  copy of the marker (a second all-gather);
* stages 0-2: untagged, so the partitioner saves what eager autograd would
  (the gathered parameter lives from forward into backward, as in ZeRO-1/2).

``lower_markers`` (forward, backward and inference graphs) replaces every
marker with the op sequence of :mod:`zerograph.collectives`. On a stage-3
linear layer the forward goes from::

    unshard = zerograph.unshard(primals_1, 'zg0', 'fc.weight')
    t = aten.t(unshard)

to::

    all_gather_into_tensor = _c10d_functional.all_gather_into_tensor(primals_1, 2, '0')
    wait_tensor = _c10d_functional.wait_tensor(all_gather_into_tensor)
    t = aten.t(wait_tensor)

and the backward's ``reduce_grad`` becomes ``reduce_scatter_tensor`` + ``wait_tensor``
+ ``mul`` by ``1 / (world_size * gradient_accumulation_steps)``.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.utils.checkpoint import CheckpointPolicy

from zerograph import collectives
from zerograph._torch_private import detect_fake_mode
from zerograph.metadata import NodeTag, get_tag, set_tag
from zerograph.ops import REDUCE_GRAD, UNSHARD
from zerograph.passes.manager import PassContext, PassResult


def zero_policy(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    if ctx.sharding is None or ctx.config.zero_optimization.stage < 3:
        return PassResult()
    recompute = 0
    for node in gm.graph.nodes:
        tag = get_tag(node)
        if tag is None or tag.phase != "forward" or tag.param is None:
            continue
        spec = ctx.sharding.specs.get(tag.param)
        if spec is None or spec.storage != "sharded":
            continue
        if tag.role == "unshard" or (tag.role == "compute" and node.op == "call_function"):
            node.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
            recompute += 1
    return PassResult(changed=recompute > 0, details={"must_recompute": recompute})


def _emit_into(graph: fx.Graph, base_tag: NodeTag, pass_name: str, new_nodes: list):
    def emit(role: str, proxy):
        node = proxy.node
        set_tag(node, base_tag.replace(role=role, pass_name=pass_name))
        new_nodes.append(node)
        return proxy

    return emit


def _fake_values(fn, value, spec):
    """Run the same sequence on the fake input to get every new node's ``val``."""
    vals: list = []

    def record(_role, v):
        vals.append(v)
        return v

    mode = detect_fake_mode([value])
    if mode is None:
        return None
    with mode:
        fn(value, spec, record)
    return vals


def lower_markers(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    if ctx.sharding is None:
        return PassResult()
    specs = ctx.sharding.specs
    lowered = {"unshard": 0, "reduce_grad": 0}
    graph = gm.graph
    for node in list(graph.nodes):
        if node.target is UNSHARD:
            fn, role = collectives.gather_param, "unshard"
        elif node.target is REDUCE_GRAD:
            fn, role = collectives.reduce_param_grad, "reduce_grad"
        else:
            continue
        spec = specs[node.args[2]]
        source = node.args[0]
        base = get_tag(node) or NodeTag(phase="backward" if ctx.phase == "backward" else "forward")
        new_nodes: list[fx.Node] = []
        tracer = fx.proxy.GraphAppendingTracer(graph)
        with graph.inserting_before(node):
            out = fn(fx.Proxy(source, tracer), spec, _emit_into(graph, base, "lower_markers", new_nodes))
        fake = _fake_values(fn, source.meta.get("val"), spec)
        if fake is not None:
            for new, val in zip(new_nodes, fake):
                new.meta["val"] = val
        replacement = out.node
        node.replace_all_uses_with(replacement)
        for key in ("recompute", "ac_graph_id"):
            node.meta.pop(key, None)
        graph.erase_node(node)
        lowered[role] += 1
    gm.recompile()
    return PassResult(changed=any(lowered.values()), details=lowered)
