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

**Segments.** Both ops take an optional ``segments`` (lengths summing to
``n``): blocks then restart at each segment of every row, and a segment's
last block may be short, so a row has ``sum(ceil(n_i / block))`` scales
(:func:`num_blocks`). A bucketed collective passes its parameters' shard
lengths, so no block spans two parameters and each parameter's error stays
within its own blocks' bound. ``None`` (or one segment) is the plain layout.

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
On CUDA (with Triton) they run the Triton kernels (one program per block of
a row; with segments each block's first column comes from a small table of
:func:`block_starts`), elsewhere the pure-torch references; both compute the
same fp32 operations with correctly rounded division (``tl.math.div_rn``),
so they agree exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from zerograph.kernels._common import HAS_TRITON, as_rows, device_guard, require_triton, tl, triton, use_triton

__all__ = ["quantize_int8", "dequantize_int8", "quantize_int8_reference", "dequantize_int8_reference",
           "quantize_int8_triton", "dequantize_int8_triton", "num_blocks", "packed_bytes", "block_starts", "QMAX"]

QMAX = 127


def num_blocks(n: int, block: int, segments: Sequence[int] | None = None) -> int:
    """Blocks (scales) of a row of ``n`` elements: ``ceil(n / block)``, or with
    ``segments`` (lengths summing to ``n``) ``sum(ceil(n_i / block))``."""
    if segments is not None:
        return sum(math.ceil(m / block) for m in segments)
    return math.ceil(n / block) if n else 0


def packed_bytes(n: int, block: int, segments: Sequence[int] | None = None) -> int:
    """Bytes of one quantized row of ``n`` elements: int8 values and fp32 scales."""
    return n + 4 * num_blocks(n, block, segments)


def check_segments(name: str, n: int, segments: Sequence[int] | None) -> None:
    """``segments`` must be non-negative lengths summing to the row length ``n``."""
    if segments is not None and (sum(segments) != n or any(m < 0 for m in segments)):
        raise ValueError(f"{name}: segments {list(segments)} must be non-negative lengths summing to the row "
                         f"length {n}")


def block_starts(n: int, block: int, segments: Sequence[int] | None = None) -> list[int]:
    """The first column of every block of a row, then ``n``: block ``b`` holds
    columns ``[starts[b], starts[b + 1])``."""
    starts, offset = [], 0
    for m in (n,) if segments is None else segments:
        starts += range(offset, offset + m, block)
        offset += m
    return starts + [n]


def check_input(name: str, x: Tensor, block: int, segments: Sequence[int] | None = None) -> None:
    """What ``name`` (a quantize op) accepts: ``block`` >= 1, floating-point
    ``x``, ``segments`` summing to its rows' length."""
    if block < 1:
        raise ValueError(f"{name}: block must be >= 1 element, got {block}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: x must be floating point, got {x.dtype}")
    check_segments(name, x.shape[-1] if x.dim() else 1, segments)


def _check(x: Tensor, block: int, segments: Sequence[int] | None = None) -> None:
    check_input("quantize_int8", x, block, segments)


def padded_layout(n: int, block: int, segments: Sequence[int] | None, device) -> tuple[Tensor | slice, int]:
    """Where a row's ``n`` columns sit when every block is padded to ``block``
    (``[n]`` indices into ``nb * block``; without segments the first ``n``,
    a slice: no index list for the plain layout), and ``nb``."""
    if segments is None or len(segments) <= 1:
        return slice(0, n), num_blocks(n, block)
    starts = block_starts(n, block, segments)
    nb = len(starts) - 1
    lengths = torch.tensor([b - a for a, b in zip(starts[:-1], starts[1:])], dtype=torch.long)
    base = torch.arange(nb, dtype=torch.long) * block - torch.tensor(starts[:-1], dtype=torch.long)
    return (torch.arange(n, dtype=torch.long) + base.repeat_interleave(lengths)).to(device), nb


def blocks_view(x: Tensor, block: int, segments: Sequence[int] | None = None) -> tuple[Tensor, Tensor, int]:
    """``x`` (fp32) as ``[rows, blocks, block]`` (each block zero-padded at its
    end), the columns' positions in that padded row, and ``n``."""
    n = x.shape[-1] if x.dim() else 1
    rows = x.reshape(-1, n).float()
    where, nb = padded_layout(n, block, segments, x.device)
    padded = rows.new_zeros(rows.shape[0], nb * block)
    padded[:, where] = rows
    return padded.reshape(rows.shape[0], nb, block), where, n


# --------------------------------------------------------------------------- references


def quantize_codes(x: Tensor, block: int, qmax: int, segments: Sequence[int] | None = None
                   ) -> tuple[Tensor, Tensor]:
    """``[rows, n]`` fp32 codes in ``[-qmax, qmax]`` and ``[rows, nb]`` fp32
    scales (``absmax / qmax`` per block) of ``x``'s rows."""
    blocks, where, n = blocks_view(x, block, segments)
    scale = blocks.abs().amax(dim=-1, keepdim=True) / qmax
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.floor(blocks / safe + 0.5).clamp_(-qmax, qmax)
    q = torch.where(scale > 0, q, torch.zeros_like(q))
    return q.reshape(blocks.shape[0], -1)[:, where], scale.reshape(blocks.shape[:2])


