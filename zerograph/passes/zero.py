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

import dataclasses

import torch
import torch.fx as fx
from torch.utils.checkpoint import CheckpointPolicy

from zerograph import collectives
from zerograph._torch_private import detect_fake_mode
from zerograph.metadata import NodeTag, get_tag, set_tag
from zerograph.ops import UNSHARD
from zerograph.passes.bucketing import plan_buckets
from zerograph.passes.manager import PassContext, PassResult


def dedupe_markers(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Read each parameter once per Dynamo graph (runs before AOTAutograd).

    A tied parameter (an embedding shared with the LM head) is read by two
    modules, so the Dynamo graph has two ``unshard`` markers for it. Keeping
    the first makes autograd sum both uses' gradients before the single
    ``reduce_grad``: one gather and one reduction per step instead of two.
    """
    first: dict[tuple, fx.Node] = {}
    removed = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (UNSHARD, torch.ops.zerograph.unshard):
            continue
        key = (node.args[1], node.args[2])
        if key in first:
            node.replace_all_uses_with(first[key])
            gm.graph.erase_node(node)
            removed += 1
        else:
            first[key] = node
    if removed:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return PassResult(changed=removed > 0, details={"removed": removed})


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


def zero_policy(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Stage 3: tag every gathered parameter's marker and view/cast chain
    ``MUST_RECOMPUTE`` (the backward re-gathers it), except the parameters
    that :func:`reuse_decisions` keeps resident (``stage3_max_reuse_distance``).

    Details: ``must_recompute`` (nodes tagged), ``kept`` (parameters kept
    gathered from forward to backward) and ``kept_gather_elements`` (the
    backward all-gather elements per micro-batch this saves)."""
    if ctx.sharding is None or ctx.config.zero_optimization.stage < 3:
        return PassResult()
    zero = ctx.config.zero_optimization
    decisions = reuse_decisions(gm, ctx.sharding.specs, max_reuse_distance=zero.stage3_max_reuse_distance,
                                max_live=zero.stage3_max_live_parameters)
    kept = {d.param for d in decisions if d.kept}
    recompute = 0
    for node in gm.graph.nodes:
        tag = get_tag(node)
        if tag is None or tag.phase != "forward" or tag.param is None or tag.param in kept:
            continue
        spec = ctx.sharding.specs.get(tag.param)
        if spec is None or spec.storage != "sharded":
            continue
        if tag.role == "unshard" or (tag.role == "compute" and node.op == "call_function"):
            node.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
            recompute += 1
    details = {"must_recompute": recompute}
    if kept:
        details["kept"] = sorted(kept)
        details["kept_gather_elements"] = sum(d.gathered for d in decisions if d.kept)
    return PassResult(changed=recompute > 0, details=details)


def _emit_into(base_tag: NodeTag, params: tuple[str, ...], new_nodes: list):
    def emit(role: str, proxy, location: str = "device"):
        node = proxy.node
        param = params[0] if len(params) == 1 else None
        set_tag(node, base_tag.replace(role=role, param=param, bucket=params, pass_name="lower_markers",
                                       location=location))
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


def _lower_bucket(gm: fx.GraphModule, bucket: list[fx.Node], specs: dict, phase: str) -> None:
    graph = gm.graph
    gather = bucket[0].target is UNSHARD
    bucket_specs = [specs[n.args[2]] for n in bucket]
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
        outs = fn([fx.Proxy(src, tracer) for src in sources], bucket_specs, _emit_into(base, params, new_nodes))
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


def lower_markers(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    if ctx.sharding is None:
        return PassResult()
    specs = ctx.sharding.specs
    zero = ctx.config.zero_optimization
    buckets = plan_buckets(gm, specs, gather_cap=zero.allgather_bucket_size, reduce_cap=zero.reduce_bucket_size)
    lowered = {"unshard": 0, "reduce_grad": 0, "buckets": 0}
    for bucket in buckets:
        _lower_bucket(gm, bucket, specs, ctx.phase)
        lowered["unshard" if bucket[0].target is UNSHARD else "reduce_grad"] += len(bucket)
        lowered["buckets"] += 1
    gm.recompile()
    return PassResult(changed=bool(buckets), details=lowered)
