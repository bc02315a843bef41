"""``sequence_tiling`` (Dynamo graph): ALST's tiled MLP and tiled logits+loss.

With ``zerograph.sequence_tiling`` set, every per-token MLP and the LM head
with its cross-entropy are computed in tiles along the sequence (each
rank's part of it under sequence parallelism; tile lengths from
:func:`zerograph.planner.sequence_tiling.tile_sizes`), and every tile's
intermediates are recomputed in the backward (``node.meta["recompute"] =
MUST_RECOMPUTE``, which AOTAutograd copies to the ATen nodes; its
partitioner then saves only each tile's input and recomputes the rest just
before that tile's backward). The largest intermediate is one tile's: a
tile's MLP hidden ``[b, t, 4h]``, a tile's logits ``[b·t, vocab]``.

* **MLP**: a ``linear`` (the down projection) whose input is computed only
  by pointwise ops (gelu, silu, mul, ...) from one or more ``linear`` layers
  of the same 3-D input ``x`` (``[b, s, h]``; nanoGPT's ``fc → gelu →
  proj``, Llama's ``down(silu(gate(x)) * up(x))``), none of which is used
  elsewhere. Rewritten as ``split(x, tiles, 1)``, the region copied per tile,
  and ``cat(..., 1)``.
* **logits + loss**: ``F.cross_entropy(view(linear(h)), view(labels))``,
  the logits reaching the loss through views and casts only, and labels
  ``[b, s]`` reshaped. Rewritten as a sum of per-tile ``cross_entropy(...,
  reduction="sum")``; a mean loss is divided by the count of labels that are
  not ``ignore_index`` (exactly ``F.cross_entropy``'s mean). Under sequence
  parallelism the ``sequence_parallel`` pass ran first and the loss here is
  already its per-rank sum. Logits that the model also returns are
  replaced by an empty ``[b, s, 0]`` tensor (as Liger's fused loss returns no
  logits): returning them would materialise what the tiling avoids.

On a pre-norm MLP block and an LM head with a mean loss, 2 rows x 8
positions, tiles of 4 (the golden test; ``# recompute`` marks the tagged
nodes)::

    split:  = split(layer_norm, [4, 4], 1)
    getitem: f32[2, 4, 16] = getitem(split, 0)
    linear: f32[2, 4, 64] = linear(getitem, unshard_2, unshard_3)            # recompute
    gelu: f32[2, 4, 64] = gelu(linear, approximate='tanh')                   # recompute
    linear_1: f32[2, 4, 16] = linear(gelu, unshard_4, unshard_5)
    ...                                                                      # tile 1 the same
    cat: f32[2, 8, 16] = cat([linear_1, linear_3], 1)
    x: f32[2, 8, 16] = add(l_args_0_, cat)
    split_1:  = split(x, [4, 4], 1)
    split_2:  = split(l_args_1_, [4, 4], 1)
    getitem_2: f32[2, 4, 16] = getitem(split_1, 0)
    getitem_3: i64[2, 4] = getitem(split_2, 0)
    linear_4: f32[2, 4, 11] = linear(getitem_2, unshard_6, None)             # recompute
    reshape: f32[8, 11] = reshape(linear_4, [-1, 11])                        # recompute
    reshape_1: i64[8] = reshape(getitem_3, [-1])
    cross_entropy: f32[] = cross_entropy(reshape, reshape_1, ignore_index=-100, reduction='sum')  # recompute
    ...                                                                      # tile 1 the same
    add: f32[] = add(cross_entropy, cross_entropy_1)
    ne: bool[2, 8] = ne(l_args_1_, -100)
    sum: i64[] = sum(ne)
    truediv: f32[] = truediv(add, sum)
"""

from __future__ import annotations

import logging
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy

from zerograph._torch_private import nn_binding
from zerograph.graph.example_values import refresh_example_values
from zerograph.graph.tp_ops import LINEAR_FUNCTIONS, full_shape, module_of
from zerograph.passes.manager import PassContext, PassResult
from zerograph.planner.sequence_tiling import tile_sizes

log = logging.getLogger(__name__)

_POINTWISE_FUNCTIONS = {
    F.gelu, nn_binding("gelu"), F.silu, F.relu, torch.relu, F.sigmoid, torch.sigmoid, torch.tanh, F.tanh,
    operator.mul, operator.add, operator.sub, operator.truediv, operator.pow, operator.neg,
    torch.mul, torch.add, torch.sub, torch.pow, torch.neg,
}
_POINTWISE_METHODS = {"mul", "add", "sub", "pow", "tanh", "sigmoid", "relu", "neg", "div"}
_ROW_VIEWS = {"view", "reshape", "flatten", "contiguous"}  # call_method names (and torch.* of the same name)
_CASTS = {"float", "to", "type_as", "bfloat16", "half"}
_CE_KEYS = ("input", "target", "weight", "size_average", "ignore_index", "reduce", "reduction", "label_smoothing")


