"""SwiGLU activation (the Llama MLP's ``silu(gate) * up``) as one fused op.

``swiglu(gate, up)`` computes ``F.silu(gate) * up``; a Llama MLP is
``down_proj(swiglu(gate_proj(x), up_proj(x)))``. It is registered as
``zerograph::swiglu`` with the backward
``zerograph::swiglu_backward(grad, gate, up) -> (grad_gate, grad_up)``, so under
Dynamo and AOTAutograd each is one graph node::

    swiglu = torch.ops.zerograph.swiglu.default(gate, up)
    ...
    swiglu_backward = torch.ops.zerograph.swiglu_backward.default(tangent, gate, up)

Only ``gate`` and ``up`` are kept for the backward (eager autograd also keeps
``silu(gate)``): the backward kernel recomputes the sigmoid. With
``s = sigmoid(gate)``::

    grad_gate = grad * up * s * (1 + gate * (1 - s))
    grad_up   = grad * gate * s

On CUDA (with Triton) both run Triton kernels; elsewhere the pure-torch
references below. The kernels work in fp32 and round once to the output dtype
(eager bf16 rounds ``silu(gate)`` to bf16 before the multiply). ``gate`` and
``up`` may be strided views (e.g. the two halves of a fused ``gate_up``
projection): rows are read through their strides. No double backward.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor

from zerograph.kernels._common import HAS_TRITON, as_rows, device_guard, require_triton, tl, triton, use_triton

__all__ = ["swiglu", "swiglu_reference", "swiglu_backward_reference", "swiglu_forward_triton", "swiglu_backward_triton"]


# --------------------------------------------------------------------------- reference


def swiglu_reference(gate: Tensor, up: Tensor) -> Tensor:
    """``F.silu(gate) * up`` (differentiable): the CPU path and the test oracle."""
    return F.silu(gate) * up


def swiglu_backward_reference(grad: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    """Closed-form gradients of :func:`swiglu_reference`, computed in fp32."""
    g, u, dy = gate.float(), up.float(), grad.float()
    s = torch.sigmoid(g)
    grad_gate = dy * u * s * (1 + g * (1 - s))
    grad_up = dy * g * s
    return grad_gate.to(gate.dtype), grad_up.to(up.dtype)


# --------------------------------------------------------------------------- Triton kernels

if HAS_TRITON:

    @triton.jit
    def _swiglu_fwd_kernel(G, U, Y, stride_g, stride_u, n_cols, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
        y = g * tl.sigmoid(g) * u
        tl.store(Y + row * n_cols + cols, y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd_kernel(DY, G, U, DG, DU, stride_dy, stride_g, stride_u, n_cols, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
        s = tl.sigmoid(g)
        dg = dy * u * s * (1.0 + g * (1.0 - s))
        du = dy * g * s
        tl.store(DG + row * n_cols + cols, dg.to(DG.dtype.element_ty), mask=mask)
        tl.store(DU + row * n_cols + cols, du.to(DU.dtype.element_ty), mask=mask)


def _launch_settings(n_cols: int) -> tuple[int, int]:
    """``(BLOCK, num_warps)`` for the elementwise kernels: 8 elements per thread
    at most, so each program moves 16-byte vectors and enough bytes in flight."""
    block = min(2048, triton.next_power_of_2(max(n_cols, 1)))
    return block, max(1, min(8, block // 256))


def swiglu_forward_triton(gate: Tensor, up: Tensor) -> Tensor:
    """Launch the forward kernel (CUDA tensors, or CPU under ``TRITON_INTERPRET=1``)."""
    require_triton(gate, up)
    g2, u2 = as_rows(gate), as_rows(up)
    n_rows, n_cols = g2.shape
    y = torch.empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
    if y.numel():
        block, warps = _launch_settings(n_cols)
        with device_guard(gate):
            _swiglu_fwd_kernel[(n_rows, triton.cdiv(n_cols, block))](
                g2, u2, y, g2.stride(0), u2.stride(0), n_cols, BLOCK=block, num_warps=warps
            )
    return y


def swiglu_backward_triton(grad: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    """Launch the backward kernel; returns ``(grad_gate, grad_up)`` (contiguous)."""
    require_triton(grad, gate, up)
    dy2, g2, u2 = as_rows(grad), as_rows(gate), as_rows(up)
    n_rows, n_cols = g2.shape
    dg = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    du = torch.empty(up.shape, dtype=up.dtype, device=up.device)
    if dg.numel():
        block, warps = _launch_settings(n_cols)
        with device_guard(gate):
            _swiglu_bwd_kernel[(n_rows, triton.cdiv(n_cols, block))](
                dy2, g2, u2, dg, du, dy2.stride(0), g2.stride(0), u2.stride(0), n_cols,
                BLOCK=block, num_warps=warps,
            )
    return dg, du


# --------------------------------------------------------------------------- registration


@torch.library.custom_op("zerograph::swiglu", mutates_args=())
def _swiglu_op(gate: Tensor, up: Tensor) -> Tensor:
    if use_triton(gate, up):
        return swiglu_forward_triton(gate, up)
    return swiglu_reference(gate, up).contiguous()


@_swiglu_op.register_fake
def _(gate: Tensor, up: Tensor) -> Tensor:
    return gate.new_empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype))


@torch.library.custom_op("zerograph::swiglu_backward", mutates_args=())
def _swiglu_backward_op(grad: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    if use_triton(grad, gate, up):
        return swiglu_backward_triton(grad, gate, up)
    grad_gate, grad_up = swiglu_backward_reference(grad, gate, up)
    return grad_gate.contiguous(), grad_up.contiguous()


@_swiglu_backward_op.register_fake
def _(grad: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


def _setup_context(ctx, inputs, output) -> None:
    gate, up = inputs
    ctx.save_for_backward(gate, up)


def _backward(ctx, grad: Tensor):
    gate, up = ctx.saved_tensors
    grad_gate, grad_up = torch.ops.zerograph.swiglu_backward(grad, gate, up)
    return (grad_gate if ctx.needs_input_grad[0] else None, grad_up if ctx.needs_input_grad[1] else None)


_swiglu_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public function


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """``F.silu(gate) * up``, fused (Llama MLP: ``down(swiglu(gate_proj(x), up_proj(x)))``).

    ``gate`` and ``up``: the same shape, floating point. Returns a tensor of that
    shape in their promoted dtype. Differentiable in both."""
    if gate.shape != up.shape:
        raise ValueError(
            f"swiglu: gate and up must have the same shape, got {tuple(gate.shape)} and {tuple(up.shape)} "
            "(broadcasting is not supported: expand the smaller one first)"
        )
    if not (gate.is_floating_point() and up.is_floating_point()):
        raise TypeError(f"swiglu: gate and up must be floating point, got {gate.dtype} and {up.dtype}")
    if gate.device != up.device:
        raise ValueError(f"swiglu: gate and up must be on the same device, got {gate.device} and {up.device}")
    return torch.ops.zerograph.swiglu(gate, up)
