"""RMSNorm (Hugging Face Llama semantics) as one fused op, forward and backward.

``rms_norm(x, weight, eps)`` computes, normalizing the last dimension::

    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)        # dtype: torch.promote_types(weight, x)

It is registered as ``zerograph::rms_norm`` with the backward
``zerograph::rms_norm_backward(grad, x, weight, eps) -> (grad_x, grad_weight)``,
so under Dynamo and AOTAutograd the forward and the backward are each one
graph node::

    rms_norm = torch.ops.zerograph.rms_norm.default(x, w, 1e-06)
    ...
    rms_norm_backward = torch.ops.zerograph.rms_norm_backward.default(tangent, x, w, 1e-06)

On CUDA (with Triton) both run Triton kernels; elsewhere, and for hidden
sizes above ``MAX_FUSED_SIZE``, the pure-torch references below. The forward
keeps only ``x`` and ``weight`` for the backward: the kernel recomputes the
per-row ``rstd`` from the row of ``x`` it loads anyway, so no fp32 copy of the
activations, no squares and no ``rstd`` vector are stored. The weight gradient
is reduced without atomics: each backward program sums its rows into a private
fp32 row of a ``(programs, hidden)`` buffer, which one ``sum(0)`` reduces, so
results are bitwise reproducible.

Gradients are computed in fp32 and rounded once to the input dtypes (eager
autograd on bf16 inputs rounds some intermediates to bf16 first). There is
no double backward.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import Tensor

from zerograph.kernels._common import HAS_TRITON, as_rows, device_guard, require_triton, tl, triton, use_triton

log = logging.getLogger(__name__)

__all__ = [
    "rms_norm",
    "rms_norm_reference",
    "rms_norm_backward_reference",
    "rms_norm_forward_triton",
    "rms_norm_backward_triton",
    "MAX_FUSED_SIZE",
]

# Rows longer than this are not held in one Triton block; they run the reference.
MAX_FUSED_SIZE = 65536


# --------------------------------------------------------------------------- reference


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Hugging Face ``LlamaRMSNorm.forward`` in pure torch (differentiable)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rms_norm_backward_reference(grad: Tensor, x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Closed-form gradients of :func:`rms_norm_reference` in fp32.

    With ``n = x * rstd``: ``grad_x = rstd * (g - n * mean(g * n))`` where
    ``g = grad * weight``, and ``grad_weight = sum_rows(grad * n.to(x.dtype))``.
    """
    n_cols = x.shape[-1]
    xf = x.float().reshape(-1, n_cols)
    gy = grad.float().reshape(-1, n_cols)
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    n = xf * rstd
    grad_weight = (gy * n.to(x.dtype).float()).sum(0)
    g = gy * weight.float()
    grad_x = rstd * (g - n * (g * n).mean(-1, keepdim=True))
    return grad_x.to(x.dtype).reshape(x.shape), grad_weight.to(weight.dtype)


# --------------------------------------------------------------------------- launch settings


