"""``lower_markers`` (forward, backward and inference graphs): markers become collectives.

Replaces every
marker with the op sequence of :mod:`zerograph.graph.collectives`. On a stage-3
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

import torch.fx as fx

from zerograph.graph import collectives
from zerograph._torch_private import detect_fake_mode
from zerograph.graph.tags import NodeTag, get_tag, set_tag
from zerograph.graph.hpz import HPZ_UNSHARD, secondary_spec
from zerograph.planner.buckets import GATHER_MARKERS, plan_buckets
from zerograph.passes.manager import PassContext, PassResult


def _emit_into(base_tag: NodeTag, params: tuple[str, ...], new_nodes: list, group: str = "dp"):
    def emit(role: str, proxy, location: str = "device"):
        node = proxy.node
        param = params[0] if len(params) == 1 else None
        set_tag(node, base_tag.replace(role=role, param=param, bucket=params, pass_name="lower_markers",
                                       location=location, group=group))
        new_nodes.append(node)
        return proxy

    return emit


def _fake_values(fn, values: list, specs):
    """Run the same sequence on the fake inputs to get every new node's ``val``."""
    out: list = []

    def record(_role, v, **_tag):
        out.append(v)
        return v

    mode = detect_fake_mode(values)
    if mode is None:
        return None
    with mode:
        fn(values, specs, record)
    return out


def _hoist_before(node: fx.Node, anchor: fx.Node, order: dict[fx.Node, int]) -> None:
    """Move ``node`` (and the inputs it needs) in front of ``anchor``."""
    if node.op == "placeholder" or order[node] < order[anchor]:
        return
    for arg in node.all_input_nodes:
        _hoist_before(arg, anchor, order)
    anchor.prepend(node)
    order[node] = order[anchor] - 0.5


def _sink_after(node: fx.Node, anchor: fx.Node, order: dict[fx.Node, int]) -> fx.Node:
    """Move the users of ``node`` that come before ``anchor`` to after it."""
    last = anchor
    for user in list(node.users):
        if user.op != "output" and order.get(user, float("inf")) < order[anchor]:
            last.append(user)
            order[user] = order[last] + 0.5
            last = _sink_after(user, user, order) if user.users else user
    return last


def _per_param(fn):
    def single(values, specs, emit):
        return [fn(values[0], specs[0], emit)]

    return single


def _lower_bucket(gm: fx.GraphModule, bucket: list[fx.Node], spec_of, phase: str) -> None:
    graph = gm.graph
    gather = bucket[0].target in GATHER_MARKERS
    bucket_specs = [spec_of(n) for n in bucket]
    if len(bucket) == 1:
        fn = _per_param(collectives.gather_param if gather else collectives.reduce_param_grad)
    else:
        fn = collectives.gather_bucket if gather else collectives.reduce_bucket
    order = {n: i for i, n in enumerate(graph.nodes)}
    # gathers go where the first member is needed; reductions where the last gradient is ready
    anchor = bucket[0] if gather else bucket[-1]
    sources = [n.args[0] for n in bucket]
    if gather:
        for src in sources:
            _hoist_before(src, anchor, order)
    base = get_tag(anchor) or NodeTag(phase="backward" if phase == "backward" else "forward")
    params = tuple(spec.name for spec in bucket_specs)
    new_nodes: list[fx.Node] = []
    tracer = fx.proxy.GraphAppendingTracer(graph)
    with graph.inserting_before(anchor):
        outs = fn([fx.Proxy(src, tracer) for src in sources], bucket_specs,
                  _emit_into(base, params, new_nodes, bucket_specs[0].comm_group))
    fake = _fake_values(fn, [src.meta.get("val") for src in sources], bucket_specs)
    if fake is not None:
        for new, val in zip(new_nodes, fake):
            new.meta["val"] = val
    for i, node in enumerate(graph.nodes):
        order[node] = i
    for marker, out in zip(bucket, outs):
        marker.replace_all_uses_with(out.node)
        if not gather:
            _sink_after(out.node, new_nodes[-1] if new_nodes else anchor, order)
    for marker in bucket:
        graph.erase_node(marker)


def _spec_lookup(state):
    """The spec a marker node communicates: its parameter's, or for hpZ's
    marker the parameter's secondary partition over this rank's node."""
    specs = state.specs

    def spec_of(node: fx.Node):
        spec = specs[node.args[2]]
        if node.target is HPZ_UNSHARD:
            return secondary_spec(spec, state.node_groups.node)
        return spec

    return spec_of


def lower_markers(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    if ctx.state is None:
        return PassResult()
    spec_of = _spec_lookup(ctx.state)
    zero = ctx.config.zero_optimization
    buckets = plan_buckets(gm, spec_of, gather_cap=zero.allgather_bucket_size, reduce_cap=zero.reduce_bucket_size)
    lowered = {"unshard": 0, "reduce_grad": 0, "buckets": 0}
    for bucket in buckets:
        _lower_bucket(gm, bucket, spec_of, ctx.phase)
        lowered["unshard" if bucket[0].target in GATHER_MARKERS else "reduce_grad"] += len(bucket)
        lowered["buckets"] += 1
    gm.recompile()
    return PassResult(changed=bool(buckets), details=lowered)
