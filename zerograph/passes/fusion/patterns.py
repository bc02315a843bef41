"""Pattern matchers for the fusion passes (run on the Dynamo graph).

Each matcher looks at one anchor node and returns a :class:`Match` or
``None``. A match names the nodes it replaces (``outputs``), the nodes computed
only for them (``interior``, erased after the rewrite) and the fused call
(``fn(*args, **kwargs)``). Constants (eps, scale, dropout, masks, reductions)
are read from the graph and checked before a match is returned: a subgraph
that is not exactly equivalent to the fused function yields ``None``.
Norms, activations and losses are here; attention and rotary matchers are in
:mod:`zerograph.passes.fusion.attention` and :mod:`zerograph.passes.fusion.rotary`.

GPT-2's ``NewGELUActivation`` (:func:`match_gelu_new`), before::

    mul_1 = 0.5 * x_5
    pow_1 = torch.pow(x_5, 3.0)
    mul_2 = 0.044715 * pow_1
    add_6 = x_5 + mul_2
    mul_3 = 0.7978845608028654 * add_6
    tanh = torch.tanh(mul_3)
    add_7 = 1.0 + tanh
    hidden_states_5 = mul_1 * add_7

after::

    gelu = zerograph.kernels.gelu.gelu(x_5, 'tanh')

nanoGPT's loss on logits that nothing else uses (:func:`match_linear_cross_entropy`),
``F.cross_entropy(lm_head(x).view(-1, V).float(), y.view(-1))``, after::

    reshape = torch.reshape(x, (-1, 768))
    linear_cross_entropy_fp32 = zerograph.passes.fusion.patterns.linear_cross_entropy_fp32(
        reshape, lm_head_weight, view_1, None, -100, 'mean')
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import operator
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F

# --------------------------------------------------------------------------- op families

_FUNCTIONS: dict[Any, str] = {
    operator.mul: "mul", torch.mul: "mul",
    operator.add: "add", torch.add: "add",
    operator.truediv: "div", torch.div: "div",
    operator.pow: "pow", torch.pow: "pow",
    operator.neg: "neg", torch.neg: "neg",
    operator.matmul: "matmul", torch.matmul: "matmul",
    operator.and_: "and", torch.logical_and: "and", torch.bitwise_and: "and",
    operator.le: "le", torch.le: "le", operator.ge: "ge", torch.ge: "ge",
    operator.getitem: "getitem",
    torch.rsqrt: "rsqrt", torch.mean: "mean", torch.tanh: "tanh",
    torch.cat: "cat", torch.where: "where", torch.arange: "arange", torch.zeros: "zeros",
    torch.unsqueeze: "unsqueeze", torch.reshape: "reshape", torch.transpose: "transpose",
    F.silu: "silu", F.gelu: "gelu", F.layer_norm: "layer_norm", F.linear: "linear",
    F.softmax: "softmax", torch.softmax: "softmax", F.dropout: "dropout",
    F.cross_entropy: "cross_entropy", F.scaled_dot_product_attention: "sdpa",
}
_METHODS = {
    "mul": "mul", "add": "add", "div": "div", "pow": "pow", "neg": "neg", "rsqrt": "rsqrt", "mean": "mean",
    "tanh": "tanh", "matmul": "matmul", "softmax": "softmax", "unsqueeze": "unsqueeze", "reshape": "reshape",
    "view": "view", "expand": "expand", "transpose": "transpose", "flatten": "flatten", "new_ones": "new_ones",
    "contiguous": "contiguous", "le": "le", "ge": "ge",
}
_CASTS = {"to", "float", "type", "double", "half", "bfloat16"}


def kind(node: Any) -> str | None:
    """The op family of ``node`` ("mul" for ``a * b``, ``torch.mul`` and ``a.mul``)."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_function":
        return _FUNCTIONS.get(node.target)
    if node.op == "call_method":
        if node.target in _CASTS:
            return "cast"
        return _METHODS.get(node.target)
    return None


def val(node: Any):
    """The example value Dynamo recorded for ``node`` (a FakeTensor), or None."""
    if not isinstance(node, fx.Node):
        return None
    v = node.meta.get("example_value", node.meta.get("val"))
    return v if isinstance(v, torch.Tensor) else None


