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

LINEAR_FUNCTIONS = (nn_binding("linear"), torch.nn.functional.linear)
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
    if node.target is torch.addmm and len(node.args) == 3 and all(isinstance(a, fx.Node) for a in node.args):
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


def module_of(node: fx.Node) -> str:
    """The module path of the user's code that made ``node``, for messages."""
    return module_path_from_meta(node) or "<top level>"
