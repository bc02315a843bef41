"""The graph rule of tensor parallelism (policy, analysis only): which linear
layers of a traced model to split, when neither the config's ``layer_specs``
nor the model's Hugging Face tp plan say.

On the Dynamo graph of the forward (torch-level ops, full shapes):

* a linear whose output is added to a value that does not depend on it (the
  residual stream: ``x + attn(ln(x))``), possibly through views and dropout,
  is **row**-split: ``o_proj``, ``down_proj``, ``c_proj``, ``dense_4h_to_h``;
* the linears that feed its input without passing through another linear
  (``q/k/v`` through attention, ``gate``/``up`` through the activation) are
  **column**-split: they read the block's input;
* a column linear whose output is split into equal (or listed) chunks along
  its last dimension (a fused ``qkv`` or ``gate_up``) is split per part.

Linears in no such pair (the LM head) stay whole. The ``tensor_parallel``
pass then checks each decision on the compiled graph (heads, reshapes).
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx

from zerograph.graph.tp_ops import ADDS, full_shape, linear_use, param_read

_PASS_ON_METHODS = {"view", "reshape", "contiguous", "to", "float", "type_as", "flatten", "unflatten", "clone"}
_PASS_ON_FUNCTIONS = {torch.nn.functional.dropout, torch.reshape, torch.flatten}


@dataclasses.dataclass(frozen=True)
class RuleSplit:
    kind: str  # "column" or "row"
    parts: tuple[int, ...] | None  # fused parts of a column linear's output features; None: one part
    partner: str  # the layer it pairs with (a row linear's first column linear, or a column's row linear)


def _passes_on(user: fx.Node, value: fx.Node) -> bool:
    if not user.args or user.args[0] is not value:
        return False
    if user.op == "call_method":
        return user.target in _PASS_ON_METHODS
    return user.op == "call_function" and user.target in _PASS_ON_FUNCTIONS


def _is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in ADDS) or (node.op == "call_method" and node.target == "add")


def _depends_on(node: fx.Node, source: fx.Node, order: dict[fx.Node, int]) -> bool:
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n is source:
            return True
        if n in seen or order[n] < order[source]:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return False


def _adds_to_residual(out: fx.Node, order: dict[fx.Node, int]) -> bool:
    frontier, seen = [out], set()
    while frontier:
        value = frontier.pop()
        for user in value.users:
            if user in seen:
                continue
            seen.add(user)
            if _is_add(user):
                others = [a for a in user.all_input_nodes if a is not value]
                if others and not any(_depends_on(o, out, order) for o in others):
                    return True
            elif _passes_on(user, value):
                frontier.append(user)
    return False


def _feeding_linears(x: fx.Node, linears: dict[fx.Node, object]) -> list[fx.Node]:
    found, stack, seen = [], [x], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in linears:
            found.append(n)
            continue
        stack.extend(n.all_input_nodes)
    return found


def _split_sizes(user: fx.Node, size: int) -> list[int] | None:
    """The chunk sizes of a ``split``/``chunk`` of a value whose last dim has ``size``."""
    fn = user.target if user.op == "call_method" else getattr(user.target, "__name__", None)
    if fn not in ("split", "chunk") or len(user.args) < 2:
        return None
    shape = full_shape(user.args[0])
    dim = user.kwargs.get("dim", user.args[2] if len(user.args) > 2 else 0)
    if shape is None or not isinstance(dim, int) or dim % len(shape) != len(shape) - 1:
        return None
    arg = user.args[1]
    if fn == "chunk":
        return [size // arg] * arg if isinstance(arg, int) and arg > 0 and size % arg == 0 else None
    if isinstance(arg, int) and arg > 0 and size % arg == 0:
        return [arg] * (size // arg)
    if isinstance(arg, (list, tuple)) and all(isinstance(a, int) for a in arg) and sum(arg) == size:
        return list(arg)
    return None


def _last_dim_slice(user: fx.Node, size: int) -> tuple[int, int] | None:
    """(start, stop) of ``value[..., start:stop]``: a slice of the last dim (of ``size``)."""
    if user.op != "call_function" or user.target is not operator.getitem:
        return None
    items = user.args[1] if isinstance(user.args[1], tuple) else (user.args[1],)
    shape = full_shape(user.args[0])
    if not shape or not items or not isinstance(items[-1], slice):
        return None
    last_is_dim = items[0] is Ellipsis and len(items) == 2 or len(items) == len(shape) and all(
        i == slice(None) for i in items[:-1])
    item = items[-1]
    start, stop = 0 if item.start is None else item.start, size if item.stop is None else item.stop
    if not last_is_dim or item.step not in (None, 1) or not (isinstance(start, int) and isinstance(stop, int)):
        return None
    return start, min(stop, size)


def _fused_parts(out: fx.Node) -> tuple[int, ...] | None:
    """The sizes of the parts a fused output is cut into: by a ``split``/``chunk``
    of its last dim, or by slices of it that tile the dim (Phi-3's
    ``qkv[..., :q]``, ``qkv[..., q:q + kv]``, ``qkv[..., q + kv:]``)."""
    shape = full_shape(out)
    if not shape:
        return None
    frontier = [out]
    while frontier:
        value = frontier.pop()
        slices = {_last_dim_slice(user, shape[-1]) for user in value.users} - {None}
        bounds = sorted({b for sl in slices for b in sl})
        if len(bounds) > 2 and bounds[0] == 0 and bounds[-1] == shape[-1] and all(
                (a, b) in slices for a, b in zip(bounds, bounds[1:])):
            return tuple(b - a for a, b in zip(bounds, bounds[1:]))
        for user in value.users:
            sizes = _split_sizes(user, shape[-1])
            if sizes is not None and len(sizes) > 1:
                return tuple(sizes)
            if _passes_on(user, value) and full_shape(user) and full_shape(user)[-1] == shape[-1]:
                frontier.append(user)
    return None


def graph_rule(graphs, modules: dict[str, str]) -> dict[str, RuleSplit]:
    """Module path -> split, for the linear layers in ``modules`` (path ->
    ``"linear"``/``"addmm"``) found in ``graphs``: ``(GraphModule,
    {placeholder name: parameter FQN})`` pairs of captured Dynamo graphs (or
    compiled ones, whose parameter reads are zerograph's markers)."""
    out: dict[str, RuleSplit] = {}
    for gm, placeholder_params in graphs:
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        linears = {}
        for node in gm.graph.nodes:
            use = linear_use(node)
            name = param_read(use.weight, placeholder_params) if use is not None else None
            module = name.rsplit(".", 1)[0] if name and "." in name else None
            if module in modules:
                linears[node] = (use, module)
        for node, (use, module) in linears.items():
            if not _adds_to_residual(node, order):
                continue
            partners = [n for n in _feeding_linears(use.x, linears) if n is not node]
            if not partners:
                continue
            _record(out, module, RuleSplit("row", None, linears[partners[0]][1]))
            for partner in partners:
                _record(out, linears[partner][1], RuleSplit("column", _fused_parts(partner), module))
    return out


def _record(out: dict[str, RuleSplit], module: str, split: RuleSplit) -> None:
    held = out.get(module)
    if held is not None and held.kind != split.kind:
        raise ValueError(
            f"the graph rule finds {module} both column-split (it feeds a row-split layer) and row-split (its "
            "output is added to the residual stream); say how to split it with "
            "tensor_parallel.partition_config.layer_specs")
    out.setdefault(module, split)
