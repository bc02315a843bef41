"""LayerNorm over the last dimension as one fused op, forward and backward.

``layer_norm(x, weight, bias, eps)`` equals
``F.layer_norm(x, (x.shape[-1],), weight, bias, eps)``: statistics and the
affine transform in fp32, the result in ``x.dtype``. ``weight`` and ``bias``
are optional and may be in another floating dtype than ``x``.

Registered as ``zerograph::layer_norm`` with the backward
``zerograph::layer_norm_backward(grad, x, weight, eps, bias_dtype) ->
(grad_x, grad_weight, grad_bias)``, each one graph node under Dynamo and
AOTAutograd::

    layer_norm = torch.ops.zerograph.layer_norm.default(x, w, b, 1e-05)
    ...
    layer_norm_backward = torch.ops.zerograph.layer_norm_backward.default(tangent, x, w, 1e-05, torch.float32)

(``grad_weight``/``grad_bias`` are empty when there is no weight/bias.) The
backward needs ``x`` and ``weight`` only: the kernel recomputes the row's
mean and ``rstd`` from the row it loads anyway, and the bias enters only
through its dtype, so a gathered bias is not kept alive for the backward.
Weight and bias gradients are reduced without atomics (per-program fp32
partial rows, then one ``sum(0)``), so results are reproducible.

On CUDA (with Triton) both directions run Triton kernels; elsewhere, and for
hidden sizes above ``MAX_FUSED_SIZE``, the pure-torch references below.
Gradients are computed in fp32 and rounded once. No double backward.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from zerograph.kernels._common import HAS_TRITON, as_rows, device_guard, require_triton, tl, triton, use_triton
from zerograph.kernels.rms_norm import MAX_FUSED_SIZE, reduction_programs, row_block_settings

log = logging.getLogger(__name__)

__all__ = [
    "layer_norm",
    "layer_norm_reference",
    "layer_norm_backward_reference",
    "layer_norm_forward_triton",
    "layer_norm_backward_triton",
]


# --------------------------------------------------------------------------- reference


def layer_norm_reference(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """``F.layer_norm`` over the last dimension, written out in fp32 (differentiable)."""
    xf = x.float()
    xc = xf - xf.mean(-1, keepdim=True)
    y = xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def layer_norm_backward_reference(
    grad: Tensor, x: Tensor, weight: Tensor | None, eps: float, bias_dtype: torch.dtype | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Closed-form gradients of :func:`layer_norm_reference` in fp32.

    With ``xhat = (x - mean) * rstd`` and ``g = grad * weight``:
    ``grad_x = rstd * (g - mean(g) - xhat * mean(g * xhat))``,
    ``grad_weight = sum_rows(grad * xhat)``, ``grad_bias = sum_rows(grad)``.
    """
    n_cols = x.shape[-1]
    xf = x.float().reshape(-1, n_cols)
    gy = grad.float().reshape(-1, n_cols)
    xc = xf - xf.mean(-1, keepdim=True)
    rstd = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
    xhat = xc * rstd
    g = gy * weight.float() if weight is not None else gy
    grad_x = rstd * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
    grad_weight = (gy * xhat).sum(0).to(weight.dtype) if weight is not None else x.new_empty(0)
    grad_bias = gy.sum(0).to(bias_dtype) if bias_dtype is not None else x.new_empty(0)
    return grad_x.to(x.dtype).reshape(x.shape), grad_weight, grad_bias


# --------------------------------------------------------------------------- Triton kernels

if HAS_TRITON:

    @triton.jit
    def _layer_norm_fwd_kernel(
        X, W, B, Y, stride_x, stride_y, n_cols, eps,
        HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_N)
        mask = cols < n_cols
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=0) / n_cols
        xc = tl.where(mask, x - mean, 0.0)
        rstd = tl.rsqrt(tl.sum(xc * xc, axis=0) / n_cols + eps)
        y = xc * rstd
        if HAS_W:
            y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_B:
            y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _layer_norm_bwd_kernel(
        DY, X, W, DX, DW_PARTIAL, DB_PARTIAL,
        stride_dy, stride_x, stride_dx,
        n_rows, n_cols, eps, rows_per_program,
        HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_N)
        mask = cols < n_cols
        if HAS_W:
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
        db = tl.zeros((BLOCK_N,), dtype=tl.float32)
        row_start = pid.to(tl.int64) * rows_per_program
        row_end = tl.minimum(row_start + rows_per_program, n_rows)
        for row in range(row_start, row_end):
            x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            mean = tl.sum(x, axis=0) / n_cols
            xc = tl.where(mask, x - mean, 0.0)
            rstd = tl.rsqrt(tl.sum(xc * xc, axis=0) / n_cols + eps)
            xhat = xc * rstd
            if HAS_W:
                g = dy * w
                dw += dy * xhat
            else:
                g = dy
            if HAS_B:
                db += dy
            g_mean = tl.sum(g, axis=0) / n_cols
            gx_mean = tl.sum(g * xhat, axis=0) / n_cols
            dx = rstd * (g - g_mean - xhat * gx_mean)
            tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_W:
            tl.store(DW_PARTIAL + pid.to(tl.int64) * n_cols + cols, dw, mask=mask)
        if HAS_B:
            tl.store(DB_PARTIAL + pid.to(tl.int64) * n_cols + cols, db, mask=mask)


