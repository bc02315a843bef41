"""Blockwise symmetric int8 quantization (ZeRO++ qwZ and qgZ).

``quantize_int8(x, block) -> (q, scales)`` splits every row of ``x`` (its
last dimension, ``n`` elements) into blocks of ``block`` consecutive
elements (the last block of a row may be shorter) and stores each block as
int8 values and one fp32 scale::

    scale = max(|x_i| over the block) / 127            (fp32)
    q_i   = clamp(floor(x_i / scale + 1/2), -127, 127)  (0 where scale == 0)

``dequantize_int8(q, scales, block, dtype)`` returns ``q_i * scale`` in
``dtype``. Blocks never cross rows, so a buffer viewed as ``[ranks, n]``
quantizes each rank's part on its own (what a gather or an all-to-all
sends) and ``[ranks, n]`` gathered values dequantize row by row.

**Error bound.** In exact arithmetic ``|x_i - q_i * scale| <= scale / 2``
for every element (rounding to the nearest integer; ``|x_i / scale| <= 127``
so the clamp never binds). In fp32 the division and the product each round
once, relative error ``2^-24`` on values of magnitude ``<= 127 * scale``,
so the tested bound is ``|x_i - q_i * scale| <= scale * (1/2 + 2^-16)``
(``127 * 2 * 2^-24 < 2^-16``), with ``x_i`` read in fp32 (a bf16/fp16
input is exact in fp32). Dequantizing to bf16/fp16 adds that dtype's
rounding of the result.

Registered as ``zerograph::quantize_int8`` and ``zerograph::dequantize_int8``
(no autograd: they move weights and gradients, not differentiable values).
On CUDA (with Triton) they run the Triton kernels, elsewhere the pure-torch
references; both compute the same fp32 operations, so they agree exactly.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from zerograph.kernels._common import HAS_TRITON, as_rows, device_guard, require_triton, tl, triton, use_triton

__all__ = ["quantize_int8", "dequantize_int8", "quantize_int8_reference", "dequantize_int8_reference",
           "quantize_int8_triton", "dequantize_int8_triton", "num_blocks", "packed_bytes", "QMAX"]

QMAX = 127


def num_blocks(n: int, block: int) -> int:
    """Blocks (scales) of a row of ``n`` elements."""
    return math.ceil(n / block) if n else 0


def packed_bytes(n: int, block: int) -> int:
    """Bytes of one quantized row of ``n`` elements: int8 values and fp32 scales."""
    return n + 4 * num_blocks(n, block)


def _check(x: Tensor, block: int) -> None:
    if block < 1:
        raise ValueError(f"quantize_int8: block must be >= 1 element, got {block}")
    if not x.is_floating_point():
        raise TypeError(f"quantize_int8: x must be floating point, got {x.dtype}")


def _blocks_view(x: Tensor, block: int) -> tuple[Tensor, int]:
    """``x`` (fp32) as ``[rows, blocks, block]``, zero-padded at each row's end."""
    n = x.shape[-1] if x.dim() else 1
    rows = x.reshape(-1, n).float()
    nb = num_blocks(n, block)
    pad = nb * block - n
    if pad:
        rows = torch.nn.functional.pad(rows, (0, pad))
    return rows.reshape(rows.shape[0], nb, block), n


# --------------------------------------------------------------------------- references


