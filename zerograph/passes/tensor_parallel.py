"""``tensor_parallel`` (Dynamo graph): run each split layer on this rank's slice.

The model was traced with whole parameters (``unshard_whole`` markers,
:mod:`zerograph.graph.tp_markers`). Each layer's split was decided when the
model was sharded (:mod:`zerograph.planner.tp_plan`) and is in its
parameters' specs; this pass is the mechanism:

* every ``unshard_whole`` becomes ``unshard``: this rank's tp slice;
* a column-split linear reads ``tp_copy(x)`` (Megatron's *f*: all-reduce of
  the input's gradient in the backward) and yields its slice of the output
  features; one ``tp_copy`` serves every column linear reading the same ``x``;
* a row-split linear's partial product goes through ``tp_all_reduce``
  (Megatron's *g*) before its bias is added; a row linear whose input is
  whole (no column partner in this graph) first takes its slice of the
  input features (``narrow``, no traffic);
* downstream, every shape argument along a split dimension becomes a
  per-rank size (heads per rank; :mod:`zerograph.passes.tp_propagation`);
* a split value the graph returns is gathered whole (``tp_all_gather``);
* with ``zerograph.tp_sequence_parallel`` (Megatron-SP,
  :mod:`zerograph.passes.tp_sequence`) the values between tp regions are cut
  along the sequence: ``tp_copy`` becomes ``tp_seq_gather`` and
  ``tp_all_reduce`` ``tp_seq_reduce_scatter``; at a pipeline stage boundary
  (:mod:`zerograph.graph.tp_seq_boundary`) a received shard becomes
  ``alias(x)`` cut along the sequence, and a value sent on ``alias`` of its
  shard (``tp_seq_scatter`` when it is whole here).

For nanoGPT's attention at tp=2 (12 heads of 64)::

    unshard_whole(qkv.weight) -> linear(x, W, b) -> split(768, dim=2) -> view(b, t, 12, 64)

becomes::

    unshard(qkv.weight) -> linear(tp_copy(x), W, b) -> split(384, dim=2) -> view(b, t, 6, 64)

and ``proj``'s ``linear(y, W, b)`` becomes ``tp_all_reduce(linear(y, W)) + b``.
AOTAutograd then traces the rewritten graph with per-rank shapes, so ZeRO's
passes see ordinary (smaller) parameters, and ``lower_tp_markers`` lowers
the markers to collectives. Dynamo's recorded values are recomputed with the
new shapes (fusion passes read them).
"""

from __future__ import annotations

import logging
import operator

import torch
import torch.fx as fx

from zerograph.graph.example_values import refresh_example_values
from zerograph.graph.tp_markers import TP_ALL_GATHER, TP_ALL_REDUCE, TP_COPY, UNSHARD_WHOLE
from zerograph.graph.tp_ops import full_shape, linear_use, module_of
from zerograph.graph.tp_seq_boundary import TP_SEQ_ENTER, TP_SEQ_LEAVE
from zerograph.graph.tp_seq_markers import TP_SEQ_SCATTER
from zerograph.passes.manager import PassContext, PassResult
from zerograph.passes.tp_propagation import Propagator, Split
from zerograph.passes.tp_sequence import SequenceParallel
from zerograph.passes.tp_vocab import (CROSS_ENTROPY, EMBEDDING, as_torch_level, rewrite_cross_entropy,
                                       rewrite_embedding, vocab_operand)
from zerograph.runtime.tp_layout import TensorParallelError

log = logging.getLogger(__name__)

_META = ("nn_module_stack", "stack_trace", "source_fn_stack")


class _SplitParam:
    """The state of a tp-split parameter's read: only a linear may consume it."""

    def __init__(self, spec):
        self.spec = spec


def _inserted(graph: fx.Graph, like: fx.Node, target, args) -> fx.Node:
    node = graph.call_function(target, args)
    for key in _META:
        if key in like.meta:
            node.meta[key] = like.meta[key]
    return node