def _kernel(module: str, name: str) -> Callable:
    return getattr(importlib.import_module(f"zerograph.kernels.{module}"), name)


@dataclasses.dataclass
class Match:
    """``fn(*args, **kwargs)`` replaces ``output`` (or, when ``fn`` returns a
    tuple, ``outputs[i]`` becomes its ``i``-th element). ``interior`` nodes are
    computed only for the outputs: the rewrite is refused if one has another
    user, and they are erased. ``loose`` nodes (a mask shared by every layer,
    an unsqueezed ``cos``) are erased once nothing uses them any more.
    ``adapters[i] = (f, extra)`` feeds ``f(args[i], *extra)`` to the fused
    call instead of ``args[i]`` (a reshape the fused op needs)."""

    pattern: str
    output: fx.Node
    interior: list[fx.Node]
    fn: Callable
    args: tuple
    kwargs: dict = dataclasses.field(default_factory=dict)
    outputs: tuple[fx.Node, ...] = ()
    loose: list[fx.Node] = dataclasses.field(default_factory=list)
    adapters: dict[int, tuple[Callable, tuple]] = dataclasses.field(default_factory=dict)


def _bind(node: fx.Node, names: tuple[str, ...], defaults: dict) -> dict | None:
    """Positional and keyword arguments of a call by parameter name."""
    args = node.args  # a method's self is its first parameter
    if len(args) > len(names):
        return None
    out = dict(defaults)
    out.update(zip(names, args))
    for k, v in node.kwargs.items():
        if k not in names:
            return None
        out[k] = v
    return out


def _operands(node: fx.Node) -> tuple[Any, Any] | None:
    args = node.args
    return (args[0], args[1]) if len(args) == 2 and not node.kwargs else None


def _single_use(node: Any, user: fx.Node) -> bool:
    return isinstance(node, fx.Node) and set(node.users) == {user}


def _is_number(x: Any, value: float, rel: float = 0.0) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and abs(x - value) <= rel * abs(value)


def _last_dim(dim: Any, ndim: int) -> bool:
    if isinstance(dim, (list, tuple)):
        if len(dim) != 1:
            return False
        dim = dim[0]
    return isinstance(dim, int) and not isinstance(dim, bool) and dim % ndim == ndim - 1


# --------------------------------------------------------------------------- norms


def match_layer_norm(node: fx.Node) -> Match | None:
    """``F.layer_norm(x, (D,), w, b, eps)`` over the last dimension."""
    if kind(node) != "layer_norm":
        return None
    a = _bind(node, ("input", "normalized_shape", "weight", "bias", "eps"), {"weight": None, "bias": None, "eps": 1e-5})
    x = val(a and a["input"])
    if a is None or x is None or not x.is_floating_point() or x.dim() == 0:
        return None
    shape = a["normalized_shape"]
    if isinstance(shape, int):
        shape = (shape,)
    if tuple(shape) != (x.shape[-1],) or not isinstance(a["eps"], (int, float)):
        return None
    for t in (a["weight"], a["bias"]):
        if t is not None and (val(t) is None or tuple(val(t).shape) != (x.shape[-1],)):
            return None
    fn = _kernel("layer_norm", "layer_norm")
    return Match("layer_norm", node, [], fn, (a["input"], a["weight"], a["bias"], float(a["eps"])))


def _cast_source(node: Any) -> tuple[Any, torch.dtype] | None:
    """``(source, dtype)`` of a pure dtype cast (``.to(dtype)``, ``.float()``, ...)."""
    if kind(node) != "cast" or val(node) is None or val(node.args[0]) is None:
        return None
    src = node.args[0]
    if val(src).device != val(node).device or val(src).shape != val(node).shape:
        return None
    extra = list(node.args[1:]) + list(node.kwargs.values())
    if any(isinstance(e, fx.Node) for e in extra):
        return None
    return src, val(node).dtype


