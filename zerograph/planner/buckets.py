"""Bucketing policy: which markers share one collective.

An analysis (it never mutates the graph): it walks the ``unshard`` and
``reduce_grad`` markers in graph order and groups consecutive markers of the
same kind that belong to the same block (the ``layer`` tag; outside blocks,
the same module), up to ``allgather_bucket_size`` / ``reduce_bucket_size``
elements. Inside a bucket parameters keep graph order, which for a block is
registration order in the forward. This gives one all-gather and one
reduce-scatter per transformer block, like FSDP2 with one group per block.
A bucket size of 0 turns bucketing off. The lowering pass is the mechanism
that turns each bucket into collectives.
"""

from __future__ import annotations

import torch.fx as fx

from typing import Callable, Mapping, Union

from zerograph.graph.hpz import HPZ_UNSHARD
from zerograph.graph.tags import get_tag
from zerograph.graph.markers import REDUCE_GRAD, UNSHARD
from zerograph.runtime.specs import ParamSpec

# markers that become an all-gather (hpZ's gathers secondary shards inside a node)
GATHER_MARKERS = (UNSHARD, HPZ_UNSHARD)
MARKERS = (*GATHER_MARKERS, REDUCE_GRAD)


def _group_key(node: fx.Node, spec: ParamSpec):
    tag = get_tag(node)
    where = None
    if tag is not None:
        where = ("layer", tag.layer) if tag.layer is not None else ("module", tag.module_path)
    # an offloaded (host) shard never shares a buffer with one on the device, nor
    # a gather inside a node (hpZ) one over all ranks
    if node.target in GATHER_MARKERS:
        return ("gather", where, spec.compute_dtype, spec.offloaded, spec.comm_group)
    return ("reduce", where, spec.grad_reduce, spec.master_dtype, spec.offloaded)


def _bucketable(node: fx.Node, spec: ParamSpec) -> bool:
    if spec.world_size == 1:
        return False
    if node.target in GATHER_MARKERS:
        return spec.storage == "sharded"
    return True


def plan_buckets(
    gm: fx.GraphModule, specs: Union[Mapping[str, ParamSpec], Callable[[fx.Node], ParamSpec]], *,
    gather_cap: int, reduce_cap: int
) -> list[list[fx.Node]]:
    """Markers of ``gm`` in graph order, grouped into buckets (lists of one or more).

    Within one block, markers of different kinds (gather/reduce, dtype, or
    reduction kind, e.g. a persistent replicated bias among reduce-scattered
    weights) fill separate open buckets, so one odd parameter does not split
    its block's bucket. A marker that is not bucketable becomes its own bucket.
    ``specs``: by parameter name, or a function of the marker node (hpZ's
    markers gather a secondary partition).
    """
    spec_of = specs if callable(specs) else (lambda node: specs[node.args[2]])
    buckets: list[list[fx.Node]] = []
    open_buckets: dict[tuple, list] = {}  # key -> [nodes, size]
    current_where = object()

    def flush(key=None):
        keys = list(open_buckets) if key is None else [key]
        for k in keys:
            nodes, _ = open_buckets.pop(k)
            buckets.append(nodes)

    for node in gm.graph.nodes:
        if node.target not in MARKERS:
            continue
        spec = spec_of(node)
        cap = gather_cap if node.target in GATHER_MARKERS else reduce_cap
        if cap <= 0 or not _bucketable(node, spec):
            buckets.append([node])
            continue
        key = _group_key(node, spec)
        if key[1] != current_where:
            flush()
            current_where = key[1]
        if key in open_buckets and open_buckets[key][1] + spec.numel > cap:
            flush(key)
        entry = open_buckets.setdefault(key, [[], 0])
        entry[0].append(node)
        entry[1] += spec.numel
    flush()
    return sorted(buckets, key=_first_index(gm))


def _first_index(gm: fx.GraphModule):
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return lambda bucket: order[bucket[0]]
