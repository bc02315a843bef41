"""Megatron sequence parallelism (``zerograph.tp_sequence_parallel``), part of
the ``tensor_parallel`` pass.

Plain tensor parallelism leaves every activation between two tp regions
(the residual stream, the norms, dropout) whole and identical on every tp
rank. With sequence parallelism those values are cut along the sequence
(the dim before the features of ``[b, s, h]``; rank ``i`` holds positions
``[i·s/tp, (i+1)·s/tp)``) and the collectives change form, with the same
bytes on the wire (Korthikanti et al., 2022):

* after a row-split linear, ``tp_all_reduce`` becomes
  ``tp_seq_reduce_scatter`` (backward: all-gather); the row layer's bias is
  added to this rank's positions;
* in front of a group of column-split linears, ``tp_copy`` becomes
  ``tp_seq_gather`` (all-gather; backward: reduce-scatter);
* where the whole stream enters the region (the first block's input: the
  highest value above the first column group's input that every path
  through per-token ops passes, e.g. the embeddings' sum), ``tp_seq_scatter``
  takes this rank's positions (backward: all-gather of the gradient);
* ops between run on the shards (their shape arguments along the sequence
  become per-rank, as for heads); a whole value combined with a shard is cut
  the same way (``tp_seq_scatter``), and a whole value *broadcast* over the
  sequence that needs a gradient (a LayerNorm/RMSNorm weight, a row layer's
  bias) is read through ``tp_copy``: each rank's gradient covers its own
  positions only, and ``tp_copy``'s backward sums them over tp;
* an op that needs every position (a whole LM head, a loss, attention
  outside a column group, a graph output) reads the shards through
  ``tp_all_gather`` (backward: this rank's block of the gradient);
* Hugging Face ``Conv1D`` (GPT-2) flattens batch and sequence:
  ``addmm(b, x.view(-1, h), W).view(b, s, out)``. A column group's
  flattening view reads the gathered sequence
  (``view(tp_seq_gather(x), -1, h)``), a row ``Conv1D``'s partial product
  is reduce-scattered after its view back to ``[b, s, h]``.

The backward's re-gather of each column group's input (instead of saving
it) is the ``tp_regather`` pass on the joint graph.

On ``h + fc2(relu(fc1(ln(h))))`` at tp=2 (the golden test)::

    tp_seq_scatter = zerograph.tp_seq_scatter(h, 'zg0', 1)            # [2, 4, 4] of [2, 8, 4]
    layer_norm = layer_norm(tp_seq_scatter, (4,), tp_copy(w), tp_copy(b))
    tp_seq_gather = zerograph.tp_seq_gather(layer_norm, 'zg0', 1)     # [2, 8, 4]
    linear = linear(tp_seq_gather, W1, b1); relu = relu(linear)
    linear_1 = linear(relu, W2, None)
    tp_seq_reduce_scatter = zerograph.tp_seq_reduce_scatter(linear_1, 'zg0', 1)   # [2, 4, 4]
    add = add(tp_seq_reduce_scatter, tp_copy(b2)); add_1 = add(tp_seq_scatter, add)
"""

from __future__ import annotations

import logging
import math

import torch
import torch.fx as fx
import torch.nn.functional as F

from zerograph.graph.tp_markers import TP_ALL_GATHER, TP_COPY, UNSHARD_WHOLE
from zerograph.graph.tp_ops import PARAM_READS, full_shape, linear_use, module_of, requires_grad, torch_level
from zerograph.graph.tp_seq_markers import TP_SEQ_GATHER, TP_SEQ_REDUCE_SCATTER, TP_SEQ_SCATTER
from zerograph.passes.tp_propagation import _CAST_METHODS, _EW_FUNCTIONS, _EW_METHODS, Split
from zerograph.runtime.tp_layout import TensorParallelError

log = logging.getLogger(__name__)

_META = ("nn_module_stack", "stack_trace", "source_fn_stack")
_REDUCE_METHODS = {"mean", "sum", "amax", "amin"}
_KEY = "zerograph.tp_sequence_parallel"


def _emit(graph: fx.Graph, like: fx.Node, target, args) -> fx.Node:
    """A marker on ``args[0]``; its recorded (whole-shape) value is its input's."""
    node = graph.call_function(target, args)
    for key in _META:
        if key in like.meta:
            node.meta[key] = like.meta[key]
    for key in ("example_value", "val"):
        if key in args[0].meta:
            node.meta[key] = args[0].meta[key]
    return node