def scale_per_column(scales: Tensor, block: int, n: int, segments: Sequence[int] | None = None) -> Tensor:
    """``[rows, n]``: each column's block scale, from ``[..., nb]`` scales."""
    where, nb = padded_layout(n, block, segments, scales.device)
    return scales.reshape(-1, nb).float().repeat_interleave(block, dim=-1)[:, where]


def quantize_int8_reference(x: Tensor, block: int, segments: Sequence[int] | None = None
                            ) -> tuple[Tensor, Tensor]:
    """``(q, scales)``: int8 of ``x``'s shape and fp32 of shape ``[..., nb]``."""
    _check(x, block, segments)
    q, scale = quantize_codes(x, block, QMAX, segments)
    lead = x.shape[:-1] if x.dim() else ()
    return q.to(torch.int8).reshape(x.shape), scale.reshape(*lead, scale.shape[-1])


def dequantize_int8_reference(q: Tensor, scales: Tensor, block: int, dtype: torch.dtype,
                              segments: Sequence[int] | None = None) -> Tensor:
    """``q * scale`` per block, in ``dtype`` (``q`` may be a strided view)."""
    n = q.shape[-1]
    rows = q.reshape(-1, n).float()
    return (rows * scale_per_column(scales, block, n, segments)).to(dtype).reshape(q.shape)


# --------------------------------------------------------------------------- Triton kernels