def _name(node: fx.Node) -> str:
    if node.op == "call_method":
        return node.target
    return getattr(node.target, "__name__", "") if node.op == "call_function" else ""


def _is_linear(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in LINEAR_FUNCTIONS


def _is_pointwise(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _POINTWISE_FUNCTIONS
    return node.op == "call_method" and node.target in _POINTWISE_METHODS


def _recompute(node: fx.Node) -> fx.Node:
    node.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
    return node


# ---- MLP --------------------------------------------------------------------------------------------------------------


def _mlp_region(down: fx.Node):
    """``(x, nodes in graph order)`` of the MLP ending in the linear ``down``, or None."""
    if not _is_linear(down) or not isinstance(down.args[0], fx.Node):
        return None
    region, ups, stack = set(), [], [down.args[0]]
    while stack:
        node = stack.pop()
        if node in region:
            continue
        if _is_linear(node):
            ups.append(node)
        elif not _is_pointwise(node):
            return None
        region.add(node)
        if not _is_linear(node):
            stack.extend(a for a in node.all_input_nodes)
    xs = {u.args[0] for u in ups}
    if not ups or len(xs) != 1 or len(region) == len(ups):  # no activation between: not an MLP
        return None
    x = xs.pop()
    shape = full_shape(x)
    if shape is None or len(shape) != 3 or full_shape(down) is None or len(full_shape(down)) != 3:
        return None
    for node in region:
        if any(user not in region and user is not down for user in node.users):
            return None  # an intermediate used outside: the whole of it is needed anyway
        for arg in node.all_input_nodes:
            if arg not in region and not _is_linear(node):
                return None  # a pointwise op reads something from outside (not per token)
    order = [n for n in down.graph.nodes if n in region] + [down]
    return x, order


def _tile_mlp(gm: fx.GraphModule, x: fx.Node, order: list[fx.Node], sizes: list[int]) -> None:
    graph, down = gm.graph, order[-1]
    with graph.inserting_before(down):
        parts = graph.call_function(torch.split, (x, sizes, 1))
        outs = []
        for i in range(len(sizes)):
            env = {x: graph.call_function(operator.getitem, (parts, i))}
            for node in order:
                new = graph.node_copy(node, lambda a: env.get(a, a))
                env[node] = new if node is down else _recompute(new)
            outs.append(env[down])
        cat = graph.call_function(torch.cat, (outs, 1))
    down.replace_all_uses_with(cat)
    for node in reversed(order):
        graph.erase_node(node)


# ---- logits + loss ----------------------------------------------------------------------------------------------------


def _ce_kwargs(node: fx.Node) -> dict:
    return {**{_CE_KEYS[i]: a for i, a in enumerate(node.args[2:], 2)}, **node.kwargs}


def _back_through(node, names) -> tuple[fx.Node, list[fx.Node]]:
    chain = []
    while isinstance(node, fx.Node) and _name(node) in names and node.args and isinstance(node.args[0], fx.Node):
        chain.append(node)
        node = node.args[0]
    return node, chain


def _loss_region(ce: fx.Node):
    """``(lm_head linear, labels [b, s], chain from the logits to the loss input)`` or None."""
    if ce.op != "call_function" or ce.target is not F.cross_entropy or len(ce.args) < 2:
        return None
    kw = _ce_kwargs(ce)
    if kw.get("weight") is not None or kw.get("size_average") is not None or kw.get("reduce") is not None:
        return None
    if kw.get("reduction", "mean") not in ("mean", "sum"):
        return None
    head, chain = _back_through(ce.args[0], _ROW_VIEWS | _CASTS)
    labels, label_chain = _back_through(ce.args[1], _ROW_VIEWS | {"to"})
    hs, ls = full_shape(head), full_shape(labels)
    if not _is_linear(head) or hs is None or ls is None or len(hs) != 3 or tuple(ls) != tuple(hs[:2]):
        return None
    if full_shape(head.args[0]) is None or len(full_shape(ce.args[0])) != 2:
        return None
    for node in chain:  # each link used only by the next one (or by the loss)
        if len(node.users) != 1:
            return None
    if any(user.op != "output" and user not in chain and user is not ce for user in head.users):
        return None
    return head, labels, chain, label_chain


def _tile_loss(gm: fx.GraphModule, ce: fx.Node, head: fx.Node, labels: fx.Node, chain: list[fx.Node],
               label_chain: list[fx.Node], sizes: list[int]) -> None:
    graph = gm.graph
    kw = _ce_kwargs(ce)
    reduction, ignore = kw.get("reduction", "mean"), kw.get("ignore_index", -100)
    vocab = full_shape(head)[-1]
    dtype = ce.args[0].meta["example_value"].dtype
    target_dtype = ce.args[1].meta["example_value"].dtype
    hidden = head.args[0]
    with graph.inserting_before(ce):
        h_parts = graph.call_function(torch.split, (hidden, sizes, 1))
        l_parts = graph.call_function(torch.split, (labels, sizes, 1))
        total = None
        for i in range(len(sizes)):
            h = graph.call_function(operator.getitem, (h_parts, i))
            lab = graph.call_function(operator.getitem, (l_parts, i))
            logits = _recompute(graph.node_copy(head, lambda a: h if a is hidden else a))
            rows = _recompute(graph.call_method("reshape", (logits, [-1, vocab])))
            if dtype != head.meta["example_value"].dtype:
                rows = _recompute(graph.call_method("to", (rows, dtype)))
            target = graph.call_method("reshape", (lab, [-1]))
            if target_dtype != labels.meta["example_value"].dtype:
                target = graph.call_method("to", (target, target_dtype))
            kwargs = {"ignore_index": ignore, "reduction": "sum"}
            if kw.get("label_smoothing"):
                kwargs["label_smoothing"] = kw["label_smoothing"]
            loss = _recompute(graph.call_function(F.cross_entropy, (rows, target), kwargs))
            total = loss if total is None else graph.call_function(operator.add, (total, loss))
        if reduction == "mean":
            kept = graph.call_function(torch.ne, (labels, ignore))
            count = graph.call_function(torch.sum, (kept,))
            total = graph.call_function(operator.truediv, (total, count))
    ce.replace_all_uses_with(total)
    graph.erase_node(ce)
    for node in chain:
        graph.erase_node(node)
    for node in label_chain:  # the labels' reshapes, unless something else reads them (sp's token count)
        if not node.users:
            graph.erase_node(node)
    outputs = [u for u in head.users if u.op == "output"]
    if outputs:  # logits returned next to the loss: empty, as with a fused loss
        rows_cols = full_shape(head)[:2]
        with graph.inserting_before(outputs[0]):
            empty = graph.call_method("new_empty", (hidden, (*rows_cols, 0)))
        head.replace_all_uses_with(empty)
        log.info("sequence_tiling: %s: the logits are computed in tiles inside the loss; the model returns empty "
                 "logits [%d, %d, 0] (set zerograph.sequence_tiling to null to get them)", module_of(head),
                 *rows_cols)
    if not head.users:
        graph.erase_node(head)


def sequence_tiling(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    setting = ctx.config.zerograph.sequence_tiling
    if setting is None:
        return PassResult(details={"skipped": "zerograph.sequence_tiling is null"})
    counts = {"mlp": 0, "loss": 0}
    largest = {"mlp_tile_tokens": 0, "loss_tile_tokens": 0}
    gone: set[fx.Node] = set()
    for node in list(gm.graph.nodes):
        if node in gone:
            continue
        found = _mlp_region(node) if _is_linear(node) else None
        if found is not None:
            x, order = found
            b, s, width = full_shape(x)
            sizes = tile_sizes(s, setting, width)
            if sizes:
                _tile_mlp(gm, x, order, sizes)
                gone.update(order)
                counts["mlp"] += 1
                largest["mlp_tile_tokens"] = max(largest["mlp_tile_tokens"], b * max(sizes))
            continue
        loss = _loss_region(node)
        if loss is not None:
            head, labels, chain, label_chain = loss
            b, s, width = full_shape(head.args[0])
            sizes = tile_sizes(s, setting, width)
            if sizes:
                _tile_loss(gm, node, head, labels, chain, label_chain, sizes)
                gone.update((node, head, *chain))
                counts["loss"] += 1
                largest["loss_tile_tokens"] = max(largest["loss_tile_tokens"], b * max(sizes))
    changed = any(counts.values())
    if changed:
        gm.graph.lint()
        gm.recompile()
        refresh_example_values(gm)
    return PassResult(changed=changed, details={**counts, **largest})