def _is_elementwise(node: fx.Node) -> bool:
    fn, name = torch_level(node)  # an ATen overload (a pipeline stage's graph) as its torch-level op
    return fn in _EW_FUNCTIONS or name in _EW_METHODS


def _is_layer_norm(node: fx.Node) -> bool:
    return torch_level(node)[0] is F.layer_norm


def _per_token(node: fx.Node) -> bool:
    """Whether ``node`` computes each position from that position alone (an
    element-wise op, a cast, a norm or a reduction over the last dim)."""
    fn, name = torch_level(node)
    if _is_elementwise(node) or name in _CAST_METHODS or _is_layer_norm(node):
        return True
    if name in _REDUCE_METHODS or fn in (torch.mean, torch.sum):
        dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        n = len(full_shape(node.args[0]) or ())
        dims = dims if isinstance(dims, (list, tuple)) else [dims]
        return n > 0 and all(isinstance(d, int) and d % n == n - 1 for d in dims)
    return False


def _column_uses(graph: fx.Graph, specs: dict) -> list:
    """The column-split (and vocab-split head) linears, in graph order."""
    out = []
    for node in graph.nodes:
        use = linear_use(node)
        if use is None or use.weight.op != "call_function" or use.weight.target not in (
                UNSHARD_WHOLE, torch.ops.zerograph.unshard_whole):
            continue
        if specs[use.weight.args[2]].tp.kind in ("column", "vocab"):
            out.append(use)
    return out


def _flattens_sequence(node: fx.Node) -> bool:
    """``x.view(-1, h)`` of ``x`` ``[..., s, h]`` (≥ 3-D): Hugging Face ``Conv1D``'s
    input, whose batch and sequence become one dim."""
    if not (node.op == "call_method" and node.target in ("view", "reshape")) and not (
            node.op == "call_function" and node.target is torch.reshape):
        return False
    src = node.args[0] if node.args else None
    shape_in, shape_out = full_shape(src), full_shape(node)
    return (shape_in is not None and shape_out is not None and len(shape_in) >= 3 and len(shape_out) == 2
            and shape_out == (math.prod(shape_in[:-1]), shape_in[-1]))


def _unflattens_sequence(node: fx.Node) -> fx.Node | None:
    """The only user of ``node`` (a ``[b·s, h]`` product: ``Conv1D``) if it is the
    view back to ``[..., s, h]``, else None."""
    shape = full_shape(node)
    users = list(node.users)
    if shape is None or len(shape) != 2 or len(users) != 1:
        return None
    view = users[0]
    if not (view.op == "call_method" and view.target in ("view", "reshape")) and not (
            view.op == "call_function" and view.target is torch.reshape):
        return None
    out = full_shape(view)
    if out is None or len(out) < 3 or view.args[0] is not node or (math.prod(out[:-1]), out[-1]) != shape:
        return None
    return view


