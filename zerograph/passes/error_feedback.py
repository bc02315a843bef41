"""qgZ error feedback (``zerograph.zeropp_error_feedback``): each rank keeps
what the quantization of each message it sent left out, and adds it to the
next message of the same reduction.

``zerograph::quantize_with_feedback(x, bits, block, tag, key, segments)`` replaces
``quantize_int8(x, block, segments)`` / ``quantize_int4(x, block, segments)`` in the qgZ hops
(:mod:`zerograph.passes.quantized_collectives`) and does, on this rank::

    c        = x + residual[key]          (x alone the first time)
    q, s     = quantize(c)                (the codec of ``bits``)
    residual[key] = c - dequantize(q, s)  (fp32, x's shape)
    return q, s

``residual`` is the model's ``qgz_residuals`` dictionary
(:class:`zerograph.runtime.state.ModelState`, found by ``tag``), so two
compiled models never share residuals. ``key`` names the reduction and the
hop: the parameters of the reduce-scatter (one, or a bucket's) and the hop's
group label (``"dp"``, ``"node"``, ``"peer"``). A residual whose shape does
not match (a recompiled graph with other buckets) starts again from zero.

Why it helps: with feedback the values a rank sent over ``t`` reductions sum
to the exact sum of its inputs minus the last residual, so the error of the
accumulated update stays bounded by one step's quantization error instead of
growing with ``t``; without feedback a bias of the code (the same rounding
every step) accumulates. The cost: one fp32 residual per hop input, i.e.
per reduction ``4·W·m`` bytes for hop 1 (the whole padded gradient buffer:
``W`` times the gradient shard) plus ``4·P·m`` for hop 2 with nodes,
kept between steps (:func:`residual_bytes`; ``zerograph.explain`` prints it).

Side effect on zerograph's per-model state, invisible to the compiler (like
``zerograph::stash_grad``): its outputs are the message, so it is never dead
code, and it runs once per reduction.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from zerograph.kernels import quantize_int4, quantize_int8
from zerograph.kernels.quantize_int8 import num_blocks
from zerograph.runtime import registry

log = logging.getLogger(__name__)


def _codec_ops(bits: int):
    if bits == 8:
        return (quantize_int8.quantize_int8,
                lambda q, s, block, n, segments: quantize_int8.dequantize_int8(q, s, block, torch.float32, segments))
    if bits == 4:
        return (quantize_int4.quantize_int4,
                lambda q, s, block, n, segments: quantize_int4.dequantize_int4(q, s, block, n, torch.float32, segments))
    raise ValueError(f"quantize_with_feedback: bits must be 8 or 4, got {bits}")


@torch.library.custom_op("zerograph::quantize_with_feedback", mutates_args=())
def quantize_with_feedback(x: Tensor, bits: int, block: int, tag: str, key: str,
                           segments: Optional[Sequence[int]] = None) -> tuple[Tensor, Tensor]:
    """``quantize(x + residual)``, keeping the new residual (module docstring)."""
    quantize, dequantize = _codec_ops(bits)
    store = registry.lookup(tag).qgz_residuals
    c = x.float()
    held = store.get(key)
    if held is not None and held.shape == c.shape:
        c = c + held
    elif held is not None:
        log.debug("qgZ error feedback: residual %s of shape %s does not match %s; starting from zero",
                  key, tuple(held.shape), tuple(c.shape))
    q, s = quantize(c, block, segments)
    store[key] = c - dequantize(q, s, block, c.shape[-1], segments)
    return q, s


@quantize_with_feedback.register_fake
def _(x: Tensor, bits: int, block: int, tag: str, key: str,
      segments: Optional[Sequence[int]] = None) -> tuple[Tensor, Tensor]:
    n = x.shape[-1]
    values = n if bits == 8 else quantize_int4.value_bytes(n)
    return (x.new_empty(*x.shape[:-1], values, dtype=torch.int8),
            x.new_empty(*x.shape[:-1], num_blocks(n, block, segments), dtype=torch.float32))


QUANTIZE_WITH_FEEDBACK = torch.ops.zerograph.quantize_with_feedback.default


def residual_bytes(gm) -> int:
    """Bytes of the fp32 residuals a graph's error-feedback quantizations keep
    between steps (one per node: its input's elements times 4)."""
    total = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is QUANTIZE_WITH_FEEDBACK:
            val = node.args[0].meta.get("val")
            total += 4 * val.numel() if val is not None else 0
    return total
