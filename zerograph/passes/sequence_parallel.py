"""``sequence_parallel`` (Dynamo graph): Ulysses sequence parallelism.

Each rank runs the model on its ``1/sp`` of every sequence (the runtime cut
the inputs: :mod:`zerograph.runtime.sequence`). Everything but attention is
per-token and needs nothing; this pass rewrites the rest:

* **attention**: Hugging Face's eager attention subgraph (and nanoGPT-style
  ``softmax(q @ k^T) @ v`` code) first becomes zerograph's fused
  ``attention(q, k, v, causal=...)`` (the ``fuse_attention`` matcher, whether
  or not ``zerograph.fusion`` is on); then every
  ``F.scaled_dot_product_attention(q, k, v)`` or ``attention(q, k, v)`` (inputs
  ``[b, heads, s/sp, d]``) reads its inputs through ``sp_seq_to_heads`` (one
  all-to-all each: this rank's ``heads/sp`` heads of the whole sequence) and
  its output goes back through ``sp_heads_to_seq``. Key/value heads fewer
  than sp (grouped-query attention) are first repeated up to sp
  (``repeat_interleave``), so each rank gets the one its query heads use.
  With tensor parallelism ``tensor_parallel`` ran first: the heads here are
  this tp rank's (sp × tp), and sp splits those;
* **positions**: an ``arange`` of the local length that indexes an embedding
  (a learned positional embedding) starts at this rank's offset;
* **loss**: a mean ``F.cross_entropy`` becomes the mean over the global
  sequence: ``sp_all_reduce(sum of local losses) / sp_all_reduce(local
  non-ignored labels)``; a summed one is summed over the group.

On a block ``sdpa(q, k, v, is_causal=True)`` at sp=2 (the golden test)::

    sp_seq_to_heads: f32[2, 2, 8, 4] = zerograph.sp_seq_to_heads(q, 'zg0')   # q: f32[2, 4, 4, 4]
    sp_seq_to_heads_1 = zerograph.sp_seq_to_heads(k, 'zg0')
    sp_seq_to_heads_2 = zerograph.sp_seq_to_heads(v, 'zg0')
    sdpa: f32[2, 2, 8, 4] = scaled_dot_product_attention(sp_seq_to_heads, ..., is_causal=True)
    sp_heads_to_seq: f32[2, 4, 4, 4] = zerograph.sp_heads_to_seq(sdpa, 'zg0')

``lower_sp_markers`` lowers the markers to functional collectives.

A pipeline stage's graph is ATen (``torch.export``): there the pass finds
``aten.scaled_dot_product_attention`` (wrapped the same way),
``aten.cross_entropy_loss`` (reduction 1 = mean becomes 2 = sum, then the
same global mean) and ``aten.arange(n)`` indexing ``aten.embedding``
(``aten.arange.start(offset, offset + n)``); docs/long_sequences.md.
"""

from __future__ import annotations

import logging
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from zerograph._torch_private import nn_binding
from zerograph.graph.causal_mask import drop_constant_causal_mask
from zerograph.graph.example_values import refresh_example_values
from zerograph.graph.sp_ops import SP_ALL_REDUCE, SP_HEADS_TO_SEQ, SP_SEQ_TO_HEADS
from zerograph.graph.tp_ops import full_shape, module_of
from zerograph.passes.fusion import rewrite_matches
from zerograph.passes.fusion.attention import match_eager_attention
from zerograph.passes.fusion.patterns import _kernel
from zerograph.passes.manager import PassContext, PassResult
from zerograph.runtime.sequence import SequenceParallelError

log = logging.getLogger(__name__)

_aten = torch.ops.aten
# torch-level (Dynamo graphs of an nn.Module) and ATen (a pipeline stage's torch.export graph)
SDPA_FUNCTIONS = (nn_binding("scaled_dot_product_attention"), F.scaled_dot_product_attention,
                  _aten.scaled_dot_product_attention.default)
CROSS_ENTROPY = (F.cross_entropy,)
ATEN_CROSS_ENTROPY = (_aten.cross_entropy_loss.default,)
EMBEDDINGS = (F.embedding,)
ATEN_EMBEDDINGS = (_aten.embedding.default,)  # (weight, indices): the indices are argument 1
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
# ops a position index passes through on its way to an embedding
_INDEX_OPS = ("unsqueeze", "view", "expand", "reshape", "to", "long", "int", "contiguous", "flatten")


