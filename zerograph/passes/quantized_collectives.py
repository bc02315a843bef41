"""ZeRO++'s quantized collectives (qwZ, qgZ) as explicit op sequences.

Like :mod:`zerograph.graph.collectives`, each function is written with ATen,
``zerograph::quantize_int8`` / ``dequantize_int8``
(:mod:`zerograph.kernels.quantize_int8`) and functional-collective ops, so
the same code runs on fake tensors (to get each node's ``val``) and on
``torch.fx.Proxy`` objects (the passes emit exactly these nodes). Shapes are
passed in (a proxy has none).

Every message is one int8 buffer: a rank's (or destination's) ``n`` int8
values followed by its ``nb = ceil(n / block)`` fp32 scales viewed as ``4·nb``
bytes, so each hop is a single collective of ``n + 4·nb`` bytes per part.
A bucket's message (:class:`Codec` ``segments``: its parameters' lengths
``n_i`` in each part) passes ``segments`` to the ops, so blocks restart at
each parameter and ``nb = sum(ceil(n_i / block))``: no block mixes two
parameters' values.

:func:`quantized_all_gather` (qwZ) replaces ``wait(all_gather(x, W, g))`` for
``x`` of ``n`` elements::

    q, s  = zerograph.quantize_int8(view(x, [1, n]), block)     # [1, n] int8, [1, nb] fp32
    buf   = aten.view(aten.cat([q, aten.view.dtype(s, int8)], 1), [n + 4nb])
    ag    = _c10d_functional.all_gather_into_tensor(buf, W, g)  # W·(n + 4nb) bytes
    g     = aten.view(wait_tensor(ag), [W, n + 4nb])
    s'    = aten.view.dtype(aten.clone(aten.slice(g, 1, n, n + 4nb)), f32)
    full  = aten.view(zerograph.dequantize_int8(aten.slice(g, 1, 0, n), s', block, dtype), [W·rows, ...])

:func:`quantized_reduce_scatter` (qgZ) replaces ``wait(reduce_scatter(x,
"sum", W, g))`` for ``x`` of ``W·m`` elements (row ``c`` = the ``m`` elements
destined for data-parallel rank ``c``). Without nodes it is one hop over all
``W`` ranks; with nodes of ``k`` ranks (``P = W/k`` nodes, rank ``c = n·k +
j`` at index ``j`` of node ``n``) two::

    t   = aten.clone(aten.permute(view(x, [P, k, m]), [1, 0, 2]))  # [k, P, m]: by node-mate j
    hop(t, node group)  -> [P, m]   # int8 all-to-all inside the node, fp32 sum over the k senders:
                                    # row n = this node's partial sum of chunk n·k + j
    hop(view(., [P, 1, m]), peer group) -> [1, m]  # int8 all-to-all across nodes, fp32 sum over P nodes

where ``hop(t [size, R, m], group)`` is::

    q, s = zerograph.quantize_int8(view(t, [size·R, m]), block)
    buf  = aten.cat([view(q, [size, R·m]), view(aten.view.dtype(s, int8), [size, 4·R·nb])], 1)
    a2a  = _c10d_functional.all_to_all_single(view(buf, [size·L]), [L]*size, [L]*size, group)
    g    = aten.view(wait_tensor(a2a), [size, L])
    d    = zerograph.dequantize_int8(view(slice(g, 1, 0, R·m), [size, R, m]), <its scales>, block, f32)
    out  = aten.sum(d, [0])                                       # [R, m] fp32

With int4 (:class:`Codec` ``bits=4``: ``zerograph.zeropp_gradient_bits`` /
``zeropp_weight_bits``) the same sequences call ``zerograph::quantize_int4``
/ ``dequantize_int4`` (which also takes the row length: two values per byte),
and each part's values take ``ceil(n / 2)`` bytes instead of ``n``.

Bytes (``b = n + 4·nb`` per part, ``ceil(n/2) + 4·nb`` with int4): a gather moves ``W·b``; the two hops
``k·P·(m + 4·nb)`` inside the node and ``P·(m + 4·nb)`` across nodes.
"""

from __future__ import annotations

import dataclasses
import math
import operator

import torch