class SequenceParallel:
    """The sequence-parallel half of the ``tensor_parallel`` pass's rewrite
    (:class:`zerograph.passes.tensor_parallel._Rewrite` calls it)."""

    def __init__(self, graph: fx.Graph, prop, tag: str, tp: int, counts: dict):
        self.graph, self.prop, self.tag, self.tp, self.counts = graph, prop, tag, tp, counts
        self.entries: set[fx.Node] = set()
        self.gathers: dict[fx.Node, fx.Node] = {}  # shard -> its tp_seq_gather (column groups)
        self.wholes: dict[fx.Node, fx.Node] = {}  # shard -> its tp_all_gather (ops needing every position)
        self.scatters: dict[fx.Node, fx.Node] = {}  # whole value -> its tp_seq_scatter
        self.grad_sums: dict[fx.Node, fx.Node] = {}  # whole value broadcast over positions -> its tp_copy
        self.flat: set[fx.Node] = set()  # Conv1D inputs x.view(-1, h) that only column linears read
        self.flat_gathered: set[fx.Node] = set()  # those of them now reading the gathered sequence

    def _count(self, key: str) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1

    # -- where the whole stream enters ---------------------------------------
    def find_entries(self, specs: dict) -> None:
        uses = _column_uses(self.graph, specs)
        columns = {use.node for use in uses}
        for x in dict.fromkeys(use.x for use in uses):
            if _flattens_sequence(x) and all(u in columns and linear_use(u).x is x for u in x.users):
                self.flat.add(x)  # Conv1D: the stream enters above the flattening view
                x = x.args[0]
            shape = full_shape(x)
            if shape is not None and len(shape) >= 3:
                self.entries.add(self._entry(x, shape[-2]))

    def _full_seq(self, node, s: int) -> bool:
        shape = full_shape(node)
        return shape is not None and len(shape) >= 2 and shape[-2] == s and not (
            node.op == "call_function" and node.target in PARAM_READS)

    def _entry(self, x: fx.Node, s: int) -> fx.Node:
        chain, n = [x], x
        while _per_token(n):
            main = [a for a in n.all_input_nodes if full_shape(a) == full_shape(n) and self._full_seq(a, s)]
            if len(main) != 1:
                break
            n = main[0]
            chain.append(n)
        for candidate in reversed(chain):
            if self._dominates(x, candidate, s):
                return candidate
        return x

    def _dominates(self, x: fx.Node, top: fx.Node, s: int, limit: int = 400) -> bool:
        """Whether every path up from ``x`` through per-token ops over whole
        positions reaches ``top`` (so ``top`` can be cut instead of ``x``)."""
        seen, stack = {x}, [x]
        while stack:
            node = stack.pop()
            if node is top:
                continue
            if not _per_token(node) or len(seen) > limit:
                return False
            for a in node.all_input_nodes:
                if a not in seen and self._full_seq(a, s):
                    seen.add(a)
                    stack.append(a)
        return True

    def enter(self, node: fx.Node) -> None:
        """After ``node`` is visited: if it is where the whole stream enters,
        every reader gets this rank's positions instead."""
        if node not in self.entries or self.prop.get(node) is not None:
            return
        shape = full_shape(node)
        users = list(node.users)
        anchor = node
        if node.op == "placeholder":
            anchor = next(n for n in self.graph.nodes if n.op != "placeholder").prev
        with self.graph.inserting_after(anchor):
            cut = self._scatter(node, len(shape) - 2, node)
        for user in users:
            user.replace_input_with(node, cut)

    def embedding_entry(self, embedding: fx.Node, whole: fx.Node) -> None:
        """A vocab-parallel embedding where the stream enters (Llama's first
        norm reads it): its sum over tp (``whole``, a ``tp_all_reduce``)
        becomes a reduce-scatter along the sequence, Megatron-SP's embedding."""
        dim = self._dim(embedding, embedding)
        with self.graph.inserting_before(whole):
            cut = _emit(self.graph, embedding, TP_SEQ_REDUCE_SCATTER, (whole.args[0], self.tag, dim))
        cut.meta["example_value"] = embedding.meta.get("example_value", embedding.meta.get("val"))
        whole.replace_all_uses_with(cut)
        self.graph.erase_node(whole)
        self.prop.states[cut] = Split(dim, (full_shape(embedding)[dim],), seq=True)
        self._count("tp_seq_reduce_scatter")

    # -- collectives in place of Megatron's f and g ---------------------------
    def _dim(self, node: fx.Node, like: fx.Node) -> int:
        shape = full_shape(node)
        if shape is None or len(shape) < 3:
            raise TensorParallelError(
                f"tensor parallelism: {module_of(like)}: {_KEY} cuts activations [batch, sequence, features] "
                f"along the sequence, but this layer computes on a {len(shape or ())}-D value of shape {shape} "
                "(batch and sequence flattened other than by a Hugging Face Conv1D's view/addmm/view); set "
                f"{_KEY} to false")
        dim = len(shape) - 2
        if shape[dim] % self.tp:
            raise TensorParallelError(
                f"tensor parallelism: {module_of(like)}: {_KEY} cuts the sequence of {shape[dim]} positions (dim "
                f"{dim} of {tuple(shape)}) into tensor_parallel.autotp_size={self.tp} blocks, which does not divide "
                f"it; use a sequence length that is a multiple of {self.tp}, or set {_KEY} to false")
        return dim

    def _scatter(self, value: fx.Node, dim: int, like: fx.Node) -> fx.Node:
        cut = self.scatters.get(value)
        if cut is None:
            self._dim(value, like)
            cut = self.scatters[value] = _emit(self.graph, like, TP_SEQ_SCATTER, (value, self.tag, dim))
            self.prop.states[cut] = Split(dim, (full_shape(value)[dim],), seq=True)
            self._count("tp_seq_scatter")
        return cut

    def column_input(self, x: fx.Node, before: fx.Node) -> fx.Node:
        """The whole input of a column group, gathered from sequence shards."""
        whole = self.gathers.get(x)
        if whole is None:
            with self.graph.inserting_before(before):
                whole = self.gathers[x] = _emit(self.graph, before, TP_SEQ_GATHER, (x, self.tag,
                                                                                     self.prop.get(x).dim))
            self._count("tp_seq_gather")
        return whole

    def row_target(self, node: fx.Node) -> fx.Node:
        """Where a row-split linear's partial product is reduce-scattered:
        ``node`` itself, or for ``Conv1D`` (a ``[b·s, h]`` product) its view
        back to ``[b, s, h]``."""
        return _unflattens_sequence(node) or node

    def row_output(self, node: fx.Node) -> tuple[fx.Node, Split]:
        """``node`` (a row-split linear's partial product) reduce-scattered
        along the sequence; the caller adds the bias through :meth:`grad_sum`."""
        dim = self._dim(node, node)
        with self.graph.inserting_after(node):
            reduced = _emit(self.graph, node, TP_SEQ_REDUCE_SCATTER, (node, self.tag, dim))
        state = Split(dim, (full_shape(node)[dim],), seq=True)
        self.prop.states[reduced] = state
        self._count("tp_seq_reduce_scatter")
        return reduced, state

    def grad_sum(self, value: fx.Node, before: fx.Node) -> fx.Node:
        """``value`` (whole, broadcast over this rank's positions) read through
        ``tp_copy``, whose backward sums the ranks' partial gradients."""
        if not requires_grad(value):
            return value
        copy = self.grad_sums.get(value)
        if copy is None:
            with self.graph.inserting_before(before):
                copy = self.grad_sums[value] = _emit(self.graph, before, TP_COPY, (value, self.tag))
            self._count("tp_grad_sum")
        return copy

    # -- ops on sequence shards ----------------------------------------------
    def visit(self, node: fx.Node) -> bool:
        """Propagate through ``node`` if it reads a sequence shard (True), else
        leave it to the caller (False)."""
        seq = [a for a in node.all_input_nodes if isinstance(self.prop.get(a), Split) and self.prop.get(a).seq]
        if not seq or node.op == "output":
            return False
        if node in self.flat and seq == [node.args[0]]:  # Conv1D's x.view(-1, h): flattens the gathered sequence
            node.replace_input_with(node.args[0], self.column_input(node.args[0], node))
            self.flat_gathered.add(node)
            return True
        if _is_elementwise(node):
            self._elementwise_inputs(node, seq[0])
        elif _is_layer_norm(node):
            for i, arg in enumerate(node.args[2:4], start=2):
                if isinstance(arg, fx.Node):
                    node.update_arg(i, self.grad_sum(arg, node))
            for key in ("weight", "bias"):
                if isinstance(node.kwargs.get(key), fx.Node):
                    node.update_kwarg(key, self.grad_sum(node.kwargs[key], node))
        else:
            try:
                self.prop.visit(node)
                return True
            except TensorParallelError:
                for shard in seq:  # an op that needs every position: it reads the shards gathered
                    node.replace_input_with(shard, self._whole(shard, node))
                return False
        self.prop.visit(node)
        return True

    def _whole(self, shard: fx.Node, before: fx.Node) -> fx.Node:
        whole = self.wholes.get(shard)
        if whole is None:
            state = self.prop.get(shard)
            with self.graph.inserting_after(shard):
                whole = self.wholes[shard] = _emit(self.graph, before, TP_ALL_GATHER,
                                                   (shard, self.tag, state.dim, list(state.parts)))
            self._count("tp_seq_to_whole")
            log.debug("tensor parallelism: %s needs every position of %s: gathered", before.name, shard.name)
        return whole

    def _elementwise_inputs(self, node: fx.Node, shard: fx.Node) -> None:
        """Whole inputs of an element-wise op on a shard: cut along the
        sequence, or (broadcast over it) read through ``tp_copy``."""
        out = full_shape(node)
        state = self.prop.get(shard)
        seq_dim = state.dim + len(out) - len(full_shape(shard))
        for arg in list(node.all_input_nodes):
            shape = full_shape(arg)
            if shape is None or self.prop.get(arg) is not None:
                continue
            pos = seq_dim - (len(out) - len(shape))
            if pos >= 0 and shape[pos] != 1:
                with self.graph.inserting_before(node):
                    node.replace_input_with(arg, self._scatter(arg, pos, node))
            else:
                node.replace_input_with(arg, self.grad_sum(arg, node))
