"""Node metadata that only tracing reads, dropped once a graph is compiled.

Dynamo and AOTAutograd record on every node where it came from: the Python
stack (``stack_trace``, a multi-line string per node), the module and source
function stacks, the node it was copied from (``from_node``, a chain of
``NodeSource`` records), the ATen op it decomposed from, the autograd
sequence number, the eager inputs of custom ops. zerograph reads the module
stack once, when ``tag_nodes`` tags a graph; after that nothing does.

A compiled model keeps three graphs per region for ``zerograph.inspect`` and
the planner (Dynamo's, forward, backward; the joint graph only with
``zerograph.debug``). Once a graph's compile steps are done,
:func:`drop_trace_meta` removes those records from it; what ``inspect``, the
graph format and the planner read stays: ``val`` / ``example_value`` (fake
tensors: shapes and dtypes), zerograph's tags (``zerograph``), ``recompute``
and ``partitioner_tag``.

A partitioned graph that is compiled also loses what only AOTAutograd's
partitioner and the lowering read (:data:`COMPILE_ONLY_KEYS`:
``tensor_meta``, a second copy of each value's shape, dtype and strides;
``autograd_backward``; the input/output descriptors ``desc``;
``is_gradient_acc``): :func:`drop_compile_meta`. AOTAutograd's own copy of
the backward graph (kept for compiled autograd) keeps them.
"""

from __future__ import annotations

import torch.fx as fx

TRACE_ONLY_KEYS = (
    "stack_trace",
    "output_stack_traces",
    "from_node",
    "nn_module_stack",
    "fwd_nn_module_stack",
    "source_fn_stack",
    "fwd_source_fn_stack",
    "original_aten",
    "seq_nr",
    "eager_input_vals",
)

COMPILE_ONLY_KEYS = ("tensor_meta", "autograd_backward", "desc", "is_gradient_acc")


def _drop(gm: fx.GraphModule | None, keys) -> int:
    if gm is None:
        return 0
    dropped = 0
    for node in gm.graph.nodes:
        meta = node.meta
        for key in keys:
            if key in meta:
                del meta[key]
                dropped += 1
    return dropped


def drop_trace_meta(gm: fx.GraphModule | None) -> int:
    """Remove :data:`TRACE_ONLY_KEYS` from every node's meta; returns how many entries went."""
    return _drop(gm, TRACE_ONLY_KEYS)


def drop_compile_meta(gm: fx.GraphModule | None) -> int:
    """:func:`drop_trace_meta` plus :data:`COMPILE_ONLY_KEYS`, for a graph
    that is lowered; returns how many entries went."""
    return _drop(gm, (*TRACE_ONLY_KEYS, *COMPILE_ONLY_KEYS))
