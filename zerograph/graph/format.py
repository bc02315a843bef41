"""A compact, stable text form of an FX graph with zerograph's tags, for
golden tests, docs and ``zerograph.inspect`` users.

One line per node::

    all_gather_into_tensor = _c10d_functional.all_gather_into_tensor(primals_1, 2, '0')  # all_gather fc1.weight
"""

from __future__ import annotations

import re

import torch
import torch.fx as fx

from zerograph.graph.tags import get_tag


def _target_name(node: fx.Node) -> str:
    target = node.target
    if hasattr(target, "_schema") and hasattr(target, "_overloadname"):  # an OpOverload
        return f"{target.namespace}.{target._schema.name.split('::')[-1]}" + (
            f".{target._overloadname}" if target._overloadname != "default" else ""
        )
    return getattr(target, "__name__", str(target))


_VIEWS = (torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten._unsafe_view.default)


def _arg(a, names, canonical=False) -> str:
    if isinstance(a, fx.Node):
        return names.get(a, a.name)
    if isinstance(a, (list, tuple)):
        inner = ", ".join(_arg(x, names, canonical) for x in a if not (canonical and _is_opaque(x)))
        return f"[{inner}]"
    if isinstance(a, torch.dtype):
        return str(a).replace("torch.", "")
    return repr(a)


def _shape(node: fx.Node) -> str:
    val = node.meta.get("val", node.meta.get("example_value"))  # a Dynamo graph records example_value
    if isinstance(val, torch.Tensor):
        dtype = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16", torch.int64: "i64"}.get(
            val.dtype, str(val.dtype).replace("torch.", "")
        )
        return f"{dtype}{list(val.shape)}"
    return ""


def _is_opaque(a) -> bool:
    """A graph input that is neither a tensor nor a number (a process group
    object some torch versions lift into the graph)."""
    if not isinstance(a, fx.Node) or a.op != "placeholder":
        return False
    val = a.meta.get("val")
    return val is not None and not isinstance(val, (torch.Tensor, torch.SymInt, torch.SymFloat, int, float, bool))


def _is_identity_view(node: fx.Node) -> bool:
    tag = get_tag(node)
    if node.target not in _VIEWS or (tag is not None and tag.role != "compute"):
        return False
    src, out = node.args[0].meta.get("val"), node.meta.get("val")
    return isinstance(src, torch.Tensor) and isinstance(out, torch.Tensor) and src.shape == out.shape


def _canonical_names(gm: fx.GraphModule) -> dict[fx.Node, str]:
    """Names that do not depend on the torch version: identity views and
    opaque inputs vanish, the rest is numbered per base name in order."""
    names: dict[fx.Node, str] = {}
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "output" or _is_opaque(node):
            continue
        if node.op == "call_function" and _is_identity_view(node):
            names[node] = names.get(node.args[0], node.args[0].name)
            continue
        base = re.sub(r"_\d+$", "", node.name)
        k = counts.get(base, 0)
        counts[base] = k + 1
        if base in ("primals", "tangents"):
            names[node] = f"{base}_{k + 1}"
        else:
            names[node] = base if k == 0 else f"{base}_{k}"
    return names


def format_graph(gm: fx.GraphModule, *, tags: bool = True, canonical: bool = False) -> str:
    """One line per node. ``canonical=True`` (golden tests) renames nodes
    sequentially and hides what differs between torch versions and between
    runs: identity views, non-tensor graph inputs, and the number in a
    model's tag (``'zg17'`` becomes ``'zg0'``, the first tag seen; the tag
    counts the models compiled in this process)."""
    names = _canonical_names(gm) if canonical else {}
    lines = []
    for node in gm.graph.nodes:
        if canonical and (_is_opaque(node) or (node.op == "call_function" and _is_identity_view(node))):
            continue
        name = names.get(node, node.name)
        if node.op == "placeholder":
            lines.append(f"{name}: {_shape(node)}")
            continue
        if node.op == "output":
            out = node.args[0]
            lines.append(f"return {_arg(out, names, canonical)}")
            continue
        args = [_arg(a, names, canonical) for a in node.args]
        args += [f"{k}={_arg(v, names, canonical)}" for k, v in node.kwargs.items()]
        line = f"{name}: {_shape(node)} = {_target_name(node)}({', '.join(args)})"
        tag = get_tag(node)
        if tags and tag is not None and tag.role != "compute":
            names_ = tag.param or ",".join(tag.bucket)
            role = tag.role if tag.mesh_dim == "dp" else f"{tag.mesh_dim} {tag.role}"
            line += f"  # {role} {names_}".rstrip()
        lines.append(line)
    text = "\n".join(lines)
    return _renumber_tags(text) if canonical else text


def _renumber_tags(text: str) -> str:
    seen: dict[str, str] = {}

    def rename(m: re.Match) -> str:
        number = seen.setdefault(m.group(1), str(len(seen)))
        return f"'zg{number}{m.group(2)}"

    return re.sub(r"'zg(\d+)([/'])", rename, text)