def match_rms_norm(node: fx.Node) -> Match | None:
    """Hugging Face ``LlamaRMSNorm``: ``w * (xf * rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)``
    with ``xf = x.to(float32)`` (casts optional where x is already fp32)."""
    if kind(node) != "mul" or val(node) is None:
        return None
    ops = _operands(node)
    if ops is None:
        return None
    for weight, normed in (ops, ops[::-1]):
        m = _rms_norm_from(node, weight, normed)
        if m is not None:
            return m
    return None


def _rms_norm_from(node: fx.Node, weight: Any, normed: Any) -> Match | None:
    w = val(weight)
    if w is None or w.dim() != 1 or not isinstance(normed, fx.Node):
        return None
    interior: list[fx.Node] = []
    out_dtype = None
    cast = _cast_source(normed)
    if cast is not None and _single_use(normed, node):
        interior.append(normed)
        normed, out_dtype = cast
    if kind(normed) != "mul" or not _single_use(normed, interior[-1] if interior else node):
        return None
    ops = _operands(normed)
    if ops is None:
        return None
    for xf, r in (ops, ops[::-1]):
        found = _rsqrt_chain(r, xf, normed)
        if found is None:
            continue
        eps, chain = found
        x = xf
        xcast = _cast_source(xf)
        if xcast is not None and xcast[1] == torch.float32:
            x = xcast[0]
        xv = val(x)
        if xv is None or val(xf).dtype != torch.float32 or xv.shape[-1] != w.shape[0]:
            continue
        # the kernel rounds the normalized value to x.dtype before the weight multiply
        if (out_dtype or torch.float32) != xv.dtype:
            continue
        inner = interior + [normed] + chain
        if x is not xf and set(xf.users) <= set(inner):
            inner.append(xf)
        return Match("rms_norm", node, inner, _kernel("rms_norm", "rms_norm"), (x, weight, eps))
    return None


def _rsqrt_chain(r: Any, xf: Any, user: fx.Node) -> tuple[float, list[fx.Node]] | None:
    if kind(r) != "rsqrt" or not _single_use(r, user) or len(r.args) != 1:
        return None
    add = r.args[0]
    if kind(add) != "add" or not _single_use(add, r):
        return None
    ops = _operands(add)
    if ops is None:
        return None
    for var, eps in (ops, ops[::-1]):
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or kind(var) != "mean":
            continue
        if not _single_use(var, add):
            continue
        a = _bind(var, ("input", "dim", "keepdim"), {"keepdim": False})
        if a is None or a["keepdim"] is not True or "dtype" in var.kwargs:
            continue
        sq = a["input"]
        if val(xf) is None or not _last_dim(a.get("dim"), val(xf).dim()) or not _single_use(sq, var):
            continue
        sq_ops = _operands(sq) if isinstance(sq, fx.Node) else None
        if sq_ops is None or sq_ops[0] is not xf:
            continue
        if (kind(sq) == "pow" and _is_number(sq_ops[1], 2.0)) or (kind(sq) == "mul" and sq_ops[1] is xf):
            return float(eps), [r, add, var, sq]
    return None


# --------------------------------------------------------------------------- activations


def match_gelu(node: fx.Node) -> Match | None:
    """``F.gelu(x, approximate="none"|"tanh")``."""
    if kind(node) != "gelu":
        return None
    a = _bind(node, ("input", "approximate"), {"approximate": "none"})
    if a is None or a["approximate"] not in ("none", "tanh") or val(a["input"]) is None:
        return None
    return Match("gelu", node, [], _kernel("gelu", "gelu"), (a["input"], a["approximate"]))


def _scaled(node: Any, factor: float) -> Any:
    """``y`` when ``node`` is ``factor * y`` or ``y * factor`` (a Python number), else None."""
    if kind(node) != "mul":
        return None
    ops = _operands(node)
    if ops is None:
        return None
    for c, y in (ops, ops[::-1]):
        if _is_number(c, factor, 1e-6) and isinstance(y, fx.Node):
            return y
    return None


def _sum_with(node: Any, pred: Callable[[Any], Any]) -> tuple[Any, Any] | None:
    """``(a, pred(b))`` for ``node = a + b`` (either order) where ``pred(b)`` is not None."""
    if kind(node) != "add":
        return None
    ops = _operands(node)
    if ops is None:
        return None
    for a, b in (ops, ops[::-1]):
        got = pred(b)
        if got is not None:
            return a, got
    return None


