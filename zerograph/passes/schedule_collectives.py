"""Overlap scheduling: start collectives early, wait late.

Mechanism only; the policy is two config knobs:

* **Gather prefetch** (forward and backward): the start of all-gather ``k``
  (with the casts/pads/packing that feed it, all computed from shards, and
  with ``offload_param`` the host-to-device copy of each shard) moves
  to just after the wait of all-gather ``k-1`` and its copy-out, so it runs
  while block ``k-1`` computes. Starting it after the copy-out (as FSDP2
  does) keeps bucket ``k``'s buffer out of the copy-out's transient, where
  bucket ``k-1`` briefly exists twice. At most two gathered buckets are
  resident at once. A
  bucket larger than ``stage3_prefetch_bucket_size`` elements is not
  prefetched (it is gathered on demand). Launch distance is bounded by
  residency: gather ``k`` is not started early if it and the gathered
  buckets still resident there exceed ``stage3_max_live_parameters`` elements, so a
  bucket (or single parameter) above that bound is gathered on demand.
* **Deferred reduction waits** (backward): the wait of reduction ``k`` and the
  slicing after it move to just before the start of reduction ``k+1``, so one
  reduction is in flight while the next block's gradients are computed.

Before (forward)::

    ag0 = all_gather(shard0); w0 = wait(ag0); block0(w0)
    ag1 = all_gather(shard1); w1 = wait(ag1); block1(w1)

After::

    ag0 = all_gather(shard0); w0 = wait(ag0); ag1 = all_gather(shard1); block0(w0)
    w1 = wait(ag1); block1(w1)
"""

from __future__ import annotations

import torch.fx as fx

from zerograph._torch_private import c10d_functional
from zerograph.graph.tags import get_tag
from zerograph.passes.manager import PassContext, PassResult

_WAIT = c10d_functional.wait_tensor.default


def _role(node: fx.Node) -> str | None:
    tag = get_tag(node)
    return tag.role if tag is not None else None


def _wait_of(start: fx.Node) -> fx.Node:
    return next(u for u in start.users if u.target is _WAIT)


def _prep_chain(start: fx.Node) -> list[fx.Node] | None:
    """The nodes feeding a collective start (inputs before users), if they
    depend only on placeholders and cheap prep nodes; ``None`` if not movable."""
    chain: list[fx.Node] = []
    ok = True

    def visit(node: fx.Node):
        nonlocal ok
        for arg in node.all_input_nodes:
            if arg.op == "placeholder" or arg in chain:
                continue
            if _role(arg) in ("comm_prep", "host_copy") or (arg.op == "call_function" and all(
                a.op == "placeholder" for a in arg.all_input_nodes
            )):
                visit(arg)
                chain.append(arg)
            else:
                ok = False

    visit(start)
    return chain if ok else None


def _size(node: fx.Node) -> int:
    val = node.meta.get("val")
    return val.numel() if val is not None and hasattr(val, "numel") else 0


def _copy_out(wait: fx.Node) -> list[fx.Node]:
    """The wait of an all-gather and the ``comm_prep`` nodes after it (the
    slicing and per-parameter copy-out of a bucket)."""
    out, stack = [wait], [wait]
    while stack:
        for user in stack.pop().users:
            tag = get_tag(user)
            if user not in out and tag is not None and tag.role == "comm_prep":
                out.append(user)
                stack.append(user)
    return out


def _resident_at(gathers: list[fx.Node], pos: int, order: dict) -> int:
    """Gathered elements resident at graph position ``pos``: each all-gather
    counts from its start to the last use of its wait or copy-out."""
    total = 0
    for g in gathers:
        if order[g] > pos:
            continue
        last = max(order[u] for n in _copy_out(_wait_of(g)) for u in [n, *n.users])
        if last > pos:
            total += _size(g)
    return total


def _tail(wait: fx.Node) -> list[fx.Node]:
    """The wait and the nodes computed only from it (slices, views, scaling)."""
    out, stack = [wait], [wait]
    while stack:
        node = stack.pop()
        for user in node.users:
            if user.op == "output" or user in out or user.op != "call_function":
                continue
            if all(a in out for a in user.all_input_nodes):
                out.append(user)
                stack.append(user)
    return out


def schedule_collectives(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    if ctx.state is None or not ctx.config.zero_optimization.overlap_comm:
        return PassResult()
    limit = ctx.config.zero_optimization.stage3_prefetch_bucket_size
    max_live = ctx.config.zero_optimization.stage3_max_live_parameters
    nodes = list(gm.graph.nodes)
    gathers = [n for n in nodes if _role(n) == "all_gather"]
    prefetched = 0
    for prev, start in zip(gathers, gathers[1:]):
        if _size(start) > limit:
            continue
        chain = _prep_chain(start)
        if chain is None:
            continue
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        after = max(_copy_out(_wait_of(prev)), key=order.__getitem__)
        limit_pos = order[after]
        if order[start] < limit_pos:
            continue
        if _resident_at(gathers, limit_pos, order) + _size(start) > max_live:
            continue
        for node in [*chain, start]:
            if order[node] > limit_pos:
                after.append(node)
                after = node
        prefetched += 1
    deferred = 0
    if ctx.phase == "backward":
        reductions = [n for n in gm.graph.nodes if _role(n) in ("reduce_scatter", "all_reduce")]
        for cur, nxt in zip(reductions, reductions[1:]):
            tail = _tail(_wait_of(cur))
            order = {n: i for i, n in enumerate(gm.graph.nodes)}
            users_before = [
                u for t in tail for u in t.users if u.op != "output" and u not in tail and order[u] < order[nxt]
            ]
            if users_before:
                continue
            for node in sorted(tail, key=order.__getitem__):
                nxt.prepend(node)
            deferred += 1
    gm.graph.lint()
    gm.recompile()
    return PassResult(changed=bool(prefetched or deferred), details={"prefetched": prefetched, "deferred_waits": deferred})
