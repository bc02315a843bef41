"""``offload_activations`` (joint graph): saved activations go to host memory.

The unit is a storage: a forward value that allocates (a non-alias node, the
*root*) together with its aliases (views, ``detach``, ``t``: the nodes
:func:`zerograph.planner.liveness.alias_source` says share another node's
storage, including ``getitem`` of an alias op such as ``split``). For every storage
the backward reads, through the root or through any of its aliases (and that
no recomputed node reads), the pass inserts one copy of the root to the host
right after the root is produced and one copy back to its device right before
the first backward use; the backward re-creates the aliases it reads from the
copy back (``<alias>_realias``, the same op on the reloaded root) and reads
those instead, so the forward's aliases are no longer saved (those the forward
no longer uses are erased). The partitioner then saves only the host copy.
Tiny MLP ``fc2(relu(fc1(x)))``, whose ``threshold_backward`` reads AOTAutograd's
``detach(relu)``::

    # forward
    relu = aten.relu(addmm)
    relu_offload = aten._to_copy(relu, device=cpu)                   # saved for the backward
    # backward
    relu_reload = aten._to_copy(relu_offload, device=<relu's device>)
    detach_realias = aten.detach(relu_reload)                         # was: detach(relu), saved
    mm_1 = aten.mm(t_3, relu_reload)
    detach_1 = aten.detach(detach_realias)
    threshold_backward = aten.threshold_backward(mm, detach_1, 0)

So each storage has one host copy, never one per alias, and no device alias
of it stays saved. On CUDA the host copy is pinned and both copies are
``non_blocking`` (they are ordered on the current stream, so no extra
synchronization is needed); on CPU builds they are plain copies (host ==
device, the mechanism is the same). Parameters, their gathered chain,
placeholders and their views, and recompute-tagged storages are left alone.

Which nodes run in the backward follows AOTAutograd's default partitioner:
everything after the joint graph's last forward node (its
``partitioner_tag``), and the ``tangents``; a graph without those marks uses
zerograph's phase tags.
"""

from __future__ import annotations


import torch
import torch.fx as fx
from torch.utils.checkpoint import CheckpointPolicy

from zerograph.graph.tags import NodeTag, get_tag, set_tag
from zerograph.planner.liveness import alias_source
from zerograph.passes.manager import PassContext, PassResult
from zerograph.runtime.offload import HOST

_RECOMPUTE = (CheckpointPolicy.MUST_RECOMPUTE, CheckpointPolicy.PREFER_RECOMPUTE)
PASS_NAME = "offload_activations"


def _is_backward(node: fx.Node) -> bool:
    tag = get_tag(node)
    if node.op == "output":
        return False
    return (tag is not None and tag.phase == "backward") or (node.op == "placeholder" and node.name.startswith("tangents"))


def backward_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """The joint graph's nodes that the partitioner puts in the backward graph
    (AOTAutograd's ``default_partition``: those after the last node marked
    ``partitioner_tag="is_forward"``, and the tangents)."""
    nodes = list(gm.graph.nodes)
    marks = [i for i, n in enumerate(nodes) if n.meta.get("partitioner_tag") == "is_forward"]
    if not marks:
        return {n for n in nodes if _is_backward(n)}
    last = max(marks)
    return {n for i, n in enumerate(nodes) if n.op != "output" and (
        (i > last and n.op != "placeholder") or (n.op == "placeholder" and n.name.startswith("tangents")))}


def _eligible_root(node: fx.Node) -> bool:
    tag = get_tag(node)
    if node.op != "call_function" or tag is None or tag.phase != "forward" or tag.role != "compute":
        return False
    if tag.param is not None or node.meta.get("recompute") in _RECOMPUTE:
        return False
    return isinstance(node.meta.get("val"), torch.Tensor)


