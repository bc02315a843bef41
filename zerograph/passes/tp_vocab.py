"""Vocab-parallel embedding and cross-entropy (``zerograph.tp_vocab_parallel``),
part of the ``tensor_parallel`` pass.

With the embedding's and the LM head's rows split over the vocabulary (tp
rank ``i`` holds tokens ``[i·n, (i+1)·n)``, ``n = V / tp``; a tied weight is
one parameter split once), Megatron's rewrites:

* ``embedding(ids, W)`` looks up the ids this rank holds and zeros the
  others, then sums over tp::

      local = ids - i·n;  outside = (local < 0) | (local >= n)
      e = embedding(local.masked_fill(outside, 0), W_i).masked_fill(outside[..., None], 0)
      tp_all_reduce(e)

* the LM head is a column split: its logits are this rank's vocabulary
  slice ``[N, n]`` and stay split;
* ``cross_entropy(logits, t)`` on them never assembles a full row::

      m   = tp_all_reduce_max(amax(logits.detach(), -1, keepdim))
      z   = logits - m
      se  = tp_all_reduce(sum(exp(z), -1))
      pick = tp_all_reduce(gather(z, 1, t - i·n).masked_fill(outside, 0))
      loss = mean over t != ignore_index of (log(se) - pick)

  ``tp_all_reduce``'s backward is the identity, so each rank's logits get
  ``softmax - onehot`` of their own slice (no backward communication).

A pipeline stage's graph is torch.export's ATen IR: ``aten.embedding(W,
ids, padding_idx)`` and ``aten.cross_entropy_loss(logits, t, weight,
reduction, ignore_index, label_smoothing)`` are first put in their
torch-level form (:func:`as_torch_level`), then rewritten as above.
"""

from __future__ import annotations

import inspect
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from zerograph.graph.tp_markers import TP_ALL_REDUCE, TP_ALL_REDUCE_MAX
from zerograph.graph.tp_ops import full_shape, module_of
from zerograph.runtime.tp_layout import TensorParallelError, TpLayout

_aten = torch.ops.aten
EMBEDDING = (F.embedding, _aten.embedding.default)
CROSS_ENTROPY = (F.cross_entropy, _aten.cross_entropy_loss.default)
_REDUCTIONS = {0: "none", 1: "mean", 2: "sum"}  # ATen's reduction enum
_CE_SIGNATURE = inspect.signature(F.cross_entropy)
_EMB_SIGNATURE = inspect.signature(F.embedding)


def vocab_operand(node: fx.Node):
    """The weight an embedding reads, or the logits a cross-entropy reads (either form)."""
    if node.target is _aten.embedding.default:
        return node.kwargs.get("weight", node.args[0] if node.args else None)
    if node.target in EMBEDDING:
        return node.kwargs.get("weight", node.args[1] if len(node.args) > 1 else None)
    return node.kwargs.get("input", node.kwargs.get("self", node.args[0] if node.args else None))


def as_torch_level(node: fx.Node) -> None:
    """An ATen embedding or cross-entropy (a pipeline stage's graph) becomes
    the ``F.embedding`` / ``F.cross_entropy`` call it stands for, in place."""
    if node.op != "call_function":
        return
    if node.target is _aten.embedding.default:
        args = dict(zip(("weight", "indices", "padding_idx", "scale_grad_by_freq", "sparse"), node.args),
                    **node.kwargs)
        padding = args.get("padding_idx", -1)
        node.target, node.args = F.embedding, (args["indices"], args["weight"])
        node.kwargs = {"padding_idx": None if padding == -1 else padding,
                       "scale_grad_by_freq": args.get("scale_grad_by_freq", False),
                       "sparse": args.get("sparse", False)}
    elif node.target is _aten.cross_entropy_loss.default:
        names = ("input", "target", "weight", "reduction", "ignore_index", "label_smoothing")
        args = dict(zip(names, node.args), **node.kwargs)
        node.target, node.args = F.cross_entropy, (args["input"], args["target"])
        node.kwargs = {"weight": args.get("weight"), "reduction": _REDUCTIONS[args.get("reduction", 1)],
                       "ignore_index": args.get("ignore_index", -100),
                       "label_smoothing": args.get("label_smoothing", 0.0)}


def _emit(graph: fx.Graph, like: fx.Node, target, *args, **kwargs) -> fx.Node:
    node = graph.call_function(target, args, kwargs)
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
        if key in like.meta:
            node.meta[key] = like.meta[key]
    return node


