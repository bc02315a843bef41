"""GELU activation, exact (erf) or tanh-approximated, as one fused op.

``gelu(x, approximate)`` matches ``F.gelu(x, approximate=...)``:

* ``"none"``: ``0.5 * x * (1 + erf(x / sqrt(2)))``;
* ``"tanh"``: ``0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x**3)))``,
  which is GPT-2's ``NewGELUActivation`` / ``gelu_new`` (and nanoGPT's
  ``nn.GELU(approximate="tanh")``).

Registered as ``zerograph::gelu`` with the backward
``zerograph::gelu_backward(grad, x, approximate) -> grad_x``; under Dynamo and
AOTAutograd each is one graph node::

    gelu = torch.ops.zerograph.gelu.default(x, 'tanh')
    ...
    gelu_backward = torch.ops.zerograph.gelu_backward.default(tangent, x, 'tanh')

Only ``x`` is kept for the backward. The kernels compute in fp32 and round
once to ``x``'s dtype. The tanh form is evaluated as ``x * sigmoid(2 z)``
(``0.5 * (1 + tanh(z)) == sigmoid(2 z)``), which needs no ``tanh`` intrinsic
and saturates cleanly for large ``|x|``. On CUDA (with Triton) both directions
run Triton kernels; elsewhere the pure-torch references. No double backward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from zerograph.kernels._common import HAS_TRITON, as_rows, device_guard, require_triton, tl, triton, use_triton

__all__ = ["gelu", "gelu_reference", "gelu_backward_reference", "gelu_forward_triton", "gelu_backward_triton"]

APPROXIMATIONS = ("none", "tanh")
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_COEF = 0.044715


def _check_approximate(approximate: str) -> None:
    if approximate not in APPROXIMATIONS:
        raise ValueError(
            f"gelu: approximate must be 'none' (erf) or 'tanh' (GPT-2's gelu_new), got {approximate!r}"
        )


# --------------------------------------------------------------------------- reference


def gelu_reference(x: Tensor, approximate: str = "none") -> Tensor:
    """``F.gelu(x, approximate=approximate)`` (differentiable): the CPU path and the test oracle."""
    _check_approximate(approximate)
    return F.gelu(x, approximate=approximate)


def gelu_backward_reference(grad: Tensor, x: Tensor, approximate: str = "none") -> Tensor:
    """Closed-form gradient of :func:`gelu_reference`, computed in fp32.

    erf: ``Phi(x) + x * phi(x)``; tanh, with ``z = sqrt(2/pi) * (x + 0.044715 x^3)``
    and ``s = sigmoid(2 z)``: ``s + 2 x s (1 - s) sqrt(2/pi) (1 + 3 * 0.044715 x^2)``,
    with ``1 - s`` evaluated as ``sigmoid(-2 z)`` (no cancellation where ``s ~ 1``)."""
    _check_approximate(approximate)
    xf, dy = x.float(), grad.float()
    if approximate == "none":
        d = 0.5 * (1 + torch.erf(xf * _INV_SQRT_2)) + xf * _INV_SQRT_2PI * torch.exp(-0.5 * xf * xf)
    else:
        a = 2 * _SQRT_2_OVER_PI * (xf + _COEF * xf * xf * xf)
        s = torch.sigmoid(a)
        d = s + 2 * xf * s * torch.sigmoid(-a) * _SQRT_2_OVER_PI * (1 + 3 * _COEF * xf * xf)
    return (dy * d).to(x.dtype)


# --------------------------------------------------------------------------- Triton kernels

if HAS_TRITON:

    @triton.jit
    def _gelu_fwd_kernel(X, Y, stride_x, n_cols, TANH: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        if TANH:
            y = x * tl.sigmoid(2.0 * 0.7978845608028654 * (x + 0.044715 * x * x * x))
        else:
            y = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
        tl.store(Y + row * n_cols + cols, y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _gelu_bwd_kernel(DY, X, DX, stride_dy, stride_x, n_cols, TANH: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        if TANH:
            a = 2.0 * 0.7978845608028654 * (x + 0.044715 * x * x * x)
            s = tl.sigmoid(a)
            # 1 - s as sigmoid(-a): exact where s rounds to 1
            d = s + 2.0 * x * s * tl.sigmoid(-a) * 0.7978845608028654 * (1.0 + 0.134145 * x * x)
        else:
            cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
            d = cdf + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)
        tl.store(DX + row * n_cols + cols, (dy * d).to(DX.dtype.element_ty), mask=mask)


def _launch_settings(n_cols: int) -> tuple[int, int]:
    """``(BLOCK, num_warps)``: at most 8 elements per thread."""
    block = min(2048, triton.next_power_of_2(max(n_cols, 1)))
    return block, max(1, min(8, block // 256))


def gelu_forward_triton(x: Tensor, approximate: str = "none") -> Tensor:
    """Launch the forward kernel (CUDA tensors, or CPU under ``TRITON_INTERPRET=1``)."""
    _check_approximate(approximate)
    require_triton(x)
    x2 = as_rows(x)
    n_rows, n_cols = x2.shape
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if y.numel():
        block, warps = _launch_settings(n_cols)
        with device_guard(x):
            _gelu_fwd_kernel[(n_rows, triton.cdiv(n_cols, block))](
                x2, y, x2.stride(0), n_cols, TANH=approximate == "tanh", BLOCK=block, num_warps=warps
            )
    return y


def gelu_backward_triton(grad: Tensor, x: Tensor, approximate: str = "none") -> Tensor:
    """Launch the backward kernel; returns ``grad_x`` (contiguous, ``x``'s dtype)."""
    _check_approximate(approximate)
    require_triton(grad, x)
    dy2, x2 = as_rows(grad), as_rows(x)
    n_rows, n_cols = x2.shape
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if dx.numel():
        block, warps = _launch_settings(n_cols)
        with device_guard(x):
            _gelu_bwd_kernel[(n_rows, triton.cdiv(n_cols, block))](
                dy2, x2, dx, dy2.stride(0), x2.stride(0), n_cols,
                TANH=approximate == "tanh", BLOCK=block, num_warps=warps,
            )
    return dx


# --------------------------------------------------------------------------- registration


@torch.library.custom_op("zerograph::gelu", mutates_args=())
def _gelu_op(x: Tensor, approximate: str) -> Tensor:
    if use_triton(x):
        return gelu_forward_triton(x, approximate)
    return gelu_reference(x, approximate).contiguous()


@_gelu_op.register_fake
def _(x: Tensor, approximate: str) -> Tensor:
    return x.new_empty(x.shape)


@torch.library.custom_op("zerograph::gelu_backward", mutates_args=())
def _gelu_backward_op(grad: Tensor, x: Tensor, approximate: str) -> Tensor:
    if use_triton(grad, x):
        return gelu_backward_triton(grad, x, approximate)
    return gelu_backward_reference(grad, x, approximate).contiguous()


@_gelu_backward_op.register_fake
def _(grad: Tensor, x: Tensor, approximate: str) -> Tensor:
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output) -> None:
    x, approximate = inputs
    ctx.save_for_backward(x)
    ctx.approximate = approximate


def _backward(ctx, grad: Tensor):
    (x,) = ctx.saved_tensors
    return torch.ops.zerograph.gelu_backward(grad, x, ctx.approximate), None


_gelu_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public function


def gelu(x: Tensor, approximate: str = "none") -> Tensor:
    """``F.gelu(x, approximate=approximate)``, fused; ``approximate`` is ``"none"``
    (erf) or ``"tanh"`` (GPT-2's ``gelu_new``). Same shape and dtype as ``x``;
    differentiable."""
    _check_approximate(approximate)
    if not x.is_floating_point():
        raise TypeError(f"gelu: x must be floating point, got {x.dtype}")
    return torch.ops.zerograph.gelu(x, approximate)