def quantize_int8_reference(x: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """``(q, scales)``: int8 of ``x``'s shape and fp32 of shape ``[..., ceil(n / block)]``."""
    _check(x, block)
    blocks, n = _blocks_view(x, block)
    absmax = blocks.abs().amax(dim=-1, keepdim=True)
    scale = absmax / QMAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.floor(blocks / safe + 0.5).clamp_(-QMAX, QMAX)
    q = torch.where(scale > 0, q, torch.zeros_like(q))
    q = q.reshape(blocks.shape[0], -1)[:, :n].to(torch.int8)
    lead = x.shape[:-1] if x.dim() else ()
    return q.reshape(x.shape), scale.reshape(*lead, blocks.shape[1])


def dequantize_int8_reference(q: Tensor, scales: Tensor, block: int, dtype: torch.dtype) -> Tensor:
    """``q * scale`` per block, in ``dtype`` (``q`` may be a strided view)."""
    n = q.shape[-1]
    nb = num_blocks(n, block)
    rows = q.reshape(-1, n).float()
    s = scales.reshape(-1, nb).float().repeat_interleave(block, dim=-1)[:, :n]
    return (rows * s).to(dtype).reshape(q.shape)


# --------------------------------------------------------------------------- Triton kernels

if HAS_TRITON:

    @triton.jit
    def _quantize_kernel(X, Q, S, stride_x, n_cols, n_blocks, BLOCK: tl.constexpr, BLOCK_P2: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        b = tl.program_id(1)
        offs = tl.arange(0, BLOCK_P2)
        cols = b * BLOCK + offs
        mask = (offs < BLOCK) & (cols < n_cols)
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        absmax = tl.max(tl.abs(x), axis=0)
        scale = absmax / 127.0
        safe = tl.where(scale > 0, scale, 1.0)
        q = tl.floor(x / safe + 0.5)
        q = tl.minimum(tl.maximum(q, -127.0), 127.0)
        q = tl.where(scale > 0, q, 0.0)
        tl.store(Q + row * n_cols + cols, q.to(tl.int8), mask=mask)
        tl.store(S + row * n_blocks + b, scale)

    @triton.jit
    def _dequantize_kernel(Q, S, Y, stride_q, n_cols, n_blocks, BLOCK: tl.constexpr, BLOCK_P2: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        b = tl.program_id(1)
        offs = tl.arange(0, BLOCK_P2)
        cols = b * BLOCK + offs
        mask = (offs < BLOCK) & (cols < n_cols)
        q = tl.load(Q + row * stride_q + cols, mask=mask, other=0).to(tl.float32)
        scale = tl.load(S + row * n_blocks + b)
        tl.store(Y + row * n_cols + cols, (q * scale).to(Y.dtype.element_ty), mask=mask)


def _grid_settings(block: int) -> tuple[int, int]:
    p2 = triton.next_power_of_2(block)
    return p2, max(1, min(8, p2 // 256))


def quantize_int8_triton(x: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """Launch the quantize kernel (CUDA tensors, or CPU under ``TRITON_INTERPRET=1``)."""
    _check(x, block)
    require_triton(x)
    x2 = as_rows(x)
    n_rows, n = x2.shape
    nb = num_blocks(n, block)
    q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    lead = x.shape[:-1] if x.dim() else ()
    scales = torch.empty(*lead, nb, dtype=torch.float32, device=x.device)
    if q.numel():
        p2, warps = _grid_settings(block)
        with device_guard(x):
            _quantize_kernel[(n_rows, nb)](x2, q, scales, x2.stride(0), n, nb, BLOCK=block, BLOCK_P2=p2,
                                           num_warps=warps)
    return q, scales


def dequantize_int8_triton(q: Tensor, scales: Tensor, block: int, dtype: torch.dtype) -> Tensor:
    """Launch the dequantize kernel; returns a contiguous tensor of ``q``'s shape in ``dtype``."""
    require_triton(q, scales)
    q2 = as_rows(q)
    n_rows, n = q2.shape
    nb = num_blocks(n, block)
    s2 = scales.reshape(-1, nb).contiguous()
    y = torch.empty(q.shape, dtype=dtype, device=q.device)
    if y.numel():
        p2, warps = _grid_settings(block)
        with device_guard(q):
            _dequantize_kernel[(n_rows, nb)](q2, s2, y, q2.stride(0), n, nb, BLOCK=block, BLOCK_P2=p2,
                                             num_warps=warps)
    return y


# --------------------------------------------------------------------------- registration


@torch.library.custom_op("zerograph::quantize_int8", mutates_args=())
def _quantize_op(x: Tensor, block: int) -> tuple[Tensor, Tensor]:
    if use_triton(x):
        return quantize_int8_triton(x, block)
    q, s = quantize_int8_reference(x, block)
    return q.contiguous(), s.contiguous()


@_quantize_op.register_fake
def _(x: Tensor, block: int) -> tuple[Tensor, Tensor]:
    n = x.shape[-1] if x.dim() else 1
    lead = x.shape[:-1] if x.dim() else ()
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(*lead, num_blocks(n, block), dtype=torch.float32)


@torch.library.custom_op("zerograph::dequantize_int8", mutates_args=())
def _dequantize_op(q: Tensor, scales: Tensor, block: int, dtype: torch.dtype) -> Tensor:
    if use_triton(q, scales):
        return dequantize_int8_triton(q, scales, block, dtype)
    return dequantize_int8_reference(q, scales, block, dtype).contiguous()


@_dequantize_op.register_fake
def _(q: Tensor, scales: Tensor, block: int, dtype: torch.dtype) -> Tensor:
    return q.new_empty(q.shape, dtype=dtype)


QUANTIZE = torch.ops.zerograph.quantize_int8.default
DEQUANTIZE = torch.ops.zerograph.dequantize_int8.default


# --------------------------------------------------------------------------- public functions


def quantize_int8(x: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """``(q, scales)`` of ``x`` in blocks of ``block`` elements along its last dimension."""
    _check(x, block)
    return torch.ops.zerograph.quantize_int8(x, block)


def dequantize_int8(q: Tensor, scales: Tensor, block: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """``q * scale`` per block, in ``dtype``."""
    if q.dtype != torch.int8 or scales.dtype != torch.float32:
        raise TypeError(f"dequantize_int8: expected int8 values and fp32 scales, got {q.dtype} and {scales.dtype}")
    return torch.ops.zerograph.dequantize_int8(q, scales, block, dtype)
