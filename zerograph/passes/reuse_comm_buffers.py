"""Reuse communication buffers in place (eager executor).

Functional collectives allocate. ``all_reduce(buf)`` copies ``buf`` into a
new tensor before reducing it, and the gradient average after a reduction
writes a second bucket-sized tensor. On a CPU each fresh allocation of a
bucket is also a round of page faults. When nothing else reads a buffer, the
eager executor can run those two ops in place instead::

    before                                    after
    buf = aten.cat([g0, g1])                  buf = aten.cat([g0, g1])
    ar  = _c10d_functional.all_reduce(buf)    ar  = _c10d_functional.all_reduce_(buf)
    w   = wait_tensor(ar)                     w   = wait_tensor(ar)
    avg = aten.mul.Tensor(w, 0.5)             avg = aten.mul_.Tensor(w, 0.5)

A parameter used twice (tied embedding and output weights) gets two
gradient contributions that the backward sums right before reducing them;
out of place that is a third parameter-sized tensor next to the two (the
step's peak on a tied GPT). The sum runs in place into the first::

    before                                    after
    g   = aten.add.Tensor(t_8, emb_grad)      g   = aten.add_.Tensor(t_8, emb_grad)
    rs  = reduce_scatter_tensor(g, ...)       rs  = reduce_scatter_tensor(g, ...)

An op is rewritten only when its input's storage was allocated by this graph
(not an input, saved value or output of it) and every other reader of that
storage is on the alias chain that leads to the op (views, the collective and
its wait). The results are the same values; only the buffers are shared,
which the planner's aliasing rule (:func:`zerograph.planner.liveness.is_alias`)
follows. With ``zerograph.compiler: "inductor"`` the pass does nothing:
Inductor plans its own buffer reuse and wants functional graphs.
"""

from __future__ import annotations

import numbers

import torch
import torch.fx as fx

from zerograph._torch_private import c10d_functional
from zerograph.graph.tags import get_tag
from zerograph.planner.liveness import alias_source
from zerograph.passes.manager import PassContext, PassResult

aten = torch.ops.aten

# out-of-place op -> its in-place form, with the tag role the node must carry
_IN_PLACE = {
    c10d_functional.all_reduce.default: (c10d_functional.all_reduce_.default, "all_reduce"),
    aten.mul.Tensor: (aten.mul_.Tensor, "comm_prep"),
    aten.add.Tensor: (aten.add_.Tensor, "compute"),  # only a gradient sum that feeds a reduction
}
_REDUCING = ("reduce_scatter", "all_reduce", "comm_prep")


def _roots(gm: fx.GraphModule) -> dict[fx.Node, fx.Node]:
    """Every node's storage root: the node that allocated what it reads as its result."""
    root: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        src = alias_source(node)
        root[node] = root.get(src, src) if src is not None else node
    return root


def _sole_reader(node: fx.Node, root: dict[fx.Node, fx.Node]) -> bool:
    """Whether ``node`` may overwrite its first input: that storage was
    allocated by a call in this graph and nothing outside its alias chain
    reads it (so no read can come after the overwrite)."""
    arg = node.args[0]
    if not isinstance(arg, fx.Node):
        return False
    owner = root[arg]
    if owner.op != "call_function":
        return False
    members = {n for n, r in root.items() if r is owner}
    for member in members:
        for user in member.users:
            if user is node:
                continue
            if user not in members or user.op == "output":
                return False
    return True


def _same_layout(node: fx.Node) -> bool:
    """The op's result has its input's dtype and shape (no promotion, no broadcast)."""
    out, inp = node.meta.get("val"), node.args[0].meta.get("val")
    if not isinstance(out, torch.Tensor) or not isinstance(inp, torch.Tensor):
        return False
    return out.dtype == inp.dtype and out.shape == inp.shape and inp.is_contiguous()


def _eligible(node: fx.Node, root: dict[fx.Node, fx.Node]) -> bool:
    _, role = _IN_PLACE[node.target]
    tag = get_tag(node)
    if tag is None or tag.role != role:
        return False
    if node.target is aten.mul.Tensor:
        if len(node.args) != 2 or not isinstance(node.args[1], numbers.Number) or not _same_layout(node):
            return False
    if node.target is aten.add.Tensor and not _gradient_sum(node):
        return False
    return _sole_reader(node, root)


def _gradient_sum(node: fx.Node) -> bool:
    """``add(a, b)`` of two same-layout tensors (no alpha, no broadcast, ``a``
    laid out as the result) whose result goes straight to a gradient reduction."""
    if node.kwargs or len(node.args) != 2 or not all(isinstance(a, fx.Node) for a in node.args):
        return False
    out, a, b = node.meta.get("val"), node.args[0].meta.get("val"), node.args[1].meta.get("val")
    if not all(isinstance(t, torch.Tensor) for t in (out, a, b)):
        return False
    if not (a.dtype == b.dtype == out.dtype and a.shape == b.shape == out.shape and a.stride() == out.stride()):
        return False
    return any((tag := get_tag(user)) is not None and tag.role in _REDUCING for user in node.users)


def reuse_comm_buffers(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Run collectives and gradient averaging in place where nothing else
    reads their buffers (module docstring). Mechanism only; no policy."""
    if ctx.config is not None and ctx.config.zerograph.compiler != "eager":
        return PassResult(details={"skipped": f"compiler {ctx.config.zerograph.compiler!r} plans its own buffers"})
    root = _roots(gm)
    rewritten: list[str] = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _IN_PLACE and _eligible(node, root):
            node.target = _IN_PLACE[node.target][0]
            rewritten.append(node.name)
            root = _roots(gm)  # the in-place result now shares its input's storage
    if rewritten:
        gm.recompile()
    return PassResult(changed=bool(rewritten), details={"in_place": rewritten})
