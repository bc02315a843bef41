"""Megatron sequence parallelism inside pipeline stages: which values cross
a stage boundary as sequence shards, and the stage graphs that send and
receive them (:mod:`zerograph.graph.tp_seq_boundary`).

A boundary value is sent as this rank's sequence shard when it is the
residual stream: a floating-point activation ``[.., s, h]`` (at least 3-D)
whose dim -2 is a sequence length of the batch (the last dim of a 2-D or
larger batch tensor), which tp divides, and which depends on a parameter
(so it carries a gradient). Values computed from the batch alone (Llama's
rotary cos/sin, masks, positions) are sent whole, as without sequence
parallelism. The rule reads only the whole traced graph, so every rank
decides the same for both sides of a boundary.

Stage ``k`` returns ``tp_seq_leave(v)`` for each such value; stage ``k + 1``
reads its placeholder through ``tp_seq_enter``; both stages' plans list the
value with its dim -2 divided by tp, the shape the runtime sends and
receives (forward activation and backward gradient alike). For GPT's
``[b, s, h]`` residual at tp=2::

    stage 0:  ...; add_4 = add(add_2, dropout_1); leave = tp_seq_leave(add_4, 1, 2); return (leave,)
    stage 1:  add_2 (f32[b, s/2, h]) -> enter = tp_seq_enter(add_2, 1, 2) -> layer_norm(enter, ...)
"""

from __future__ import annotations

import dataclasses
import logging

import torch
import torch.fx as fx

from zerograph.graph.tp_seq_boundary import TP_SEQ_ENTER, TP_SEQ_LEAVE

log = logging.getLogger(__name__)


def _parameter_dependent(gm: fx.GraphModule) -> set[str]:
    """Names of the nodes of the whole traced graph that read a parameter, directly or not."""
    params = {name for name, _ in gm.named_parameters(remove_duplicate=False)}
    out: set[str] = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target in params:
            out.add(node.name)
        elif any(a.name in out for a in node.all_input_nodes):
            out.add(node.name)
    return out


def sequence_sharded(gm: fx.GraphModule, split, batch_tensors, tp: int) -> set[str]:
    """The boundary values (names) that cross as sequence shards."""
    seq_lens = {t.shape[-1] for t in batch_tensors if isinstance(t, torch.Tensor) and t.dim() >= 2}
    dependent = _parameter_dependent(gm)
    out = set()
    for st in split.stages:
        for v in st.outgoing:
            if (v.dtype.is_floating_point and len(v.shape) >= 3 and v.shape[-2] in seq_lens
                    and v.shape[-2] % tp == 0 and v.name in dependent):
                out.add(v.name)
    return out


def shard_boundaries(split, names: set[str], tp: int) -> int:
    """Put the markers into every stage graph this rank still holds and cut
    the sharded values' shapes in every stage's plan; returns how many
    boundary values (counted once per boundary) cross as shards."""
    if not names:
        return 0
    count = 0
    for st in split.stages:
        if st.module is not None:
            _mark(st.module, st, names, tp)
        st.incoming = tuple(_cut(v, tp) if v.name in names else v for v in st.incoming)
        st.outgoing = tuple(_cut(v, tp) if v.name in names else v for v in st.outgoing)
        count += sum(v.name in names for v in st.outgoing)
    log.info("pipeline x Megatron-SP: %d boundary value(s) cross as sequence shards (1/%d of the bytes): %s",
             count, tp, ", ".join(sorted(names)))
    return count


def _cut(v, tp: int):
    shape = list(v.shape)
    shape[-2] //= tp
    return dataclasses.replace(v, shape=tuple(shape))


def _mark(gm: fx.GraphModule, st, names: set[str], tp: int) -> None:
    graph = gm.graph
    incoming = {v.name for v in st.incoming if v.name in names}
    for ph in [n for n in graph.nodes if n.op == "placeholder" and n.name in incoming]:
        dim = len(ph.meta["val"].shape) - 2
        with graph.inserting_after(ph):
            enter = graph.call_function(TP_SEQ_ENTER, (ph, dim, tp))
        enter.meta["val"] = ph.meta["val"]
        ph.replace_all_uses_with(enter, delete_user_cb=lambda user: user is not enter)
    if st.outgoing:
        out = next(n for n in graph.nodes if n.op == "output")
        values = list(out.args[0])
        for i, (value, spec) in enumerate(zip(values, st.outgoing)):
            if spec.name in names:
                dim = len(spec.shape) - 2
                with graph.inserting_before(out):
                    values[i] = graph.call_function(TP_SEQ_LEAVE, (value, dim, tp))
        out.args = (tuple(values),)
    graph.lint()
    gm.recompile()

