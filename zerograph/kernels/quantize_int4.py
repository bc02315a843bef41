"""Blockwise symmetric int4 quantization, two values per byte (ZeRO++ qgZ, qwZ).

``quantize_int4(x, block) -> (packed, scales)`` splits every row of ``x``
(its last dimension, ``n`` elements) into blocks of ``block`` consecutive
elements (the last block of a row may be shorter), as
:mod:`zerograph.kernels.quantize_int8` does, with 15 levels instead of 255::

    scale = max(|x_i| over the block) / 7            (fp32)
    q_i   = clamp(floor(x_i / scale + 1/2), -7, 7)    (0 where scale == 0)

and packs each row's values two per byte, element ``2i`` in the low nibble
and ``2i + 1`` in the high nibble (4-bit two's complement)::

    byte_i = (q_2i & 0xF) | (q_2i+1 & 0xF) << 4       (stored as int8)

A row of odd length ends in a byte whose high nibble is 0. So a row of
``n`` elements is ``ceil(n / 2)`` bytes of values plus ``4 * ceil(n / block)``
bytes of scales (:func:`packed_bytes`). Pairs may straddle two blocks (an
odd ``block``): each nibble is quantized with its own element's block scale.
Rows never share a byte, so ``[ranks, n]`` quantizes each rank's part on its
own, as the collectives need.

``dequantize_int4(packed, scales, block, n, dtype)`` unpacks ``n`` elements
per row (``n`` is needed: ``2 * ceil(n / 2)`` may be ``n + 1``) and returns
``q_i * scale`` in ``dtype``. Both take ``segments`` as the int8 ops do
(blocks restart at each segment; ``sum(ceil(n_i / block))`` scales per
row); pairs may straddle two segments as they straddle two blocks.

**Error bound.** In exact arithmetic ``|x_i - q_i * scale| <= scale / 2``
(``|x_i / scale| <= 7``, so the clamp never binds). In fp32 the division, the
``+ 1/2`` and the product each round once: on values of magnitude ``<= 7.5``
the quotient and the sum are off by at most ``7 * 2^-24 + 2^-22`` in units of
``scale`` and the product by ``7 * 2^-24``, together ``18 * 2^-24 < 2^-19``,
so the tested bound is ``|x_i - q_i * scale| <= scale * (1/2 + 2^-19)``
(``x_i`` read in fp32). That is ``absmax / 14`` per block: 127/7 ≈ 18× the
int8 bound.

Registered as ``zerograph::quantize_int4`` and ``zerograph::dequantize_int4``
(no autograd). On CUDA (with Triton) they run the Triton kernels (the int8
module's block kernels with 7 levels, writing one code per byte, then a
kernel that packs or unpacks the nibbles), elsewhere the pure-torch
references. Both compute the same fp32 operations with correctly rounded
division (``tl.math.div_rn``), so they agree exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from zerograph.kernels._common import HAS_TRITON, as_rows, device_guard, require_triton, tl, triton, use_triton
from zerograph.kernels.quantize_int8 import (check_input, check_segments, launch_dequantize, launch_quantize, num_blocks,
                                             quantize_codes, scale_per_column)

__all__ = ["quantize_int4", "dequantize_int4", "quantize_int4_reference", "dequantize_int4_reference",
           "quantize_int4_triton", "dequantize_int4_triton", "packed_bytes", "value_bytes", "QMAX"]

QMAX = 7


def value_bytes(n: int) -> int:
    """Bytes of the packed values of a row of ``n`` elements."""
    return (n + 1) // 2


def packed_bytes(n: int, block: int, segments: Sequence[int] | None = None) -> int:
    """Bytes of one quantized row of ``n`` elements: packed int4 values and fp32 scales."""
    return value_bytes(n) + 4 * num_blocks(n, block, segments)


def _check(x: Tensor, block: int, segments: Sequence[int] | None = None) -> None:
    check_input("quantize_int4", x, block, segments)


def _check_packed(q: Tensor, n: int, segments: Sequence[int] | None = None) -> None:
    if q.dim() == 0 or q.shape[-1] != value_bytes(n):
        raise ValueError(f"dequantize_int4: {n} elements per row are {value_bytes(n)} packed bytes, "
                         f"got a last dimension of {q.shape[-1] if q.dim() else 'none (0-d)'}")
    check_segments("dequantize_int4", n, segments)


# --------------------------------------------------------------------------- references


def quantize_int4_reference(x: Tensor, block: int, segments: Sequence[int] | None = None
                            ) -> tuple[Tensor, Tensor]:
    """``(packed, scales)``: int8 ``[..., ceil(n / 2)]`` and fp32 ``[..., nb]``."""
    _check(x, block, segments)
    n = x.shape[-1] if x.dim() else 1
    q, scale = quantize_codes(x, block, QMAX, segments)
    q = torch.nn.functional.pad(q.to(torch.int32), (0, n % 2)) & 0xF
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8).view(torch.int8)
    lead = x.shape[:-1] if x.dim() else ()
    return packed.reshape(*lead, value_bytes(n)), scale.reshape(*lead, scale.shape[-1])


def dequantize_int4_reference(q: Tensor, scales: Tensor, block: int, n: int, dtype: torch.dtype,
                              segments: Sequence[int] | None = None) -> Tensor:
    """``[..., n]`` in ``dtype``: the unpacked values times their block scales (``q`` may be a strided view)."""
    _check_packed(q, n, segments)
    b = q.reshape(-1, q.shape[-1]).to(torch.int32) & 0xFF
    nibbles = torch.stack([b & 0xF, b >> 4], dim=-1).reshape(b.shape[0], -1)[:, :n]
    values = torch.where(nibbles >= 8, nibbles - 16, nibbles).float()
    return (values * scale_per_column(scales, block, n, segments)).to(dtype).reshape(*q.shape[:-1], n)


# --------------------------------------------------------------------------- Triton kernels

if HAS_TRITON:

    @triton.jit
    def _pack_kernel(C, Q, n_cols, n_bytes, PAIRS: tl.constexpr):
        """Bytes of two codes (int8 in [-7, 7], contiguous rows) each."""
        row = tl.program_id(0).to(tl.int64)
        i = tl.program_id(1) * PAIRS + tl.arange(0, PAIRS)
        lo = tl.load(C + row * n_cols + 2 * i, mask=2 * i < n_cols, other=0).to(tl.int32) & 15
        hi = tl.load(C + row * n_cols + 2 * i + 1, mask=2 * i + 1 < n_cols, other=0).to(tl.int32) & 15
        tl.store(Q + row * n_bytes + i, (lo | (hi << 4)).to(tl.uint8), mask=i < n_bytes)

    @triton.jit
    def _unpack_kernel(Q, C, stride_q, n_cols, n_bytes, PAIRS: tl.constexpr):
        """The codes (int8, contiguous rows) of packed bytes."""
        row = tl.program_id(0).to(tl.int64)
        i = tl.program_id(1) * PAIRS + tl.arange(0, PAIRS)
        b = tl.load(Q + row * stride_q + i, mask=i < n_bytes, other=0).to(tl.int32) & 255
        lo, hi = b & 15, b >> 4
        lo = tl.where(lo >= 8, lo - 16, lo)
        hi = tl.where(hi >= 8, hi - 16, hi)
        tl.store(C + row * n_cols + 2 * i, lo.to(tl.int8), mask=2 * i < n_cols)
        tl.store(C + row * n_cols + 2 * i + 1, hi.to(tl.int8), mask=2 * i + 1 < n_cols)


_PAIRS = 512  # packed bytes per program


def quantize_int4_triton(x: Tensor, block: int, segments: Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
    """Launch the block and pack kernels (CUDA tensors, or CPU under ``TRITON_INTERPRET=1``)."""
    _check(x, block, segments)
    require_triton(x)
    x2 = as_rows(x)
    n_rows, n = x2.shape
    nq = value_bytes(n)
    lead = x.shape[:-1] if x.dim() else ()
    q = torch.empty(*lead, nq, dtype=torch.int8, device=x.device)
    scales = torch.empty(*lead, num_blocks(n, block, segments), dtype=torch.float32, device=x.device)
    if x2.numel():
        codes = torch.empty(n_rows, n, dtype=torch.int8, device=x.device)
        launch_quantize(x2, codes, scales, block, QMAX, segments)
        with device_guard(x):
            _pack_kernel[(n_rows, triton.cdiv(nq, _PAIRS))](codes, q.view(torch.uint8), n, nq, PAIRS=_PAIRS)
    return q, scales


def dequantize_int4_triton(q: Tensor, scales: Tensor, block: int, n: int, dtype: torch.dtype,
                           segments: Sequence[int] | None = None) -> Tensor:
    """Launch the unpack and block kernels; returns a contiguous ``[..., n]`` tensor in ``dtype``."""
    _check_packed(q, n, segments)
    require_triton(q, scales)
    q2 = as_rows(q)
    n_rows, nq = q2.shape
    y = torch.empty(*q.shape[:-1], n, dtype=dtype, device=q.device)
    if y.numel():
        codes = torch.empty(n_rows, n, dtype=torch.int8, device=q.device)
        with device_guard(q):
            _unpack_kernel[(n_rows, triton.cdiv(nq, _PAIRS))](q2, codes, q2.stride(0), n, nq, PAIRS=_PAIRS)
        launch_dequantize(codes, scales, y.view(n_rows, n), block, segments)
    return y


# --------------------------------------------------------------------------- registration


@torch.library.custom_op("zerograph::quantize_int4", mutates_args=())
def _quantize_op(x: Tensor, block: int, segments: Optional[Sequence[int]] = None) -> tuple[Tensor, Tensor]:
    if use_triton(x):
        return quantize_int4_triton(x, block, segments)
    q, s = quantize_int4_reference(x, block, segments)
    return q.contiguous(), s.contiguous()


@_quantize_op.register_fake
def _(x: Tensor, block: int, segments: Optional[Sequence[int]] = None) -> tuple[Tensor, Tensor]:
    n = x.shape[-1] if x.dim() else 1
    lead = x.shape[:-1] if x.dim() else ()
    return (x.new_empty(*lead, value_bytes(n), dtype=torch.int8),
            x.new_empty(*lead, num_blocks(n, block, segments), dtype=torch.float32))


@torch.library.custom_op("zerograph::dequantize_int4", mutates_args=())
def _dequantize_op(q: Tensor, scales: Tensor, block: int, n: int, dtype: torch.dtype,
                   segments: Optional[Sequence[int]] = None) -> Tensor:
    if use_triton(q, scales):
        return dequantize_int4_triton(q, scales, block, n, dtype, segments)
    return dequantize_int4_reference(q, scales, block, n, dtype, segments).contiguous()


@_dequantize_op.register_fake
def _(q: Tensor, scales: Tensor, block: int, n: int, dtype: torch.dtype,
      segments: Optional[Sequence[int]] = None) -> Tensor:
    return q.new_empty(*q.shape[:-1], n, dtype=dtype)


QUANTIZE = torch.ops.zerograph.quantize_int4.default
DEQUANTIZE = torch.ops.zerograph.dequantize_int4.default


# --------------------------------------------------------------------------- public functions


def quantize_int4(x: Tensor, block: int, segments: Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
    """``(packed, scales)`` of ``x`` in blocks of ``block`` elements along its
    last dimension (restarting at each of ``segments``)."""
    _check(x, block, segments)
    return torch.ops.zerograph.quantize_int4(x, block, None if segments is None else list(segments))


def dequantize_int4(q: Tensor, scales: Tensor, block: int, n: int, dtype: torch.dtype = torch.float32,
                    segments: Sequence[int] | None = None) -> Tensor:
    """The ``n`` values per row of ``q`` times their block scales, in ``dtype``."""
    if q.dtype != torch.int8 or scales.dtype != torch.float32:
        raise TypeError(f"dequantize_int4: expected int8 packed values and fp32 scales, got {q.dtype} and "
                        f"{scales.dtype}")
    _check_packed(q, n, segments)
    return torch.ops.zerograph.dequantize_int4(q, scales, block, n, dtype, None if segments is None else list(segments))