def _arg(node: fx.Node, i: int, name: str, default=None):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _valid_sizes(heads: int, kv_heads: int) -> list[int]:
    return [d for d in range(1, heads + 1) if heads % d == 0 and (kv_heads % d == 0 or d % kv_heads == 0)]


def _check_heads(node: fx.Node, sp: int, has_key_mask: bool = False, tp: int = 1) -> int:
    """How many times each key/value head is repeated (1: none); raises
    when sp cannot split the heads. With tensor parallelism (``tp`` > 1) the
    graph already holds this rank's heads (the ``tensor_parallel`` pass ran
    first): sp splits those."""
    q, k = full_shape(_arg(node, 0, "query")), full_shape(_arg(node, 1, "key"))
    where = module_of(node)
    if q is None or k is None or len(q) != 4 or len(k) != 4:
        raise SequenceParallelError(
            f"sequence parallelism: {where}: attention inputs of shapes {q} and {k}; the pass splits "
            "[batch, heads, sequence, head_dim] inputs of F.scaled_dot_product_attention only")
    heads, kv_heads = q[1], k[1]
    if (_arg(node, 3, "attn_mask") is not None and not has_key_mask) or node.kwargs.get("key_padding_mask") is not None:
        raise SequenceParallelError(
            f"sequence parallelism: {where}: attention with an explicit attn_mask is not supported yet, except "
            "Hugging Face's causal + padding mask built from a padded attention_mask; use is_causal=True attention "
            "without a mask, or pass the padding as attention_mask to a Hugging Face model with "
            "attn_implementation=\"sdpa\"")
    if heads % sp or not (kv_heads % sp == 0 or sp % kv_heads == 0):
        per_rank = (f" (per tensor-parallel rank: tensor_parallel.autotp_size={tp} split the model's heads; change "
                    "autotp_size or sequence_parallel_size so that autotp_size x sequence_parallel_size divides the "
                    "query heads)") if tp > 1 else ""
        raise SequenceParallelError(
            f"sequence parallelism: {where}: {heads} query heads and {kv_heads} key/value heads{per_rank} cannot be split "
            f"over sequence_parallel_size={sp} (sp must divide the query heads, and divide or be a multiple of "
            f"the key/value heads); valid sequence_parallel_size values: "
            f"{', '.join(map(str, _valid_sizes(heads, kv_heads)))}")
    return 1 if kv_heads % sp == 0 else sp // kv_heads


def _wrap_attention(gm: fx.GraphModule, node: fx.Node, tag: str, repeat: int) -> None:
    graph = gm.graph
    with graph.inserting_before(node):
        moved = []
        for i, name in enumerate(_SDPA_ARGS[:3]):
            x = _arg(node, i, name)
            if repeat > 1 and i > 0:
                x = graph.call_function(torch.repeat_interleave, (x, repeat), {"dim": 1})
            moved.append(graph.call_function(SP_SEQ_TO_HEADS, (x, tag)))
    args = list(node.args)
    kwargs = dict(node.kwargs)
    for i, (name, new) in enumerate(zip(_SDPA_ARGS, moved)):
        if i < len(args):
            args[i] = new
        else:
            kwargs[name] = new
    node.args, node.kwargs = tuple(args), kwargs
    with graph.inserting_after(node):
        back = graph.call_function(SP_HEADS_TO_SEQ, (node, tag))
    node.replace_all_uses_with(back, delete_user_cb=lambda user: user is not back)


def _is_padding_input(node: fx.Node, rows: int | None, seq: int) -> bool:
    """A graph input of shape ``[rows, seq]`` (any rows when None) that is
    not floating point: a 0/1 or boolean padding mask."""
    val = node.meta.get("example_value", node.meta.get("val"))
    if node.op != "placeholder" or not isinstance(val, torch.Tensor) or val.is_floating_point() or val.dim() != 2:
        return False
    return val.shape[1] == seq and (rows is None or val.shape[0] == rows)


def _key_mask_input(node: fx.Node, sp: int) -> fx.Node | None:
    """The full-length ``[b, s]`` padding mask (a graph input: the runtime
    leaves a padded ``attention_mask`` uncut) that an SDPA's ``attn_mask`` is
    built from, or None."""
    mask, q = _arg(node, 3, "attn_mask"), full_shape(_arg(node, 0, "query"))
    if not isinstance(mask, fx.Node) or q is None or len(q) != 4:
        return None
    found, seen, stack = [], set(), [mask]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if _is_padding_input(n, q[0], sp * q[2]):
            found.append(n)
        stack.extend(n.all_input_nodes)
    return found[0] if len(found) == 1 else None


