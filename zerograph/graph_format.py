"""A compact, stable text form of an FX graph with zerograph's tags, for
golden tests, docs and ``zerograph.inspect`` users.

One line per node::

    all_gather_into_tensor = _c10d_functional.all_gather_into_tensor(primals_1, 2, '0')  # all_gather fc1.weight
"""

from __future__ import annotations

import torch
import torch.fx as fx

from zerograph.metadata import get_tag


def _target_name(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._schema.name.split('::')[-1]}" + (
            f".{target._overloadname}" if target._overloadname != "default" else ""
        )
    return getattr(target, "__name__", str(target))


def _arg(a) -> str:
    if isinstance(a, fx.Node):
        return a.name
    if isinstance(a, (list, tuple)):
        inner = ", ".join(_arg(x) for x in a)
        return f"[{inner}]"
    if isinstance(a, torch.dtype):
        return str(a).replace("torch.", "")
    return repr(a)


def _shape(node: fx.Node) -> str:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        dtype = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16", torch.int64: "i64"}.get(
            val.dtype, str(val.dtype).replace("torch.", "")
        )
        return f"{dtype}{list(val.shape)}"
    return ""


def format_graph(gm: fx.GraphModule, *, tags: bool = True) -> str:
    lines = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            lines.append(f"{node.name}: {_shape(node)}")
            continue
        if node.op == "output":
            lines.append(f"return {_arg(node.args[0])}")
            continue
        args = [_arg(a) for a in node.args] + [f"{k}={_arg(v)}" for k, v in node.kwargs.items()]
        line = f"{node.name}: {_shape(node)} = {_target_name(node)}({', '.join(args)})"
        tag = get_tag(node)
        if tags and tag is not None and tag.role != "compute":
            names = tag.param or ",".join(tag.bucket)
            line += f"  # {tag.role} {names}".rstrip()
        lines.append(line)
    return "\n".join(lines)
