"""What tensor parallelism needs to recognise in a Dynamo graph (torch-level
ops, before AOTAutograd): linear layers, which parameter a value reads, and
the full (unsplit) shapes Dynamo recorded.

Shared by the planner's graph rule (:mod:`zerograph.planner.tp_plan`) and the
``tensor_parallel`` pass, so both see the same layers.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx

from zerograph._torch_private import nn_binding
from zerograph.graph.markers import UNSHARD
from zerograph.graph.tags import module_path_from_meta
from zerograph.graph.tp_markers import UNSHARD_WHOLE

_aten = torch.ops.aten
# a pipeline stage's graph is torch.export's ATen IR: aten.linear, aten.addmm
LINEAR_FUNCTIONS = (nn_binding("linear"), torch.nn.functional.linear, _aten.linear.default)
ADDMM_FUNCTIONS = (torch.addmm, _aten.addmm.default)
PARAM_READS = (UNSHARD, torch.ops.zerograph.unshard, UNSHARD_WHOLE, torch.ops.zerograph.unshard_whole)
ADDS = (operator.add, operator.iadd, torch.add)


@dataclasses.dataclass(frozen=True)
class LinearUse:
    """One linear layer call: ``F.linear(x, weight, bias)`` (weight ``[out, in]``)
    or, for Hugging Face's ``Conv1D``, ``torch.addmm(bias, x, weight)``
    (weight ``[in, out]``)."""

    node: fx.Node
    x: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    form: str  # "linear" or "addmm"

    @property
    def out_dim_of_weight(self) -> int:
        """The weight dimension of the output features."""
        return 0 if self.form == "linear" else 1


def linear_use(node: fx.Node) -> LinearUse | None:
    """``node`` as a linear layer call, or None."""
    if node.op != "call_function":
        return None
    if node.target in LINEAR_FUNCTIONS:
        args = list(node.args) + [None] * (3 - len(node.args))
        x = node.kwargs.get("input", args[0])
        weight = node.kwargs.get("weight", args[1])
        bias = node.kwargs.get("bias", args[2])
        if isinstance(x, fx.Node) and isinstance(weight, fx.Node):
            return LinearUse(node, x, weight, bias if isinstance(bias, fx.Node) else None, "linear")
    if node.target in ADDMM_FUNCTIONS and len(node.args) == 3 and all(isinstance(a, fx.Node) for a in node.args):
        if node.kwargs.get("beta", 1) == 1 and node.kwargs.get("alpha", 1) == 1:
            bias, x, weight = node.args
            return LinearUse(node, x, weight, bias, "addmm")
    return None


def param_read(node, placeholder_params: dict[str, str] | None = None) -> str | None:
    """The parameter ``node`` reads (its FQN): a zerograph marker, or a
    placeholder of a captured graph named in ``placeholder_params``."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_function" and node.target in PARAM_READS:
        return node.args[2]
    if node.op == "placeholder" and placeholder_params:
        return placeholder_params.get(node.name)
    return None


def full_shape(node) -> tuple[int, ...] | None:
    """The shape Dynamo recorded for ``node`` (None for a non-tensor)."""
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("example_value", node.meta.get("val"))
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def requires_grad(node) -> bool:
    """Whether the value Dynamo recorded for ``node`` carries a gradient."""
    val = node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else None
    return isinstance(val, torch.Tensor) and val.requires_grad


def module_of(node: fx.Node) -> str:
    """The module path of the user's code that made ``node``, for messages."""
    return module_path_from_meta(node) or "<top level>"


def _aten_table() -> dict:
    F = torch.nn.functional
    elementwise = {
        "add.Tensor": torch.add, "add.Scalar": torch.add, "sub.Tensor": torch.sub, "sub.Scalar": torch.sub,
        "rsub.Scalar": torch.sub, "mul.Tensor": torch.mul, "mul.Scalar": torch.mul, "div.Tensor": torch.div,
        "div.Scalar": torch.div, "neg.default": torch.neg, "tanh.default": torch.tanh,
        "sigmoid.default": torch.sigmoid, "rsqrt.default": torch.rsqrt, "sqrt.default": torch.sqrt,
        "exp.default": torch.exp, "pow.Tensor_Scalar": torch.pow, "relu.default": torch.relu,
        "where.self": torch.where, "clone.default": torch.clone, "erf.default": torch.erf, "abs.default": torch.abs,
        "gelu.default": F.gelu, "silu.default": F.silu, "dropout.default": F.dropout,
        "masked_fill.Scalar": "masked_fill", "contiguous.default": "contiguous", "detach.default": "detach",
        "alias.default": "detach",
    }
    shaped = {
        "view.default": "view", "reshape.default": "reshape", "_unsafe_view.default": "view",
        "expand.default": "expand", "transpose.int": "transpose", "permute.default": "permute",
        "unsqueeze.default": "unsqueeze", "split.Tensor": "split", "split_with_sizes.default": "split",
        "chunk.default": "chunk", "cat.default": torch.cat, "slice.Tensor": "slice", "select.int": "select",
        "scaled_dot_product_attention.default": F.scaled_dot_product_attention, "matmul.default": torch.matmul,
        "bmm.default": torch.bmm, "softmax.int": torch.softmax, "_softmax.default": torch.softmax,
        "mean.dim": torch.mean, "sum.dim_IntList": torch.sum, "amax.default": "amax",
        "layer_norm.default": F.layer_norm, "_to_copy.default": "to", "to.dtype": "to", "to.dtype_layout": "to",
        "type_as.default": "type_as", "flatten.using_ints": "flatten",
    }
    out = {}
    for name, op in {**elementwise, **shaped}.items():
        packet, overload = name.split(".")
        packet_op = getattr(_aten, packet, None)
        if packet_op is not None and hasattr(packet_op, overload):
            out[getattr(packet_op, overload)] = op
    return out


# ATen overload -> the torch-level function or method name whose tensor-parallel
# rule applies (the arguments are laid out the same way); ``slice``/``select``
# are ATen's indexing (``x[..., a:b]``, ``x[..., i]``)
ATEN_AS_TORCH = _aten_table()


def torch_level(node: fx.Node) -> tuple[object, str | None]:
    """``(function, method name)`` of ``node`` as its tensor-parallel rule
    knows it: a ``call_function`` of an ATen overload maps to the torch-level
    op it stands for (one of the pair is None)."""
    if node.op == "call_method":
        return None, node.target
    if node.op != "call_function":
        return None, None
    mapped = ATEN_AS_TORCH.get(node.target)
    if isinstance(mapped, str):
        return None, mapped
    return (mapped if mapped is not None else node.target), None