def _global_mask(gm: fx.GraphModule, node: fx.Node, key: fx.Node) -> None:
    """``attn_mask`` (Hugging Face's causal + padding mask of the local
    sequence) -> the same mask over the whole sequence, built from the
    full-length padding mask ``key``: ``tril(ones(s, s)) & key[:, None, None, :]``."""
    graph = gm.graph
    s = full_shape(key)[1]
    with graph.inserting_before(node):
        keep = graph.call_method("to", (key,), {"dtype": torch.bool})
        causal = graph.call_method("tril", (graph.call_method("new_ones", (keep, (s, s))),))
        keys = graph.call_function(operator.getitem, (keep, (slice(None), None, None, slice(None))))
        full = graph.call_function(operator.and_, (causal, keys))
    if len(node.args) > 3:
        node.args = (*node.args[:3], full, *node.args[4:])
    else:
        node.kwargs = {**node.kwargs, "attn_mask": full}


def _feeds_embedding(node: fx.Node, depth: int = 5) -> bool:
    for user in node.users:
        if user.op == "call_function" and user.target in EMBEDDINGS and _arg(user, 0, "input") is node:
            return True
        if user.op == "call_function" and user.target in ATEN_EMBEDDINGS and _arg(user, 1, "indices") is node:
            return True
        name = user.target if user.op == "call_method" else getattr(user.target, "__name__", "")
        if depth > 0 and name in _INDEX_OPS and _feeds_embedding(user, depth - 1):
            return True
    return False


def _offset_positions(gm: fx.GraphModule, node: fx.Node, seq_local: int, offset: int) -> bool:
    """``arange(seq_local)`` indexing an embedding -> ``arange(offset, offset + seq_local)``
    (ATen: ``aten.arange.default(n)`` -> ``aten.arange.start(offset, offset + n)``)."""
    if node.op == "call_function" and node.target is _aten.arange.default and _feeds_embedding(node) \
            and len(node.args) == 1 and node.args[0] == seq_local:
        node.target, node.args = _aten.arange.start, (offset, offset + seq_local)
        return True
    if node.op != "call_function" or node.target is not torch.arange or not _feeds_embedding(node):
        return False
    args = list(node.args)
    if len(args) == 1 and args[0] == seq_local:
        node.args = (offset, offset + seq_local)
        return True
    if len(args) == 2 and args[0] == 0 and args[1] == seq_local:
        node.args = (offset, offset + seq_local)
        return True
    return False


_CE_ARGS = ("input", "target", "weight", "size_average", "ignore_index", "reduce", "reduction", "label_smoothing")


def _global_loss(gm: fx.GraphModule, node: fx.Node, tag: str) -> bool:
    kwargs = {**{_CE_ARGS[i]: a for i, a in enumerate(node.args[2:], 2)}, **node.kwargs}
    reduction = kwargs.get("reduction", "mean")
    if reduction == "none" or kwargs.get("size_average") is not None or kwargs.get("reduce") is not None:
        log.warning("sequence parallelism: %s: cross_entropy without a mean or sum reduction keeps this rank's "
                    "part of each sequence; reduce it over the sequence-parallel group yourself",
                    module_of(node))
        return False
    if kwargs.get("weight") is not None:
        raise SequenceParallelError(
            f"sequence parallelism: {module_of(node)}: cross_entropy with class weights is not supported yet")
    graph = gm.graph
    target = node.args[1] if len(node.args) > 1 else node.kwargs["target"]
    ignore = kwargs.get("ignore_index", -100)
    if reduction == "mean":
        kwargs["reduction"] = "sum"
    node.args, node.kwargs = tuple(node.args[:2]), kwargs
    return _sum_over_sequence(graph, node, target, ignore, tag, reduction)


_REDUCTIONS = {0: "none", 1: "mean", 2: "sum"}  # ATen's reduction enum