def match_gelu_new(node: fx.Node) -> Match | None:
    """GPT-2's ``gelu_new`` / ``NewGELUActivation`` written out::

        0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))

    (operands of ``*`` and ``+`` in either order) -> ``gelu(x, "tanh")``. The
    constants are checked to 1e-6 relative; fp32 results differ from the
    formula by round-off only (the kernel evaluates the same expression)."""
    if kind(node) != "mul" or val(node) is None:
        return None
    ops = _operands(node)
    if ops is None:
        return None
    for half_x, one_plus in (ops, ops[::-1]):
        x = _scaled(half_x, 0.5)
        if x is None or val(x) is None or not val(x).is_floating_point():
            continue
        found = _sum_with(one_plus, lambda t: t if _is_number(t, 1.0) else None)
        if found is None or kind(found[0]) != "tanh" or len(found[0].args) != 1 or found[0].kwargs:
            continue
        tanh = found[0]
        inner = _scaled(tanh.args[0], math.sqrt(2.0 / math.pi))
        cubic = _sum_with(inner, lambda t: _scaled(t, 0.044715))
        if cubic is None or cubic[0] is not x:
            continue
        cube = cubic[1]
        pow_ops = _operands(cube) if kind(cube) == "pow" else None
        if pow_ops is None or pow_ops[0] is not x or not _is_number(pow_ops[1], 3.0):
            continue
        if val(node).shape != val(x).shape or val(node).dtype != val(x).dtype:
            continue
        interior = [half_x, one_plus, tanh, tanh.args[0], inner, _cubic_term(inner, cube), cube]
        return Match("gelu_new", node, interior, _kernel("gelu", "gelu"), (x, "tanh"))
    return None


def _cubic_term(inner: fx.Node, cube: fx.Node) -> fx.Node:
    """The ``0.044715 * cube`` operand of ``inner = x + 0.044715 * cube``."""
    return next(a for a in inner.args if isinstance(a, fx.Node) and kind(a) == "mul" and cube in a.args)


def match_swiglu(node: fx.Node) -> Match | None:
    """``F.silu(gate) * up`` with ``gate`` and ``up`` of one shape (the Llama MLP)."""
    if kind(node) != "mul" or val(node) is None:
        return None
    ops = _operands(node)
    if ops is None:
        return None
    for act, up in (ops, ops[::-1]):
        if kind(act) != "silu" or not _single_use(act, node):
            continue
        a = _bind(act, ("input", "inplace"), {"inplace": False})
        if a is None or a["inplace"] is not False:
            continue
        g, u = val(a["input"]), val(up)
        if g is None or u is None or g.shape != u.shape or g.dtype != u.dtype or not g.is_floating_point():
            continue
        return Match("swiglu", node, [act], _kernel("swiglu", "swiglu"), (a["input"], up))
    return None


# --------------------------------------------------------------------------- loss


def match_cross_entropy(node: fx.Node) -> Match | None:
    """``F.cross_entropy`` on ``(N, V)`` logits and ``(N,)`` class indices, no weights or smoothing."""
    if kind(node) != "cross_entropy":
        return None
    names = ("input", "target", "weight", "size_average", "ignore_index", "reduce", "reduction", "label_smoothing")
    a = _bind(node, names, {"weight": None, "size_average": None, "ignore_index": -100, "reduce": None,
                            "reduction": "mean", "label_smoothing": 0.0})
    if a is None or a["weight"] is not None or a["size_average"] is not None or a["reduce"] is not None:
        return None
    logits, target = val(a["input"]), val(a["target"])
    if logits is None or target is None or logits.dim() != 2 or not logits.is_floating_point():
        return None
    if target.dim() != 1 or target.dtype not in (torch.int64, torch.int32):
        return None
    if a["label_smoothing"] != 0.0 or a["reduction"] not in ("mean", "sum", "none"):
        return None
    if not isinstance(a["ignore_index"], int) or isinstance(a["ignore_index"], bool):
        return None
    fn = _kernel("cross_entropy", "cross_entropy")
    return Match("cross_entropy", node, [], fn, (a["input"], a["target"], a["ignore_index"], a["reduction"]))