def _outside(graph: fx.Graph, like: fx.Node, ids: fx.Node, layout: TpLayout) -> tuple[fx.Node, fx.Node]:
    """(ids shifted to this rank's rows with the others at 0, the mask of the others)."""
    n = layout.local_shape[0]
    local = _emit(graph, like, operator.sub, ids, layout.index * n)
    low = _emit(graph, like, operator.lt, local, 0)
    high = _emit(graph, like, operator.ge, local, n)
    outside = _emit(graph, like, operator.or_, low, high)
    return _emit(graph, like, torch.masked_fill, local, outside, 0), outside


def rewrite_embedding(graph: fx.Graph, node: fx.Node, layout: TpLayout, tag: str) -> fx.Node:
    """``node`` (an embedding lookup in this rank's vocabulary rows) made
    whole again; returns the node that replaces it."""
    bound = _EMB_SIGNATURE.bind(*node.args, **node.kwargs)
    args = bound.arguments
    if args.get("max_norm") is not None or args.get("sparse", False):
        raise TensorParallelError(f"tensor parallelism: {module_of(node)}: a vocab-parallel embedding with max_norm "
                                  "or sparse gradients is not done; set zerograph.tp_vocab_parallel to false")
    n = layout.local_shape[0]
    padding = args.get("padding_idx")
    if padding is not None:
        padding = padding % layout.whole_shape[0] - layout.index * n
        padding = padding if 0 <= padding < n else None
    with graph.inserting_before(node):
        ids, outside = _outside(graph, node, args["input"], layout)
    node.args, node.kwargs = (ids, args["weight"], padding), {}
    with graph.inserting_after(node):
        mask = _emit(graph, node, torch.unsqueeze, outside, -1)
    with graph.inserting_after(mask):
        zeroed = _emit(graph, node, torch.masked_fill, node, mask, 0.0)
    with graph.inserting_after(zeroed):
        whole = _emit(graph, node, TP_ALL_REDUCE, zeroed, tag)
    node.replace_all_uses_with(whole, delete_user_cb=lambda user: user is not zeroed)
    return whole


def rewrite_cross_entropy(graph: fx.Graph, node: fx.Node, layout: TpLayout, tag: str) -> fx.Node:
    """``node`` (cross-entropy of vocab-split logits ``[N, n]``) computed with
    tp all-reduces of ``N`` values; returns the node that replaces it."""
    bound = _CE_SIGNATURE.bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    a = bound.arguments
    if a["weight"] is not None or a["label_smoothing"] != 0.0 or a["size_average"] is not None \
            or a["reduce"] is not None:
        raise TensorParallelError(f"tensor parallelism: {module_of(node)}: vocab-parallel cross-entropy with class "
                                  "weights, label smoothing or size_average/reduce is not done; set "
                                  "zerograph.tp_vocab_parallel to false")
    logits, target = a["input"], a["target"]
    if len(full_shape(logits) or ()) != 2:
        raise TensorParallelError(f"tensor parallelism: {module_of(node)}: vocab-parallel cross-entropy needs logits "
                                  f"of shape [N, vocab], not {full_shape(logits)}")
    g = graph
    with g.inserting_before(node):
        frozen = _emit(g, node, torch.Tensor.detach, logits)
        local_max = _emit(g, node, torch.amax, frozen, -1, True)
        row_max = _emit(g, node, TP_ALL_REDUCE_MAX, local_max, tag)
        z = _emit(g, node, torch.sub, logits, row_max)
        local_sum = _emit(g, node, torch.sum, _emit(g, node, torch.exp, z), -1)
        sum_exp = _emit(g, node, TP_ALL_REDUCE, local_sum, tag)
        ids, outside = _outside(g, node, target, layout)
        picked = _emit(g, node, torch.gather, z, 1, _emit(g, node, torch.unsqueeze, ids, 1))
        picked = _emit(g, node, torch.masked_fill, _emit(g, node, torch.squeeze, picked, 1), outside, 0.0)
        picked = _emit(g, node, TP_ALL_REDUCE, picked, tag)
        per_row = _emit(g, node, torch.sub, _emit(g, node, torch.log, sum_exp), picked)
        ignored = _emit(g, node, operator.eq, target, a["ignore_index"])
        per_row = _emit(g, node, torch.masked_fill, per_row, ignored, 0.0)
        if a["reduction"] == "none":
            out = per_row
        elif a["reduction"] == "sum":
            out = _emit(g, node, torch.sum, per_row)
        elif a["reduction"] == "mean":
            kept = _emit(g, node, torch.sum, _emit(g, node, operator.invert, ignored))
            out = _emit(g, node, torch.div, _emit(g, node, torch.sum, per_row), kept)
        else:
            raise TensorParallelError(f"tensor parallelism: {module_of(node)}: cross-entropy reduction "
                                      f"{a['reduction']!r}")
    node.replace_all_uses_with(out)
    g.erase_node(node)
    return out
