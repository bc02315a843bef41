"""``offload_activations`` (joint graph): saved activations go to host memory.

For every forward activation the backward reads directly (a candidate for
saving that no recomputed node reads), the pass inserts a copy to the host
right after it is produced and a copy back to its device right before its
first backward use, and points the backward users at the copy back. The
partitioner then saves the host copy instead of the activation::

    # forward
    gelu = aten.gelu(addmm)
    gelu_offload = aten._to_copy(gelu, device=cpu)              # saved for the backward
    # backward
    gelu_reload = aten._to_copy(gelu_offload, device=<gelu's device>)
    mul = aten.mul(tangents_1, gelu_reload)

On CUDA the host copy is pinned and both copies are ``non_blocking`` (they are
ordered on the current stream, so no extra synchronization is needed); on CPU
builds they are plain copies (host == device, the mechanism is the same).
Parameters, their gathered chain, placeholders and recompute-tagged nodes are
left alone.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.utils.checkpoint import CheckpointPolicy

from zerograph.metadata import get_tag, set_tag
from zerograph.passes.manager import PassContext, PassResult
from zerograph.runtime.offload import HOST

_RECOMPUTE = (CheckpointPolicy.MUST_RECOMPUTE, CheckpointPolicy.PREFER_RECOMPUTE)
PASS_NAME = "offload_activations"


def _is_forward(node: fx.Node) -> bool:
    tag = get_tag(node)
    return tag is not None and tag.phase == "forward"


def _is_backward(node: fx.Node) -> bool:
    tag = get_tag(node)
    if node.op == "output":
        return False
    return (tag is not None and tag.phase == "backward") or (node.op == "placeholder" and node.name.startswith("tangents"))


def offload_candidates(gm: fx.GraphModule) -> list[fx.Node]:
    """Forward activations (single tensors) with a backward user and no recomputed user."""
    out = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and _is_backward(node):
            break  # forward-tagged nodes after this point run in the backward graph
        tag = get_tag(node)
        if node.op != "call_function" or not _is_forward(node) or tag.role != "compute" or tag.param is not None:
            continue
        if node.meta.get("recompute") in _RECOMPUTE or not isinstance(node.meta.get("val"), torch.Tensor):
            continue
        users = list(node.users)
        if any(u.meta.get("recompute") in _RECOMPUTE for u in users):
            continue
        if any(_is_backward(u) for u in users):
            out.append(node)
    return out


def offload_activations(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Insert host copies of saved activations and copies back before their backward use."""
    if not ctx.config.activation_checkpointing.offload_activations:
        return PassResult(details={"offloaded": 0})
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    moved = 0
    nbytes = 0
    for node in offload_candidates(gm):
        val = node.meta["val"]
        on_cuda = val.device.type == "cuda"
        bw_users = sorted((u for u in node.users if _is_backward(u)), key=order.__getitem__)
        with gm.graph.inserting_after(node):
            off = gm.graph.call_function(torch.ops.aten._to_copy.default, (node,),
                                         {"device": HOST, "pin_memory": on_cuda, "non_blocking": on_cuda})
        off.name = f"{node.name}_offload"
        off.meta["val"] = _fake_to(val, HOST)
        set_tag(off, get_tag(node).replace(pass_name=PASS_NAME, location="host"))
        _copy_partitioner_tag(node, off)
        with gm.graph.inserting_before(bw_users[0]):
            back = gm.graph.call_function(torch.ops.aten._to_copy.default, (off,),
                                          {"device": val.device, "non_blocking": on_cuda})
        back.name = f"{node.name}_reload"
        back.meta["val"] = val
        set_tag(back, get_tag(bw_users[0]).replace(pass_name=PASS_NAME, role="compute", param=None,
                                                   location="device"))
        _copy_partitioner_tag(bw_users[0], back)
        for user in bw_users:
            user.replace_input_with(node, back)
        moved += 1
        nbytes += val.numel() * val.element_size()
    if moved:
        gm.graph.lint()
        gm.recompile()
    return PassResult(changed=bool(moved), details={"offloaded": moved, "offloaded_bytes": nbytes})


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