def row_block_settings(n_cols: int) -> tuple[int, int]:
    """``(BLOCK_N, num_warps)`` for a kernel that holds one row of ``n_cols`` in a block.

    About 16 elements per thread: the backward keeps ~6 fp32 row vectors live.
    Compiled for sm_90 that spills nothing (LayerNorm) or 8 bytes (RMSNorm) up
    to 8192 columns; from 16384 on a row outgrows one program's registers
    (32 warps at most) and the backward spills to local memory."""
    block = triton.next_power_of_2(n_cols)
    return block, min(32, max(4, block // 512))


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# Rows per backward program, at least: fewer would make the fp32 partial
# weight-gradient rows a large share of the traffic.
MIN_ROWS_PER_PROGRAM = 8


def reduction_programs(rows: int, device: torch.device, num_warps: int) -> int:
    """How many programs a row-looping backward launches (each writes one partial row).

    On CUDA up to about 32 warps' worth per SM, with at least
    ``MIN_ROWS_PER_PROGRAM`` rows each; under the interpreter a handful
    (enough to exercise the partial-sum reduction)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        target = min(_sm_count(index) * max(1, 32 // num_warps), triton.cdiv(rows, MIN_ROWS_PER_PROGRAM))
    else:
        target = 4
    return max(1, min(rows, target))


# --------------------------------------------------------------------------- Triton kernels

if HAS_TRITON:

    @triton.jit
    def _rms_norm_fwd_kernel(X, W, Y, stride_x, stride_y, n_cols, eps, BLOCK_N: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_N)
        mask = cols < n_cols
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        # HF rounds the normalized row to x's dtype before the weight multiply.
        n = (x * rstd).to(X.dtype.element_ty).to(tl.float32)
        tl.store(Y + row * stride_y + cols, (w * n).to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _rms_norm_bwd_kernel(
        DY, X, W, DX, DW_PARTIAL,
        stride_dy, stride_x, stride_dx,
        n_rows, n_cols, eps, rows_per_program,
        BLOCK_N: tl.constexpr,
    ):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_N)
        mask = cols < n_cols
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
        row_start = pid.to(tl.int64) * rows_per_program
        row_end = tl.minimum(row_start + rows_per_program, n_rows)
        for row in range(row_start, row_end):
            x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
            n = x * rstd
            dw += dy * n.to(X.dtype.element_ty).to(tl.float32)
            g = dy * w
            dx = rstd * (g - n * (tl.sum(g * n, axis=0) / n_cols))
            tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        tl.store(DW_PARTIAL + pid.to(tl.int64) * n_cols + cols, dw, mask=mask)


def _out_dtype(x: Tensor, weight: Tensor) -> torch.dtype:
    return torch.promote_types(weight.dtype, x.dtype)


def rms_norm_forward_triton(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Launch the forward kernel (CUDA tensors, or CPU under ``TRITON_INTERPRET=1``)."""
    require_triton(x, weight)
    n_cols = x.shape[-1]
    x2 = as_rows(x, n_cols)
    w = weight.contiguous()
    y = torch.empty((x2.shape[0], n_cols), dtype=_out_dtype(x, weight), device=x.device)
    if y.numel():
        block, warps = row_block_settings(n_cols)
        with device_guard(x):
            _rms_norm_fwd_kernel[(x2.shape[0],)](
                x2, w, y, x2.stride(0), y.stride(0), n_cols, eps, BLOCK_N=block, num_warps=warps
            )
    return y.view(x.shape)


def rms_norm_backward_triton(grad: Tensor, x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Launch the backward kernel; returns ``(grad_x, grad_weight)``."""
    require_triton(grad, x, weight)
    n_cols = x.shape[-1]
    x2 = as_rows(x, n_cols)
    dy = as_rows(grad, n_cols)
    w = weight.contiguous()
    n_rows = x2.shape[0]
    dx = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    if dx.numel() == 0:
        return dx.view(x.shape), torch.zeros_like(weight)
    block, warps = row_block_settings(n_cols)
    programs = reduction_programs(n_rows, x.device, warps)
    rows_per_program = triton.cdiv(n_rows, programs)
    programs = triton.cdiv(n_rows, rows_per_program)
    partial = torch.empty((programs, n_cols), dtype=torch.float32, device=x.device)
    with device_guard(x):
        _rms_norm_bwd_kernel[(programs,)](
            dy, x2, w, dx, partial,
            dy.stride(0), x2.stride(0), dx.stride(0),
            n_rows, n_cols, eps, rows_per_program,
            BLOCK_N=block, num_warps=warps,
        )
    return dx.view(x.shape), partial.sum(0).to(weight.dtype)


def _fused(*tensors: Tensor) -> bool:
    return use_triton(*tensors) and tensors[0].shape[-1] <= MAX_FUSED_SIZE


# --------------------------------------------------------------------------- registration


@torch.library.custom_op("zerograph::rms_norm", mutates_args=())
def _rms_norm_op(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    if _fused(x, weight):
        return rms_norm_forward_triton(x, weight, eps)
    return rms_norm_reference(x, weight, eps).contiguous()


@_rms_norm_op.register_fake
def _(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return x.new_empty(x.shape, dtype=_out_dtype(x, weight))


@torch.library.custom_op("zerograph::rms_norm_backward", mutates_args=())
def _rms_norm_backward_op(grad: Tensor, x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    if _fused(x, grad, weight):
        return rms_norm_backward_triton(grad, x, weight, eps)
    grad_x, grad_weight = rms_norm_backward_reference(grad, x, weight, eps)
    return grad_x.contiguous(), grad_weight


@_rms_norm_backward_op.register_fake
def _(grad: Tensor, x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, eps = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps = eps


def _backward(ctx, grad: Tensor):
    x, weight = ctx.saved_tensors
    grad_x, grad_weight = torch.ops.zerograph.rms_norm_backward(grad, x, weight, ctx.eps)
    return (
        grad_x if ctx.needs_input_grad[0] else None,
        grad_weight if ctx.needs_input_grad[1] else None,
        None,
    )


_rms_norm_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public function


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Hugging Face Llama RMSNorm over the last dimension of ``x``, fused.

    ``x``: any shape ``(..., hidden)``, floating point. ``weight``: ``(hidden,)``.
    Returns ``weight * (x.float() * rstd).to(x.dtype)`` in the promoted dtype of
    ``weight`` and ``x``. Differentiable in ``x`` and ``weight``."""
    if x.dim() == 0:
        raise ValueError("rms_norm: x must have at least one dimension (the normalized one)")
    if weight.shape != (x.shape[-1],):
        raise ValueError(
            f"rms_norm: weight must have shape ({x.shape[-1]},) to match x's last dimension, "
            f"got {tuple(weight.shape)}"
        )
    if not (x.is_floating_point() and weight.is_floating_point()):
        raise TypeError(f"rms_norm: x and weight must be floating point, got {x.dtype} and {weight.dtype}")
    return torch.ops.zerograph.rms_norm(x, weight, float(eps))