class _Rewrite:
    def __init__(self, gm: fx.GraphModule, specs: dict, tp: int, tag: str | None = None,
                 sequence_parallel: bool = False):
        self.gm, self.graph, self.specs = gm, gm.graph, specs
        self.prop = Propagator(tp)
        self.copies: dict[fx.Node, fx.Node] = {}
        self.counts = {"column": 0, "row": 0, "tp_copy": 0, "tp_all_reduce": 0}
        self.tag = tag
        self.vocab: dict[fx.Node, object] = {}  # values split over the vocabulary -> the head's layout
        self.grad_sums: dict[fx.Node, fx.Node] = {}  # whole value with partial gradients -> its tp_copy
        self.sp = SequenceParallel(self.graph, self.prop, tag, tp, self.counts) if sequence_parallel else None

    def run(self) -> None:
        if self.sp is not None:
            self.sp.find_entries(self.specs)
        for node in list(self.graph.nodes):
            if node.op == "call_function" and node.target in (UNSHARD_WHOLE, torch.ops.zerograph.unshard_whole):
                node.target = torch.ops.zerograph.unshard
                self.tag = node.args[1]
                spec = self.specs[node.args[2]]
                read = self._replicated(node, spec.tp) if spec.tp.replicas > 1 else node
                self.prop.states[read] = _SplitParam(spec)
                continue
            if node.op == "output":
                self._gather_outputs(node)
                continue
            if node.op == "call_function" and node.target in (TP_SEQ_ENTER, TP_SEQ_LEAVE):
                self._stage_boundary(node)
                continue
            if self._vocab_parallel(node):
                continue
            use = linear_use(node)
            if use is not None and isinstance(self.prop.get(use.weight), _SplitParam):
                self._linear(use)
                continue
            if use is not None and isinstance(self.prop.get(use.bias), _SplitParam):
                raise TensorParallelError(f"tensor parallelism: {module_of(node)}: a whole weight with a tp-split "
                                          "bias")
            for arg in node.all_input_nodes:
                if isinstance(self.prop.get(arg), _SplitParam):
                    layout = self.prop.get(arg).spec.tp
                    raise TensorParallelError(
                        f"tensor parallelism: {module_of(node)} reads {arg.args[2]}, which is {layout.kind}-split "
                        f"for {layout.module}, other than as a linear layer's weight (graph node {node.name}); keep "
                        f"{layout.module} whole with a layer spec {{\"partition_type\": \"skip\"}}")
            if self.sp is None or not self.sp.visit(node):
                self.prop.visit(node)
            while self.prop.partial_grads:
                op, whole = self.prop.partial_grads.pop()
                op.replace_input_with(whole, self._grad_sum(whole))
            if self.sp is not None:
                self.sp.enter(node)
            if isinstance(self.prop.get(node), Split):
                head = next((self.vocab[a] for a in node.all_input_nodes if a in self.vocab), None)
                if head is not None:
                    self.vocab[node] = head

    def _grad_sum(self, whole: fx.Node) -> fx.Node:
        """``whole`` read through ``tp_copy`` (Megatron's *f*: identity forward,
        all-reduce over tp backward), so the ranks' partial gradients of a whole
        value broadcast over split ones add up; one per value."""
        copy = self.grad_sums.get(whole)
        if copy is None:
            with self.graph.inserting_after(whole):
                copy = self.grad_sums[whole] = _inserted(self.graph, whole, TP_COPY, (whole, self.tag))
            self.counts["grad_sums"] = self.counts.get("grad_sums", 0) + 1
        return copy

    def _stage_boundary(self, node: fx.Node) -> None:
        """A pipeline stage boundary under Megatron-SP (:mod:`zerograph.graph.tp_seq_boundary`):
        a received shard enters cut along the sequence; a value sent on
        leaves as this rank's shard (its block, when it is whole here)."""
        x, dim, _ = node.args
        if self.sp is None:
            raise TensorParallelError(f"tensor parallelism: {node.name} marks a stage boundary of "
                                      "zerograph.tp_sequence_parallel, which this stage was compiled without")
        state = self.prop.get(x)
        if node.target == TP_SEQ_ENTER:
            node.target, node.args = torch.ops.aten.alias.default, (x,)
            self.prop.states[node] = Split(dim, (full_shape(node)[dim],), seq=True)
        elif state is None:
            node.target, node.args = TP_SEQ_SCATTER, (x, self.tag, dim)
        elif isinstance(state, Split) and state.seq and state.dim == dim:
            node.target, node.args = torch.ops.aten.alias.default, (x,)
        else:
            raise TensorParallelError(f"tensor parallelism: {module_of(x)}: {x.name} crosses a pipeline stage "
                                      f"boundary split over tp as {state}, not along the sequence (dim {dim})")
        self.counts["stage_boundary"] = self.counts.get("stage_boundary", 0) + 1

    def _replicated(self, node: fx.Node, layout) -> fx.Node:
        """A parameter whose blocks ``layout.replicas`` tp ranks each hold
        (grouped-query key/value heads fewer than tp): its gradient must be
        summed over those ranks. The read becomes ``narrow(tp_copy(pad(W)))``:
        this rank's block zero-padded to every block's place along the split
        dim, Megatron's *f* (whose backward all-reduces over tp, so each place
        sums its replicas' gradients), then its own block again. One key/value
        head (``blocks == 1``): ``tp_copy(W)``."""
        d, n = layout.dim, len(layout.whole_shape)
        local = layout.local_shape[d]
        before, after = layout.block * local, (layout.blocks - 1 - layout.block) * local
        padded = node
        if layout.blocks > 1:
            with self.graph.inserting_after(node):
                padded = _inserted(self.graph, node, torch.nn.functional.pad,
                                   (node, [0, 0] * (n - 1 - d) + [before, after]))
        with self.graph.inserting_after(padded):
            read = copy = _inserted(self.graph, node, TP_COPY, (padded, self.tag))
        if layout.blocks > 1:
            with self.graph.inserting_after(copy):
                read = _inserted(self.graph, node, torch.narrow, (copy, d, before, local))
        first = padded if padded is not node else copy
        node.replace_all_uses_with(read, delete_user_cb=lambda user: user is not first)
        self.counts["replicated"] = self.counts.get("replicated", 0) + 1
        return read

    def _vocab_parallel(self, node: fx.Node) -> bool:
        """A vocab-parallel embedding or cross-entropy (:mod:`.tp_vocab`), rewritten."""
        if node.op != "call_function":
            return False
        if node.target in EMBEDDING:
            weight = vocab_operand(node)
            if isinstance(self.prop.get(weight), _SplitParam):
                as_torch_level(node)
                whole = rewrite_embedding(self.graph, node, self.prop.get(weight).spec.tp, self.tag)
                if self.sp is not None and node in self.sp.entries:  # the stream enters right here
                    self.sp.embedding_entry(node, whole)
                self.counts["vocab_embedding"] = self.counts.get("vocab_embedding", 0) + 1
                return True
        if node.target in CROSS_ENTROPY:
            logits = vocab_operand(node)
            if logits in self.vocab:
                if self.prop.get(logits) != Split(1, (self.vocab[logits].whole_shape[0],)):
                    raise TensorParallelError(f"tensor parallelism: {module_of(node)}: cross-entropy of logits split "
                                              f"over the vocabulary as {self.prop.get(logits)}, not along dim 1")
                as_torch_level(node)
                rewrite_cross_entropy(self.graph, node, self.vocab[logits], self.tag)
                self.counts["vocab_cross_entropy"] = self.counts.get("vocab_cross_entropy", 0) + 1
                return True
        return False

    def _gather_outputs(self, out: fx.Node) -> None:
        """A split value the graph returns (a Hugging Face KV cache, or a value
        crossing a graph break inside a layer) is gathered whole."""
        leaving = []
        for value in out.all_input_nodes:
            state = self.prop.get(value)
            if state is None:
                continue
            if value in self.vocab and self.counts.get("vocab_cross_entropy"):
                # logits whose loss this graph computes: returned as this rank's vocabulary slice, never gathered
                log.info("tensor parallelism: the graph returns this rank's vocabulary slice of the logits (%s)",
                         module_of(value))
                self.counts["vocab_slices_returned"] = self.counts.get("vocab_slices_returned", 0) + 1
                continue
            if value in self.vocab:
                log.warning("tensor parallelism: vocab-split logits (%s) leave a compiled graph that has no "
                            "cross-entropy of them (the loss is computed in another graph, e.g. after a graph break "
                            "before a Hugging Face loss_function, or there is no loss): they are gathered whole",
                            module_of(value))
            if not isinstance(state, Split):
                raise TensorParallelError(f"tensor parallelism: {module_of(value)}: the graph returns a tp-split "
                                          f"value {value.name} it cannot gather")
            with self.graph.inserting_before(out):
                if state.replicas == 1:
                    whole = _inserted(self.graph, value, TP_ALL_GATHER, (value, self.tag, state.dim, list(state.parts)))
                else:
                    whole = self._gather_replicated(value, state)
            out.replace_input_with(value, whole)
            leaving.append(value)
        if leaving:
            self.counts["tp_all_gather"] = len(leaving)
            log.warning(
                "tensor parallelism: %d value(s) split over the tp ranks leave a compiled graph (%s) and are gathered "
                "whole every step, e.g. a Hugging Face KV cache (set model.config.use_cache = False for training) "
                "or a graph break inside a layer", len(leaving),
                ", ".join(sorted({module_of(v) for v in leaving})))

    def _gather_replicated(self, value: fx.Node, state: Split) -> fx.Node:
        """A value whose blocks ``state.replicas`` tp ranks hold (replicated
        key/value heads): gathered from every rank (each block ``replicas``
        times), then one copy of each block. Its gradient reaches the first
        replica of each block (the replicas' parts sum to it)."""
        d, blocks = state.dim, self.prop.tp // state.replicas
        local = state.parts[0] // blocks
        parts = [p * state.replicas for p in state.parts]
        gathered = _inserted(self.graph, value, TP_ALL_GATHER, (value, self.tag, d, parts))
        grouped = _inserted(self.graph, value, torch.unflatten, (gathered, d, (blocks, state.replicas, local)))
        first = _inserted(self.graph, value, torch.select, (grouped, d + 1, 0))
        return _inserted(self.graph, value, torch.flatten, (first, d, d + 1))

    def _linear(self, use) -> None:
        layout = self.prop.get(use.weight).spec.tp
        x_state = self.prop.get(use.x)
        node = use.node
        if layout.kind in ("column", "vocab"):
            flat = self.sp is not None and use.x in self.sp.flat_gathered  # Conv1D: view of the gathered sequence
            gathered = flat or (self.sp is not None and isinstance(x_state, Split) and x_state.seq)
            if gathered and not flat:  # Megatron-SP: all-gather the sequence shards
                node.replace_input_with(use.x, self.sp.column_input(use.x, node))
            elif x_state is not None:
                raise TensorParallelError(f"tensor parallelism: {layout.module} is column-split but its input is "
                                          "already split over tp; make it row-split (its input's producer is column-split)")
            bias = self.prop.get(use.bias)
            if use.bias is not None and not isinstance(bias, _SplitParam):
                raise TensorParallelError(f"tensor parallelism: {layout.module}: column-split weight, whole bias")
            if not gathered:
                copy = self.copies.get(use.x)
                if copy is None:  # in front of the first column linear reading x; the others come later
                    with self.graph.inserting_before(node):
                        copy = self.copies[use.x] = _inserted(self.graph, node, TP_COPY, (use.x, self.tag))
                    self.counts["tp_copy"] += 1
                node.replace_input_with(use.x, copy)
            self.prop.states[node] = Split(len(full_shape(node)) - 1, layout.parts, layout.replicas)
            self.counts["column"] += 1
            if layout.kind == "vocab":
                self.vocab[node] = layout
            return
        features = full_shape(use.x)[-1] if full_shape(use.x) else None
        x = use.x
        if x_state is None and features is not None:
            # a whole input (its producer is not column-split, or a graph break
            # gathered it): each rank takes its slice of the features, no traffic
            width = features // layout.size
            with self.graph.inserting_before(node):
                x = _inserted(self.graph, node, torch.narrow, (use.x, len(full_shape(use.x)) - 1,
                                                               layout.index * width, width))
            node.replace_input_with(use.x, x)
            self.counts["input_slices"] = self.counts.get("input_slices", 0) + 1
        elif x_state != Split(len(full_shape(use.x)) - 1, (features,)):
            raise TensorParallelError(
                f"tensor parallelism: {layout.module} is row-split but its input is not split over tp along its "
                f"features (it is {x_state or 'whole'}); split the layers that produce its input by columns, or keep "
                f"{layout.module} whole")
        bias = use.bias
        if use.form == "linear":
            node.args = (x, use.weight, None)
            node.kwargs = {}
        else:  # addmm(bias, x, weight) -> mm(x, weight)
            node.target, node.args, node.kwargs = torch.mm, (x, use.weight), {}
        self.counts["row"] += 1
        if self.sp is not None:  # Megatron-SP: reduce-scatter along the sequence; the bias on this rank's positions
            node = self.sp.row_target(node)  # Conv1D: after the view back to [b, s, h]
            reduced, state = self.sp.row_output(node)
            out = reduced
            if bias is not None:
                with self.graph.inserting_after(reduced):
                    out = _inserted(self.graph, node, operator.add, (reduced, self.sp.grad_sum(bias, node)))
                self.prop.states[out] = state
                if "example_value" in node.meta:
                    out.meta["example_value"] = node.meta["example_value"]
        else:
            with self.graph.inserting_after(node):
                reduced = _inserted(self.graph, node, TP_ALL_REDUCE, (node, self.tag))
            out = reduced
            if bias is not None:
                with self.graph.inserting_after(reduced):
                    out = _inserted(self.graph, node, operator.add, (reduced, bias))
            self.counts["tp_all_reduce"] += 1
        node.replace_all_uses_with(out, delete_user_cb=lambda user: user is not reduced)


def _per_rank_graph_error(node: fx.Node, exc: Exception) -> Exception:
    return TensorParallelError(
        f"tensor parallelism: the per-rank graph fails at node {node.name} ({module_of(node)}): {exc}")


def tensor_parallel(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    state = ctx.state
    if state is None or getattr(state, "tp", None) is None:
        return PassResult()
    rewrite = _Rewrite(gm, state.specs, state.tp.world_size, state.tag,
                       sequence_parallel=bool(ctx.config.zerograph.tp_sequence_parallel))
    rewrite.run()
    gm.graph.lint()
    gm.recompile()
    refresh_example_values(gm, _per_rank_graph_error)
    details = dict(rewrite.counts, shape_args=rewrite.prop.rewritten)
    return PassResult(changed=any(details.values()), details=details)
