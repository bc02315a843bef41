"""``nvme_read_ahead`` (forward, backward, inference; ``offload_param.device:
"nvme"``): the compiled schedule requests the parameter-file reads.

With NVMe parameter offload each stored shard is a view of the memory-mapped
parameter file (:mod:`zerograph.runtime.nvme_params`), and the lowered graph
copies it to the compute device in a ``host_copy`` node ahead of its
all-gather. This pass splits that read in two: a ``zerograph::read_ahead``
node (:mod:`zerograph.graph.nvme_ops`) that starts the asynchronous read of
the shard's region (``posix_fadvise(WILLNEED)``), placed a planner-chosen
distance earlier, and the copy itself, which then finds the pages read or
in flight. The distance is
:func:`zerograph.planner.nvme.read_ahead_points`': at most
``offload_param.buffer_count`` shards (and ``buffer_count * buffer_size``
elements) requested and not yet copied; the first window at the graph's
start, then each copy makes room for the next read right after it.

TinyMLP (stage 3, bucketing off, world 2, ``buffer_count: 1``), forward::

    primals_1: f32[3, 4]
    ...
    read_ahead = zerograph.read_ahead(primals_1, 'zg0', 'fc1.weight')  # read_ahead fc1.weight
    _to_copy_default = aten._to_copy(primals_1, device=cpu, non_blocking=True)  # host_copy fc1.weight
    read_ahead_1 = zerograph.read_ahead(primals_2, 'zg0', 'fc1.bias')  # read_ahead fc1.bias
    all_gather_into_tensor_default = ...(_to_copy_default, 2, '0')  # all_gather fc1.weight
    ...
    _to_copy_default_1 = aten._to_copy(primals_2, ...)  # host_copy fc1.bias
    read_ahead_2 = zerograph.read_ahead(primals_4, 'zg0', 'fc2.weight')  # read_ahead fc2.weight

The op returns nothing and is registered as side-effecting, so ``dce`` keeps
it. The runtime releases the graph's mapped pages when it ends
(``stream_nvme_params`` in :mod:`zerograph.backend.executors`); it requests
reads itself, before the graph runs, only for file shards that no
``read_ahead`` node requests (a graph this pass did not run on: the pass
disabled in a custom pass list).
"""

from __future__ import annotations

import torch.fx as fx

from zerograph.graph.nvme_ops import READ_AHEAD
from zerograph.graph.tags import NodeTag, get_tag, set_tag
from zerograph.planner.nvme import host_copies, read_ahead_points
from zerograph.runtime.nvme_params import local_numel
from zerograph.passes.manager import PassContext, PassResult


def _shard_input(node: fx.Node) -> fx.Node:
    """The stored shard a copy reads: its input, through views (a placeholder)."""
    src = node.args[0]
    while src.op == "call_function" and getattr(src.target, "is_view", False):
        src = src.args[0]
    return src


def nvme_read_ahead(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    state = ctx.state
    store = getattr(state, "nvme_params", None)
    if store is None:
        return PassResult()
    copies: list[tuple[fx.Node, str]] = []  # each file shard's first copy, in node order
    seen: set[str] = set()
    for node, name in host_copies(gm):
        if store.holds(name) and name not in seen:
            seen.add(name)
            copies.append((node, name))
    if not copies:
        return PassResult()
    cfg = ctx.config.zero_optimization.offload_param
    points = read_ahead_points([(name, local_numel(state.specs[name])) for _, name in copies],
                               cfg.buffer_count, cfg.buffer_size)
    copy_of = {name: node for node, name in copies}
    first = next(n for n in gm.graph.nodes if n.op != "placeholder")
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    inserted = 0
    for j, names in enumerate(points):
        last = copies[j - 1][0] if j else None  # the copy that made room (none: the graph's start)
        for name in names:
            shard = _shard_input(copy_of[name])
            # never before the shard it names (a view of a stored shard)
            anchor = last if shard.op == "placeholder" or (last is not None and order[last] > order[shard]) else shard
            where = gm.graph.inserting_after(anchor) if anchor is not None else gm.graph.inserting_before(first)
            with where:
                node = gm.graph.call_function(READ_AHEAD, (shard, state.tag, name))
            base = get_tag(copy_of[name]) or NodeTag(phase="forward")
            set_tag(node, base.replace(role="read_ahead", param=name, bucket=(), pass_name="nvme_read_ahead"))
            node.meta["val"] = None
            order[node] = order[anchor] if anchor is not None else -1
            last, inserted = node, inserted + 1
    gm.graph.lint()
    gm.recompile()
    return PassResult(changed=True, details={"read_ahead_nodes": inserted,
                                             "after_copy": {copies[j - 1][1] if j else None: names
                                                            for j, names in enumerate(points) if names}})