def _global_aten_loss(gm: fx.GraphModule, node: fx.Node, tag: str) -> bool:
    """``aten.cross_entropy_loss(input, target, weight, reduction, ignore_index,
    label_smoothing)`` (a pipeline stage's graph) as :func:`_global_loss`
    rewrites ``F.cross_entropy``."""
    names = ("input", "target", "weight", "reduction", "ignore_index", "label_smoothing")
    kwargs = {**{names[i]: a for i, a in enumerate(node.args[2:], 2)}, **node.kwargs}
    graph = gm.graph
    reduction = _REDUCTIONS[kwargs.get("reduction", 1)]
    if reduction == "none":
        log.warning("sequence parallelism: %s: cross_entropy without a mean or sum reduction keeps this rank's "
                    "part of each sequence; reduce it over the sequence-parallel group yourself", module_of(node))
        return False
    if kwargs.get("weight") is not None:
        raise SequenceParallelError(
            f"sequence parallelism: {module_of(node)}: cross_entropy with class weights is not supported yet")
    target, ignore = node.args[1], kwargs.get("ignore_index", -100)
    node.args = (*node.args[:3], 2, *node.args[4:]) if len(node.args) > 3 else node.args
    if len(node.args) <= 3:
        node.kwargs = {**node.kwargs, "reduction": 2}
    return _sum_over_sequence(graph, node, target, ignore, tag, reduction)


def _sum_over_sequence(graph: fx.Graph, node: fx.Node, target, ignore, tag: str, reduction: str) -> bool:
    """After ``node`` (this rank's loss summed over its tokens): the sum over
    the sp group, divided for a mean by the global count of kept labels."""
    with graph.inserting_after(node):
        total = graph.call_function(SP_ALL_REDUCE, (node, tag))
    out = total
    if reduction == "mean":
        dtype = getattr(node.meta.get("example_value"), "dtype", torch.float32)
        with graph.inserting_after(total):
            kept = graph.call_function(torch.ne, (target, ignore))
        with graph.inserting_after(kept):
            count = graph.call_function(torch.sum, (kept,), {"dtype": dtype})
        with graph.inserting_after(count):
            count_all = graph.call_function(SP_ALL_REDUCE, (count, tag))
        with graph.inserting_after(count_all):
            out = graph.call_function(torch.div, (total, count_all))
    node.replace_all_uses_with(out, delete_user_cb=lambda user: user is not total)
    return True


def _attention_functions() -> tuple:
    return (*SDPA_FUNCTIONS, _kernel("attention", "attention"))


def _local_seq(gm: fx.GraphModule) -> int | None:
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _attention_functions():
            shape = full_shape(_arg(node, 0, "query"))
            if shape is not None and len(shape) == 4:
                return shape[2]
    return None


def sequence_parallel(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    state = ctx.state
    if state is None or getattr(state, "sp", None) is None:
        return PassResult()
    sp, tag = state.sp.world_size, state.tag
    tp = state.tp.world_size if getattr(state, "tp", None) is not None else 1
    eager = sum(rewrite_matches(gm, (match_eager_attention,)).values())
    counts = {"eager_attention": eager, "attention": 0, "positions": 0, "loss": 0, "padding_masks": 0,
              "causal_masks": 0}
    seq_local = _local_seq(gm)
    attention = _attention_functions()
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in attention:
            counts["causal_masks"] += drop_constant_causal_mask(gm, node)
            key = _key_mask_input(node, sp) if node.target in SDPA_FUNCTIONS else None
            repeat = _check_heads(node, sp, key is not None, tp)
            if key is not None:
                _global_mask(gm, node, key)
                counts["padding_masks"] += 1
            _wrap_attention(gm, node, tag, repeat)
            counts["attention"] += 1
        elif node.target in CROSS_ENTROPY:
            counts["loss"] += _global_loss(gm, node, tag)
        elif node.target in ATEN_CROSS_ENTROPY:
            counts["loss"] += _global_aten_loss(gm, node, tag)
        elif seq_local is not None and _offset_positions(gm, node, seq_local, state.sp.rank * seq_local):
            counts["positions"] += 1
    padded = [n for n in gm.graph.nodes if seq_local is not None and _is_padding_input(n, None, sp * seq_local)]
    if padded and counts["padding_masks"] < max(1, counts["attention"]):
        raise SequenceParallelError(
            f"sequence parallelism: an attention_mask with padding reaches {counts['attention']} attention call(s), "
            f"{counts['padding_masks']} of them through F.scaled_dot_product_attention's attn_mask; zerograph "
            "rebuilds the padding mask over the whole sequence there only (Hugging Face: "
            "attn_implementation=\"sdpa\"); otherwise pad on the right with labels -100 and pass no attention_mask")
    if counts["attention"] and not counts["loss"]:
        log.info("sequence parallelism: %s graph has attention but no F.cross_entropy loss: a loss computed "
                    "outside the model sees only this rank's 1/%d of each sequence (docs/long_sequences.md)",
                    "this", sp)
    if any(counts.values()):
        gm.graph.lint()
        gm.recompile()
        refresh_example_values(gm)
    return PassResult(changed=any(counts.values()), details=counts)