def linear_cross_entropy_fp32(
    hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, bias: torch.Tensor | None = None,
    ignore_index: int = -100, reduction: str = "mean",
) -> torch.Tensor:
    """:func:`zerograph.kernels.cross_entropy.linear_cross_entropy` with its fp32
    loss not rounded to ``hidden``'s dtype: what ``F.cross_entropy(F.linear(h, w, b).float(), y)``
    returns. The replacement :func:`match_linear_cross_entropy` emits when the
    graph upcasts the logits before the loss (Hugging Face, nanoGPT)."""
    from zerograph.kernels.cross_entropy import linear_cross_entropy

    if hidden.dtype == torch.float32 or torch.is_autocast_enabled(hidden.device.type):
        return linear_cross_entropy(hidden, weight, target, bias, ignore_index, reduction).float()
    grad = torch.is_grad_enabled()
    loss, *_ = torch.ops.zerograph.linear_cross_entropy(
        hidden, weight, target, bias, int(ignore_index), reduction,
        grad and hidden.requires_grad, grad and weight.requires_grad,
        grad and bias is not None and bias.requires_grad,
    )
    return loss


def _flatten_chain(node: Any, user: fx.Node) -> tuple[fx.Node, list[fx.Node], bool] | None:
    """Walk back from the logits fed to the loss through reshapes to ``(N, V)``
    and dtype casts to the ``F.linear`` that made them: ``(linear, chain, upcast)``."""
    chain: list[fx.Node] = []
    upcast = False
    while isinstance(node, fx.Node) and kind(node) != "linear":
        if not _single_use(node, chain[-1] if chain else user):
            return None
        k = kind(node)
        if k == "cast":
            cast = _cast_source(node)
            if cast is None or cast[1] != torch.float32:
                return None
            upcast = True
            chain.append(node)
            node = cast[0]
        elif k in ("view", "reshape", "flatten", "contiguous"):
            src, out = val(node.args[0]) if node.args else None, val(node)
            if src is None or out is None or src.shape[-1] != out.shape[-1] or out.numel() != src.numel():
                return None  # only flattening of the leading dimensions keeps the last one and the size
            chain.append(node)
            node = node.args[0]
        else:
            return None
    if kind(node) != "linear" or not _single_use(node, chain[-1] if chain else user):
        return None
    return node, chain, upcast


def match_linear_cross_entropy(node: fx.Node) -> Match | None:
    """``F.cross_entropy(F.linear(h, W, b)[.float()].view(-1, V), y)`` where the
    logits feed nothing but the loss (no ``return logits``) ->
    ``linear_cross_entropy(h.reshape(-1, H), W, y, b, ignore_index, reduction)``,
    which never materializes the ``(N, V)`` logits. With a ``.float()`` on the
    logits the loss is returned in fp32 (:func:`linear_cross_entropy_fp32`)."""
    ce = match_cross_entropy(node)
    if ce is None or ce.args[3] == "none":
        return None
    found = _flatten_chain(ce.args[0], node)
    if found is None:
        return None
    linear, chain, upcast = found
    a = _bind(linear, ("input", "weight", "bias"), {"bias": None})
    if a is None:
        return None
    h, w = val(a["input"]), val(a["weight"])
    b = val(a["bias"]) if a["bias"] is not None else None
    if h is None or w is None or w.dim() != 2 or h.dim() < 1 or h.shape[-1] != w.shape[1]:
        return None
    if (a["bias"] is not None and (b is None or tuple(b.shape) != (w.shape[0],))) or h.dtype != w.dtype:
        return None
    adapters = {} if h.dim() == 2 else {0: (torch.reshape, ((-1, h.shape[-1]),))}
    fn = linear_cross_entropy_fp32 if upcast else _kernel("cross_entropy", "linear_cross_entropy")
    args = (a["input"], a["weight"], ce.args[1], a["bias"], ce.args[2], ce.args[3])
    return Match("linear_cross_entropy", node, [linear, *chain], fn, args, adapters=adapters)