def layer_norm_forward_triton(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """Launch the forward kernel (CUDA tensors, or CPU under ``TRITON_INTERPRET=1``)."""
    require_triton(x, weight, bias)
    n_cols = x.shape[-1]
    x2 = as_rows(x, n_cols)
    w = weight.contiguous() if weight is not None else x2
    b = bias.contiguous() if bias is not None else x2
    y = torch.empty((x2.shape[0], n_cols), dtype=x.dtype, device=x.device)
    if y.numel():
        block, warps = row_block_settings(n_cols)
        with device_guard(x):
            _layer_norm_fwd_kernel[(x2.shape[0],)](
                x2, w, b, y, x2.stride(0), y.stride(0), n_cols, eps,
                HAS_W=weight is not None, HAS_B=bias is not None, BLOCK_N=block, num_warps=warps,
            )
    return y.view(x.shape)


def layer_norm_backward_triton(
    grad: Tensor, x: Tensor, weight: Tensor | None, eps: float, bias_dtype: torch.dtype | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Launch the backward kernel; returns ``(grad_x, grad_weight, grad_bias)``."""
    require_triton(grad, x, weight)
    n_cols = x.shape[-1]
    x2 = as_rows(x, n_cols)
    dy = as_rows(grad, n_cols)
    has_w, has_b = weight is not None, bias_dtype is not None
    n_rows = x2.shape[0]
    dx = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    block, warps = row_block_settings(n_cols)
    programs = reduction_programs(n_rows, x.device, warps)
    rows_per_program = triton.cdiv(max(n_rows, 1), programs)
    programs = triton.cdiv(n_rows, rows_per_program)
    dw = torch.zeros((max(programs, 1), n_cols) if has_w else (0,), dtype=torch.float32, device=x.device)
    db = torch.zeros((max(programs, 1), n_cols) if has_b else (0,), dtype=torch.float32, device=x.device)
    if n_rows:
        with device_guard(x):
            _layer_norm_bwd_kernel[(programs,)](
                dy, x2, weight.contiguous() if has_w else x2, dx, dw if has_w else x2, db if has_b else x2,
                dy.stride(0), x2.stride(0), dx.stride(0),
                n_rows, n_cols, eps, rows_per_program,
                HAS_W=has_w, HAS_B=has_b, BLOCK_N=block, num_warps=warps,
            )
    grad_weight = dw.sum(0).to(weight.dtype) if has_w else x.new_empty(0)
    grad_bias = db.sum(0).to(bias_dtype) if has_b else x.new_empty(0)
    return dx.view(x.shape), grad_weight, grad_bias


def _fused(x: Tensor, *others: Tensor | None) -> bool:
    return use_triton(x, *others) and x.shape[-1] <= MAX_FUSED_SIZE


# --------------------------------------------------------------------------- registration


@torch.library.custom_op("zerograph::layer_norm", mutates_args=())
def _layer_norm_op(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    if _fused(x, weight, bias):
        return layer_norm_forward_triton(x, weight, bias, eps)
    return layer_norm_reference(x, weight, bias, eps).contiguous()


@_layer_norm_op.register_fake
def _(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    return x.new_empty(x.shape)


@torch.library.custom_op("zerograph::layer_norm_backward", mutates_args=())
def _layer_norm_backward_op(
    grad: Tensor, x: Tensor, weight: Tensor | None, eps: float, bias_dtype: torch.dtype | None
) -> tuple[Tensor, Tensor, Tensor]:
    if _fused(x, grad, weight):
        return layer_norm_backward_triton(grad, x, weight, eps, bias_dtype)
    grad_x, grad_weight, grad_bias = layer_norm_backward_reference(grad, x, weight, eps, bias_dtype)
    return grad_x.contiguous(), grad_weight, grad_bias


@_layer_norm_backward_op.register_fake
def _(grad: Tensor, x: Tensor, weight: Tensor | None, eps: float, bias_dtype: torch.dtype | None):
    n_cols = x.shape[-1]
    grad_weight = weight.new_empty(weight.shape) if weight is not None else x.new_empty(0)
    grad_bias = x.new_empty((n_cols,), dtype=bias_dtype) if bias_dtype is not None else x.new_empty(0)
    return x.new_empty(x.shape), grad_weight, grad_bias


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, eps = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps = eps
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _backward(ctx, grad: Tensor):
    x, weight = ctx.saved_tensors
    grad_x, grad_weight, grad_bias = torch.ops.zerograph.layer_norm_backward(grad, x, weight, ctx.eps, ctx.bias_dtype)
    needs = ctx.needs_input_grad
    return (
        grad_x if needs[0] else None,
        grad_weight if needs[1] else None,
        grad_bias if needs[2] else None,
        None,
    )


_layer_norm_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public function


def layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """``F.layer_norm(x, (x.shape[-1],), weight, bias, eps)``, fused.

    ``x``: ``(..., hidden)``, floating point; ``weight``/``bias``: ``(hidden,)`` or
    ``None``. Returns ``x.dtype``. Differentiable in ``x``, ``weight`` and ``bias``."""
    if x.dim() == 0:
        raise ValueError("layer_norm: x must have at least one dimension (the normalized one)")
    if not x.is_floating_point():
        raise TypeError(f"layer_norm: x must be floating point, got {x.dtype}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.shape != (x.shape[-1],):
            raise ValueError(
                f"layer_norm: {name} must have shape ({x.shape[-1]},) to match x's last dimension, "
                f"got {tuple(t.shape)}"
            )
        if not t.is_floating_point():
            raise TypeError(f"layer_norm: {name} must be floating point, got {t.dtype}")
    return torch.ops.zerograph.layer_norm(x, weight, bias, float(eps))