from zerograph._torch_private import c10d_functional
from zerograph.graph.collectives import Emit, _noop_emit
from zerograph.kernels import quantize_int4, quantize_int8
from zerograph.kernels.quantize_int8 import num_blocks
from zerograph.passes.error_feedback import QUANTIZE_WITH_FEEDBACK

aten = torch.ops.aten


@dataclasses.dataclass(frozen=True)
class Codec:
    """How a message's values are coded: ``bits`` 8 (``zerograph::quantize_int8``,
    one byte per value) or 4 (``zerograph::quantize_int4``, two values per
    byte), blocks of ``block`` elements with one fp32 scale each."""

    bits: int = 8
    block: int = 256
    # qgZ error feedback: the model's tag (its residuals); None: off
    feedback: str | None = None
    # a bucket's parameters' lengths in each part: blocks restart at each (None: one)
    segments: tuple[int, ...] | None = None

    def blocks(self, n: int) -> int:
        """Scales of a row of ``n`` elements (``sum(ceil(n_i / block))`` over the segments)."""
        return num_blocks(n, self.block, self.segments)

    def value_bytes(self, n: int) -> int:
        """Bytes of the coded values of a row of ``n`` elements."""
        return n if self.bits == 8 else quantize_int4.value_bytes(n)

    def quantize(self, x, emit: Emit, key: str | None = None):
        """``(q, s)`` of ``x``; with error feedback and a ``key``, of ``x`` plus
        the residual the last message of ``key`` left (:mod:`zerograph.passes.error_feedback`)."""
        if self.feedback is not None and key is not None:
            qs = emit("comm_prep", QUANTIZE_WITH_FEEDBACK(x, self.bits, self.block, self.feedback, key,
                                                          *self._segments()))
        else:
            op = quantize_int8.QUANTIZE if self.bits == 8 else quantize_int4.QUANTIZE
            qs = emit("comm_prep", op(x, self.block, *self._segments()))
        return emit("comm_prep", operator.getitem(qs, 0)), emit("comm_prep", operator.getitem(qs, 1))

    def dequantize(self, q, s, n: int, dtype: torch.dtype, emit: Emit):
        """``q`` ``[..., value_bytes(n)]`` and ``s`` ``[..., nb]`` -> ``[..., n]`` in ``dtype``."""
        if self.bits == 8:
            return emit("comm_prep", quantize_int8.DEQUANTIZE(q, s, self.block, dtype, *self._segments()))
        return emit("comm_prep", quantize_int4.DEQUANTIZE(q, s, self.block, n, dtype, *self._segments()))

    def _segments(self) -> list[list[int]]:
        """The ops' trailing ``segments`` argument, left out for one segment."""
        return [] if self.segments is None else [list(self.segments)]


@dataclasses.dataclass(frozen=True)
class Hop:
    """One all-to-all of qgZ: the group's name, its size and its label
    (``NodeTag.group``: ``"dp"``, ``"node"`` or ``"peer"``)."""

    group_name: str
    size: int
    label: str


def _pack(q, s, parts: int, q_elems: int, s_elems: int, emit: Emit):
    """``parts`` rows of int8 values followed by their scales' bytes, flat."""
    q = emit("comm_prep", aten.view.default(q, [parts, q_elems]))
    s = emit("comm_prep", aten.view.dtype(s, torch.int8))
    s = emit("comm_prep", aten.view.default(s, [parts, 4 * s_elems]))
    buf = emit("comm_prep", aten.cat.default([q, s], 1))
    return emit("comm_prep", aten.view.default(buf, [parts * (q_elems + 4 * s_elems)]))


def _unpack(x, parts: int, q_elems: int, s_elems: int, emit: Emit):
    """The received ``[parts, q_elems]`` int8 values (a strided view) and
    ``[parts, s_elems]`` fp32 scales."""
    x = emit("comm_prep", aten.view.default(x, [parts, q_elems + 4 * s_elems]))
    q = emit("comm_prep", aten.slice.Tensor(x, 1, 0, q_elems))
    s = emit("comm_prep", aten.slice.Tensor(x, 1, q_elems, q_elems + 4 * s_elems))
    s = emit("comm_prep", aten.clone.default(s, memory_format=torch.contiguous_format))
    return q, emit("comm_prep", aten.view.dtype(s, torch.float32))