def offload_groups(gm: fx.GraphModule) -> list[tuple[fx.Node, list[fx.Node]]]:
    """``(root, aliases)`` of every storage to offload, in graph order: an
    eligible forward root (a single tensor computed by the model, not a
    parameter's) whose storage the backward reads, through the root or an
    alias; ``aliases`` are its forward aliases, in graph order. A storage
    with a recompute-tagged alias or a recomputed reader stays."""
    backward = backward_nodes(gm)
    root: dict[fx.Node, fx.Node] = {}
    members: dict[fx.Node, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node in backward or node.op not in ("call_function", "placeholder"):
            continue
        src = alias_source(node)
        if src is None or src not in root:
            root[node] = node
            members[node] = []
        else:
            root[node] = root[src]
            members[root[src]].append(node)
    out = []
    for r, aliases in members.items():
        if not _eligible_root(r):
            continue
        group = [r, *aliases]
        if any(a.meta.get("recompute") in _RECOMPUTE for a in aliases):
            continue
        if any(u.meta.get("recompute") in _RECOMPUTE for m in group for u in m.users):
            continue
        if any(u in backward for m in group for u in m.users):
            out.append((r, aliases))
    return out


def offload_activations(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Insert host copies of saved storages, copies back before their backward
    use, and the backward's aliases of the copies back."""
    if not ctx.config.activation_checkpointing.offload_activations:
        return PassResult(details={"offloaded": 0})
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    backward = backward_nodes(gm)
    moved = realiased = nbytes = 0
    for node, aliases in offload_groups(gm):
        group = [node, *aliases]
        reads = {m: [u for u in m.users if u in backward] for m in group}
        first = min((u for us in reads.values() for u in us), key=order.__getitem__)
        val = node.meta["val"]
        on_cuda = val.device.type == "cuda"
        with gm.graph.inserting_after(node):
            off = gm.graph.call_function(torch.ops.aten._to_copy.default, (node,),
                                         {"device": HOST, "pin_memory": on_cuda, "non_blocking": on_cuda})
        off.name = f"{node.name}_offload"
        off.meta["val"] = _fake_to(val, HOST)
        set_tag(off, get_tag(node).replace(pass_name=PASS_NAME, location="host"))
        _copy_partitioner_tag(node, off)
        with gm.graph.inserting_before(first):
            back = gm.graph.call_function(torch.ops.aten._to_copy.default, (off,),
                                          {"device": val.device, "non_blocking": on_cuda})
        back.name = f"{node.name}_reload"
        back.meta["val"] = val
        # like the first backward reader's tag (its module), in the backward; that reader may
        # carry a forward tag (AOTAutograd's detach of a saved value), so the phase is set
        bw_tag = (get_tag(first) or NodeTag("backward")).replace(
            phase="backward", pass_name=PASS_NAME, role="compute", param=None, bucket=(), location="device")
        set_tag(back, bw_tag)
        _copy_partitioner_tag(first, back)
        # the backward's aliases: re-created from the copy back, each after its source
        copies = {node: back}
        needed = _needed_aliases(aliases, reads)
        last = back
        for alias in aliases:
            if alias not in needed:
                continue
            with gm.graph.inserting_after(last):
                copy = gm.graph.node_copy(alias, lambda a: copies.get(a, a))
            copy.name = f"{alias.name}_realias"
            copy.meta.pop("recompute", None)
            set_tag(copy, bw_tag)
            _copy_partitioner_tag(first, copy)
            copies[alias] = last = copy
            realiased += 1
        for m in group:
            for user in reads[m]:
                user.replace_input_with(m, copies[m])
        for alias in reversed(aliases):  # forward aliases nothing reads any more
            if not alias.users:
                gm.graph.erase_node(alias)
        moved += 1
        nbytes += val.numel() * val.element_size()
    if moved:
        gm.graph.lint()
        gm.recompile()
    return PassResult(changed=bool(moved),
                      details={"offloaded": moved, "offloaded_bytes": nbytes, "realiased": realiased})


def _needed_aliases(aliases: list[fx.Node], reads: dict[fx.Node, list[fx.Node]]) -> set[fx.Node]:
    """The aliases the backward reads, and the aliases they are made from."""
    needed: set[fx.Node] = set()
    for alias in reversed(aliases):  # an alias comes after its source
        if reads[alias] or any(u in needed for u in alias.users):
            needed.add(alias)
    return needed


def _copy_partitioner_tag(src: fx.Node, dst: fx.Node) -> None:
    """The partitioner's own forward/backward mark (``partitioner_tag``), where set."""
    if "partitioner_tag" in src.meta:
        dst.meta["partitioner_tag"] = src.meta["partitioner_tag"]


def _fake_to(val: torch.Tensor, device: torch.device) -> torch.Tensor:
    mode = getattr(val, "fake_mode", None)
    if mode is None or val.device == device:
        return val.clone() if mode is None else _clone_fake(val, mode)
    with mode:
        return torch.empty_strided(val.shape, val.stride(), dtype=val.dtype, device=device)


def _clone_fake(val, mode):
    with mode:
        return torch.empty_strided(val.shape, val.stride(), dtype=val.dtype, device=val.device)
