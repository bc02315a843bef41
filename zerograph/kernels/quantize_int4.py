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
``q_i * scale`` in ``dtype``.

**Error bound.** In exact arithmetic ``|x_i - q_i * scale| <= scale / 2``
(``|x_i / scale| <= 7``, so the clamp never binds). In fp32 the division, the
``+ 1/2`` and the product each round once: on values of magnitude ``<= 7.5``
the quotient and the sum are off by at most ``7 * 2^-24 + 2^-22`` in units of
``scale`` and the product by ``7 * 2^-24``, together ``18 * 2^-24 < 2^-19``,
so the tested bound is ``|x_i - q_i * scale| <= scale * (1/2 + 2^-19)``
(``x_i`` read in fp32). That is ``absmax / 14`` per block: 127/7 ≈ 18× the
int8 bound.

Registered as ``zerograph::quantize_int4`` and ``zerograph::dequantize_int4``
(no autograd). On CUDA (with Triton) they run the Triton kernels, elsewhere
the pure-torch references. Both compute the same fp32 operations with
correctly rounded division (``tl.math.div_rn``), so they agree exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from zerograph.kernels._common import HAS_TRITON, as_rows, device_guard, require_triton, tl, triton, use_triton
from zerograph.kernels.quantize_int8 import num_blocks

__all__ = ["quantize_int4", "dequantize_int4", "quantize_int4_reference", "dequantize_int4_reference",
           "quantize_int4_triton", "dequantize_int4_triton", "packed_bytes", "value_bytes", "QMAX"]

QMAX = 7


def value_bytes(n: int) -> int:
    """Bytes of the packed values of a row of ``n`` elements."""
    return (n + 1) // 2


def packed_bytes(n: int, block: int) -> int:
    """Bytes of one quantized row of ``n`` elements: packed int4 values and fp32 scales."""
    return value_bytes(n) + 4 * num_blocks(n, block)


def _check(x: Tensor, block: int) -> None:
    if block < 1:
        raise ValueError(f"quantize_int4: block must be >= 1 element, got {block}")
    if not x.is_floating_point():
        raise TypeError(f"quantize_int4: x must be floating point, got {x.dtype}")


def _check_packed(q: Tensor, n: int) -> None:
    if q.dim() == 0 or q.shape[-1] != value_bytes(n):
        raise ValueError(f"dequantize_int4: {n} elements per row are {value_bytes(n)} packed bytes, "
                         f"got a last dimension of {q.shape[-1] if q.dim() else 'none (0-d)'}")


# --------------------------------------------------------------------------- references


def quantize_int4_reference(x: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """``(packed, scales)``: int8 ``[..., ceil(n / 2)]`` and fp32 ``[..., ceil(n / block)]``."""
    _check(x, block)
    n = x.shape[-1] if x.dim() else 1
    rows = x.reshape(-1, n).float()
    nb = num_blocks(n, block)
    blocks = torch.nn.functional.pad(rows, (0, nb * block - n)).reshape(rows.shape[0], nb, block)
    scale = blocks.abs().amax(dim=-1, keepdim=True) / QMAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.floor(blocks / safe + 0.5).clamp_(-QMAX, QMAX)
    q = torch.where(scale > 0, q, torch.zeros_like(q))
    q = q.reshape(rows.shape[0], -1)[:, :n].to(torch.int32)
    q = torch.nn.functional.pad(q, (0, n % 2)) & 0xF
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8).view(torch.int8)
    lead = x.shape[:-1] if x.dim() else ()
    return packed.reshape(*lead, value_bytes(n)), scale.reshape(*lead, nb)