if HAS_TRITON:

    @triton.jit
    def _block_range(STARTS, b, n_cols, BLOCK: tl.constexpr, SEGMENTED: tl.constexpr):
        """Block ``b``'s columns ``[start, end)`` (``STARTS``: :func:`block_starts`)."""
        if SEGMENTED:
            start = tl.load(STARTS + b)
            end = tl.load(STARTS + b + 1)
        else:
            start = b.to(tl.int64) * BLOCK
            end = n_cols
        return start, end

    @triton.jit
    def _quantize_kernel(X, Q, S, STARTS, stride_x, n_cols, n_blocks, QMAX: tl.constexpr, BLOCK: tl.constexpr,
                         BLOCK_P2: tl.constexpr, SEGMENTED: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        b = tl.program_id(1)
        start, end = _block_range(STARTS, b, n_cols, BLOCK, SEGMENTED)
        offs = tl.arange(0, BLOCK_P2)
        cols = start + offs
        mask = (offs < BLOCK) & (cols < end)
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        scale = tl.math.div_rn(tl.max(tl.abs(x), axis=0), QMAX * 1.0)
        safe = tl.where(scale > 0, scale, 1.0)
        q = tl.floor(tl.math.div_rn(x, safe) + 0.5)
        q = tl.minimum(tl.maximum(q, -QMAX * 1.0), QMAX * 1.0)
        q = tl.where(scale > 0, q, 0.0)
        tl.store(Q + row * n_cols + cols, q.to(tl.int8), mask=mask)
        tl.store(S + row * n_blocks + b, scale)

    @triton.jit
    def _dequantize_kernel(Q, S, Y, STARTS, stride_q, n_cols, n_blocks, BLOCK: tl.constexpr, BLOCK_P2: tl.constexpr,
                           SEGMENTED: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        b = tl.program_id(1)
        start, end = _block_range(STARTS, b, n_cols, BLOCK, SEGMENTED)
        offs = tl.arange(0, BLOCK_P2)
        cols = start + offs
        mask = (offs < BLOCK) & (cols < end)
        q = tl.load(Q + row * stride_q + cols, mask=mask, other=0).to(tl.float32)
        scale = tl.load(S + row * n_blocks + b)
        tl.store(Y + row * n_cols + cols, (q * scale).to(Y.dtype.element_ty), mask=mask)


def _grid_settings(block: int) -> tuple[int, int]:
    p2 = triton.next_power_of_2(block)
    return p2, max(1, min(8, p2 // 256))


def _starts(n: int, block: int, segments: Sequence[int] | None, device) -> tuple[Tensor | None, int]:
    """The block starts on ``device`` (None without segments) and ``nb``."""
    if segments is None or len(segments) <= 1:
        return None, num_blocks(n, block)
    starts = block_starts(n, block, segments)
    return torch.tensor(starts, dtype=torch.int64, device=device), len(starts) - 1


def launch_quantize(x2: Tensor, q: Tensor, scales: Tensor, block: int, qmax: int,
                    segments: Sequence[int] | None) -> None:
    """Codes of ``x2`` (``[rows, n]``, unit column stride) into ``q`` (int8,
    contiguous ``[rows, n]``) and their scales into ``scales``; also the first
    step of ``zerograph::quantize_int4``."""
    n_rows, n = x2.shape
    starts, nb = _starts(n, block, segments, x2.device)
    if not x2.numel() or not nb:
        return
    p2, warps = _grid_settings(block)
    with device_guard(x2):
        _quantize_kernel[(n_rows, nb)](x2, q, scales, scales if starts is None else starts, x2.stride(0), n, nb,
                                       QMAX=qmax, BLOCK=block, BLOCK_P2=p2, SEGMENTED=starts is not None,
                                       num_warps=warps)


def launch_dequantize(q2: Tensor, scales: Tensor, y: Tensor, block: int, segments: Sequence[int] | None) -> None:
    """``y`` (contiguous ``[rows, n]``) = codes ``q2`` (unit column stride) times their block scales."""
    n_rows, n = q2.shape
    starts, nb = _starts(n, block, segments, q2.device)
    if not y.numel() or not nb:
        return
    s2 = scales.reshape(-1, nb).contiguous()
    p2, warps = _grid_settings(block)
    with device_guard(q2):
        _dequantize_kernel[(n_rows, nb)](q2, s2, y, s2 if starts is None else starts, q2.stride(0), n, nb,
                                         BLOCK=block, BLOCK_P2=p2, SEGMENTED=starts is not None, num_warps=warps)


def quantize_int8_triton(x: Tensor, block: int, segments: Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
    """Launch the quantize kernel (CUDA tensors, or CPU under ``TRITON_INTERPRET=1``)."""
    _check(x, block, segments)
    require_triton(x)
    x2 = as_rows(x)
    n = x2.shape[1]
    q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    lead = x.shape[:-1] if x.dim() else ()
    scales = torch.empty(*lead, num_blocks(n, block, segments), dtype=torch.float32, device=x.device)
    launch_quantize(x2, q, scales, block, QMAX, segments)
    return q, scales


def dequantize_int8_triton(q: Tensor, scales: Tensor, block: int, dtype: torch.dtype,
                           segments: Sequence[int] | None = None) -> Tensor:
    """Launch the dequantize kernel; returns a contiguous tensor of ``q``'s shape in ``dtype``."""
    require_triton(q, scales)
    y = torch.empty(q.shape, dtype=dtype, device=q.device)
    launch_dequantize(as_rows(q), scales, y, block, segments)
    return y


# --------------------------------------------------------------------------- registration


@torch.library.custom_op("zerograph::quantize_int8", mutates_args=())
def _quantize_op(x: Tensor, block: int, segments: Optional[Sequence[int]] = None) -> tuple[Tensor, Tensor]:
    if use_triton(x):
        return quantize_int8_triton(x, block, segments)
    q, s = quantize_int8_reference(x, block, segments)
    return q.contiguous(), s.contiguous()


@_quantize_op.register_fake
def _(x: Tensor, block: int, segments: Optional[Sequence[int]] = None) -> tuple[Tensor, Tensor]:
    n = x.shape[-1] if x.dim() else 1
    lead = x.shape[:-1] if x.dim() else ()
    return (x.new_empty(x.shape, dtype=torch.int8),
            x.new_empty(*lead, num_blocks(n, block, segments), dtype=torch.float32))


@torch.library.custom_op("zerograph::dequantize_int8", mutates_args=())
def _dequantize_op(q: Tensor, scales: Tensor, block: int, dtype: torch.dtype,
                   segments: Optional[Sequence[int]] = None) -> Tensor:
    if use_triton(q, scales):
        return dequantize_int8_triton(q, scales, block, dtype, segments)
    return dequantize_int8_reference(q, scales, block, dtype, segments).contiguous()


@_dequantize_op.register_fake
def _(q: Tensor, scales: Tensor, block: int, dtype: torch.dtype, segments: Optional[Sequence[int]] = None) -> Tensor:
    return q.new_empty(q.shape, dtype=dtype)


QUANTIZE = torch.ops.zerograph.quantize_int8.default
DEQUANTIZE = torch.ops.zerograph.dequantize_int8.default


# --------------------------------------------------------------------------- public functions


def quantize_int8(x: Tensor, block: int, segments: Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
    """``(q, scales)`` of ``x`` in blocks of ``block`` elements along its last
    dimension (restarting at each of ``segments``)."""
    _check(x, block, segments)
    return torch.ops.zerograph.quantize_int8(x, block, None if segments is None else list(segments))


def dequantize_int8(q: Tensor, scales: Tensor, block: int, dtype: torch.dtype = torch.float32,
                    segments: Sequence[int] | None = None) -> Tensor:
    """``q * scale`` per block, in ``dtype``."""
    if q.dtype != torch.int8 or scales.dtype != torch.float32:
        raise TypeError(f"dequantize_int8: expected int8 values and fp32 scales, got {q.dtype} and {scales.dtype}")
    check_segments("dequantize_int8", q.shape[-1], segments)
    return torch.ops.zerograph.dequantize_int8(q, scales, block, dtype, None if segments is None else list(segments))