def quantized_all_gather(x, shape, dtype: torch.dtype, world: int, group_name: str, codec: Codec,
                         emit: Emit = _noop_emit):
    """qwZ: the all-gather of ``x`` (``shape``, ``dtype``) over ``world`` ranks
    sent as int8 (or packed int4) blocks and fp32 scales; the
    ``[world·shape[0], ...]`` result in ``dtype``."""
    n = math.prod(shape)
    nb, nq = codec.blocks(n), codec.value_bytes(n)
    rows = emit("comm_prep", aten.view.default(x, [1, n]))
    q, s = codec.quantize(rows, emit)
    buf = _pack(q, s, 1, nq, nb, emit)
    g = emit("all_gather", c10d_functional.all_gather_into_tensor.default(buf, world, group_name))
    g = emit("wait", c10d_functional.wait_tensor.default(g))
    q, s = _unpack(g, world, nq, nb, emit)
    full = codec.dequantize(q, s, n, dtype, emit)
    return emit("comm_prep", aten.view.default(full, [world * shape[0], *shape[1:]]))


def _hop(t, size: int, rows: int, m: int, hop: Hop, codec: Codec, emit: Emit, key: str | None):
    """One quantized all-to-all: ``t`` ``[size, rows, m]`` fp32 (part ``i`` for
    group rank ``i``) -> ``[rows, m]`` fp32, the sum of what the ranks sent here."""
    nb, mq = codec.blocks(m), codec.value_bytes(m)
    flat = emit("comm_prep", aten.view.default(t, [size * rows, m]))
    q, s = codec.quantize(flat, emit, None if key is None else f"{key}/{hop.label}")
    buf = _pack(q, s, size, rows * mq, rows * nb, emit)
    part = rows * (mq + 4 * nb)
    x = emit("all_to_all", c10d_functional.all_to_all_single.default(buf, [part] * size, [part] * size,
                                                                     hop.group_name), group=hop.label)
    x = emit("wait", c10d_functional.wait_tensor.default(x), group=hop.label)
    q, s = _unpack(x, size, rows * mq, rows * nb, emit)
    q = emit("comm_prep", aten.view.default(q, [size, rows, mq]))
    s = emit("comm_prep", aten.view.default(s, [size, rows, nb]))
    d = codec.dequantize(q, s, m, torch.float32, emit)
    return emit("comm_prep", aten.sum.dim_IntList(d, [0]))


def quantized_reduce_scatter(x, shape, dtype: torch.dtype, hops: list[Hop], codec: Codec,
                             emit: Emit = _noop_emit, key: str | None = None):
    """qgZ: this rank's part of the sum over all ranks of ``x`` (``shape``,
    ``dtype``; its ``W`` rows of ``m`` elements are the ranks' parts), by
    int8 all-to-alls over ``hops`` (one over all ranks, or the node then
    the peers), summed in fp32; ``[shape[0] / W, ...]`` in ``dtype``. ``key``
    names the reduction's residuals when ``codec`` has error feedback."""
    world = math.prod(h.size for h in hops)
    m = math.prod(shape) // world
    if dtype != torch.float32:
        x = emit("comm_prep", aten._to_copy.default(x, dtype=torch.float32))
    if len(hops) == 1:
        t = emit("comm_prep", aten.view.default(x, [world, 1, m]))
        out = _hop(t, world, 1, m, hops[0], codec, emit, key)
    else:
        node, peer = hops
        t = emit("comm_prep", aten.view.default(x, [peer.size, node.size, m]))
        t = emit("comm_prep", aten.permute.default(t, [1, 0, 2]))
        t = emit("comm_prep", aten.clone.default(t, memory_format=torch.contiguous_format))
        partial = _hop(t, node.size, peer.size, m, node, codec, emit, key)
        t = emit("comm_prep", aten.view.default(partial, [peer.size, 1, m]))
        out = _hop(t, peer.size, 1, m, peer, codec, emit, key)
    if dtype != torch.float32:
        out = emit("comm_prep", aten._to_copy.default(out, dtype=dtype))
    return emit("comm_prep", aten.view.default(out, [shape[0] // world, *shape[1:]]))