def dequantize_int4_reference(q: Tensor, scales: Tensor, block: int, n: int, dtype: torch.dtype) -> Tensor:
    """``[..., n]`` in ``dtype``: the unpacked values times their block scales (``q`` may be a strided view)."""
    _check_packed(q, n)
    b = q.reshape(-1, q.shape[-1]).to(torch.int32) & 0xFF
    nibbles = torch.stack([b & 0xF, b >> 4], dim=-1).reshape(b.shape[0], -1)[:, :n]
    values = torch.where(nibbles >= 8, nibbles - 16, nibbles).float()
    s = scales.reshape(-1, num_blocks(n, block)).float().repeat_interleave(block, dim=-1)[:, :n]
    return (values * s).to(dtype).reshape(*q.shape[:-1], n)


# --------------------------------------------------------------------------- Triton kernels

if HAS_TRITON:

    @triton.jit
    def _scales_kernel(X, S, stride_x, n_cols, n_blocks, BLOCK: tl.constexpr, BLOCK_P2: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        b = tl.program_id(1)
        offs = tl.arange(0, BLOCK_P2)
        cols = b * BLOCK + offs
        x = tl.load(X + row * stride_x + cols, mask=(offs < BLOCK) & (cols < n_cols), other=0.0).to(tl.float32)
        tl.store(S + row * n_blocks + b, tl.math.div_rn(tl.max(tl.abs(x), axis=0), 7.0))

    @triton.jit
    def _nibble(X, S, row_x, row_s, cols, mask, BLOCK: tl.constexpr):
        """The 4-bit two's complement codes (int32, 0..15) of elements ``cols``."""
        x = tl.load(X + row_x + cols, mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(S + row_s + cols // BLOCK, mask=mask, other=0.0)
        safe = tl.where(scale > 0, scale, 1.0)
        q = tl.floor(tl.math.div_rn(x, safe) + 0.5)
        q = tl.minimum(tl.maximum(q, -7.0), 7.0)
        q = tl.where(scale > 0, q, 0.0)
        return q.to(tl.int32) & 15

    @triton.jit
    def _pack_kernel(X, S, Q, stride_x, n_cols, n_bytes, n_blocks, BLOCK: tl.constexpr, PAIRS: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        i = tl.program_id(1) * PAIRS + tl.arange(0, PAIRS)
        lo = _nibble(X, S, row * stride_x, row * n_blocks, 2 * i, 2 * i < n_cols, BLOCK)
        hi = _nibble(X, S, row * stride_x, row * n_blocks, 2 * i + 1, 2 * i + 1 < n_cols, BLOCK)
        tl.store(Q + row * n_bytes + i, (lo | (hi << 4)).to(tl.uint8), mask=i < n_bytes)

    @triton.jit
    def _unpack_kernel(Q, S, Y, stride_q, n_cols, n_bytes, n_blocks, BLOCK: tl.constexpr, PAIRS: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        i = tl.program_id(1) * PAIRS + tl.arange(0, PAIRS)
        b = tl.load(Q + row * stride_q + i, mask=i < n_bytes, other=0).to(tl.int32) & 255
        lo, hi = b & 15, b >> 4
        lo = tl.where(lo >= 8, lo - 16, lo).to(tl.float32)
        hi = tl.where(hi >= 8, hi - 16, hi).to(tl.float32)
        m0, m1 = 2 * i < n_cols, 2 * i + 1 < n_cols
        s0 = tl.load(S + row * n_blocks + (2 * i) // BLOCK, mask=m0, other=0.0)
        s1 = tl.load(S + row * n_blocks + (2 * i + 1) // BLOCK, mask=m1, other=0.0)
        tl.store(Y + row * n_cols + 2 * i, (lo * s0).to(Y.dtype.element_ty), mask=m0)
        tl.store(Y + row * n_cols + 2 * i + 1, (hi * s1).to(Y.dtype.element_ty), mask=m1)


_PAIRS = 512  # packed bytes per program


def quantize_int4_triton(x: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """Launch the scale and pack kernels (CUDA tensors, or CPU under ``TRITON_INTERPRET=1``)."""
    _check(x, block)
    require_triton(x)
    x2 = as_rows(x)
    n_rows, n = x2.shape
    nb, nq = num_blocks(n, block), value_bytes(n)
    lead = x.shape[:-1] if x.dim() else ()
    q = torch.empty(*lead, nq, dtype=torch.int8, device=x.device)
    scales = torch.empty(*lead, nb, dtype=torch.float32, device=x.device)
    if x2.numel():
        p2 = triton.next_power_of_2(block)
        with device_guard(x):
            _scales_kernel[(n_rows, nb)](x2, scales, x2.stride(0), n, nb, BLOCK=block, BLOCK_P2=p2,
                                         num_warps=max(1, min(8, p2 // 256)))
            _pack_kernel[(n_rows, triton.cdiv(nq, _PAIRS))](x2, scales, q.view(torch.uint8), x2.stride(0), n, nq,
                                                            nb, BLOCK=block, PAIRS=_PAIRS)
    return q, scales


def dequantize_int4_triton(q: Tensor, scales: Tensor, block: int, n: int, dtype: torch.dtype) -> Tensor:
    """Launch the unpack kernel; returns a contiguous ``[..., n]`` tensor in ``dtype``."""
    _check_packed(q, n)
    require_triton(q, scales)
    q2 = as_rows(q)
    n_rows, nq = q2.shape
    nb = num_blocks(n, block)
    s2 = scales.reshape(-1, nb).contiguous()
    y = torch.empty(*q.shape[:-1], n, dtype=dtype, device=q.device)
    if y.numel():
        with device_guard(q):
            _unpack_kernel[(n_rows, triton.cdiv(nq, _PAIRS))](q2, s2, y, q2.stride(0), n, nq, nb, BLOCK=block,
                                                              PAIRS=_PAIRS)
    return y


# --------------------------------------------------------------------------- registration


@torch.library.custom_op("zerograph::quantize_int4", mutates_args=())
def _quantize_op(x: Tensor, block: int) -> tuple[Tensor, Tensor]:
    if use_triton(x):
        return quantize_int4_triton(x, block)
    q, s = quantize_int4_reference(x, block)
    return q.contiguous(), s.contiguous()


@_quantize_op.register_fake
def _(x: Tensor, block: int) -> tuple[Tensor, Tensor]:
    n = x.shape[-1] if x.dim() else 1
    lead = x.shape[:-1] if x.dim() else ()
    return (x.new_empty(*lead, value_bytes(n), dtype=torch.int8),
            x.new_empty(*lead, num_blocks(n, block), dtype=torch.float32))


@torch.library.custom_op("zerograph::dequantize_int4", mutates_args=())
def _dequantize_op(q: Tensor, scales: Tensor, block: int, n: int, dtype: torch.dtype) -> Tensor:
    if use_triton(q, scales):
        return dequantize_int4_triton(q, scales, block, n, dtype)
    return dequantize_int4_reference(q, scales, block, n, dtype).contiguous()


@_dequantize_op.register_fake
def _(q: Tensor, scales: Tensor, block: int, n: int, dtype: torch.dtype) -> Tensor:
    return q.new_empty(*q.shape[:-1], n, dtype=dtype)


QUANTIZE = torch.ops.zerograph.quantize_int4.default
DEQUANTIZE = torch.ops.zerograph.dequantize_int4.default


# --------------------------------------------------------------------------- public functions


def quantize_int4(x: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """``(packed, scales)`` of ``x`` in blocks of ``block`` elements along its last dimension."""
    _check(x, block)
    return torch.ops.zerograph.quantize_int4(x, block)


def dequantize_int4(q: Tensor, scales: Tensor, block: int, n: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """The ``n`` values per row of ``q`` times their block scales, in ``dtype``."""
    if q.dtype != torch.int8 or scales.dtype != torch.float32:
        raise TypeError(f"dequantize_int4: expected int8 packed values and fp32 scales, got {q.dtype} and "
                        f"{scales.dtype}")
    _check_packed(q, n)
    return torch.ops.zerograph.dequantize_int4(q, scales, block, n, dtype)
