"""Rotary position embedding (Hugging Face ``apply_rotary_pos_emb``) as one fused op.

``apply_rotary(q, k, cos, sin, unsqueeze_dim=1)`` computes, like Hugging Face::

    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    q_embed = q * cos + rotate_half(q) * sin      # rotate_half(x) = cat(-x2, x1)
    k_embed = k * cos + rotate_half(k) * sin

for ``q (B, Hq, S, D)``, ``k (B, Hkv, S, D)`` and ``cos``/``sin`` ``(B or 1, S, D)``
with ``unsqueeze_dim=1`` (or ``q (B, S, Hq, D)`` etc. with ``unsqueeze_dim=2``).
The results have the promoted dtype of ``q`` (resp. ``k``), ``cos`` and ``sin``
and the memory layout of ``q`` (resp. ``k``): a transposed ``(B, S, H, D)``
projection stays in that layout, with no copy.

Registered as ``zerograph::rotary`` with the backward
``zerograph::rotary_backward(grad_q, grad_k, cos, sin, unsqueeze_dim, q_dtype, k_dtype)``,
each one graph node under Dynamo and AOTAutograd::

    rotary = torch.ops.zerograph.rotary.default(q, k, cos, sin, 1)
    ...
    rotary_backward = torch.ops.zerograph.rotary_backward.default(tangent_1, tangent_2, cos, sin, 1, torch.float32, torch.float32)

One Triton program per ``(batch, position)`` loads that position's ``cos``/``sin``
row once and rotates every head of ``q`` and ``k``; the backward is the same
kernel with the transposed rotation (``dq = dy*cos - rotate_half(dy*sin)``).
Only ``cos`` and ``sin`` are saved for the backward, not ``q`` or ``k``.

``cos`` and ``sin`` are treated as constants (no gradient), as they are in
every model: when either requires grad, or for shapes outside the ones above,
``apply_rotary`` runs the pure-torch reference, which autograd differentiates
in full. Computation is in fp32, rounded once to the output dtype (eager
bf16 rounds the two products and the sum separately). No double backward.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from zerograph.kernels._common import HAS_TRITON, device_guard, require_triton, tl, triton, use_triton

log = logging.getLogger(__name__)

__all__ = [
    "apply_rotary",
    "rotate_half",
    "apply_rotary_reference",
    "rotary_backward_reference",
    "rotary_triton",
]


# --------------------------------------------------------------------------- reference


def rotate_half(x: Tensor) -> Tensor:
    """``cat(-x2, x1)`` of the two halves of the last dimension (Hugging Face)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_reference(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1):
    """Hugging Face ``apply_rotary_pos_emb`` in pure torch (differentiable, also in cos/sin)."""
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def rotary_backward_reference(
    grad_q: Tensor, grad_k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int,
    q_dtype: torch.dtype, k_dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`apply_rotary_reference` for ``q`` and ``k``, in fp32:
    the transposed rotation ``dx = dy * cos - rotate_half(dy * sin)``."""
    c = cos.unsqueeze(unsqueeze_dim).float()
    s = sin.unsqueeze(unsqueeze_dim).float()

    def back(g: Tensor) -> Tensor:
        g = g.float()
        return g * c - rotate_half(g * s)

    return back(grad_q).to(q_dtype), back(grad_k).to(k_dtype)


# --------------------------------------------------------------------------- Triton kernel

if HAS_TRITON:

    @triton.jit
    def _rotate_heads(
        X, O, x_off, o_off, stride_xh, stride_oh, n_heads, half,
        c1, c2, t1, t2, d, d_mask, BLOCK_H: tl.constexpr,
    ):
        # out1 = x1 * c1 + x2 * t1, out2 = x2 * c2 + x1 * t2 for every head.
        for h0 in range(0, n_heads, BLOCK_H):
            h = h0 + tl.arange(0, BLOCK_H)
            mask = (h[:, None] < n_heads) & d_mask[None, :]
            xp = X + x_off + h[:, None].to(tl.int64) * stride_xh + d[None, :]
            op = O + o_off + h[:, None].to(tl.int64) * stride_oh + d[None, :]
            x1 = tl.load(xp, mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(xp + half, mask=mask, other=0.0).to(tl.float32)
            o1 = x1 * c1[None, :] + x2 * t1[None, :]
            o2 = x2 * c2[None, :] + x1 * t2[None, :]
            tl.store(op, o1.to(O.dtype.element_ty), mask=mask)
            tl.store(op + half, o2.to(O.dtype.element_ty), mask=mask)

    @triton.jit
    def _rotary_kernel(
        Q, K, COS, SIN, QO, KO,
        q_sb, q_ss, q_sh, k_sb, k_ss, k_sh,
        qo_sb, qo_ss, qo_sh, ko_sb, ko_ss, ko_sh,
        c_sb, c_ss, s_sb, s_ss,
        seq_len, n_q_heads, n_k_heads, half,
        BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        b = pid // seq_len
        s = pid % seq_len
        d = tl.arange(0, BLOCK_D)
        d_mask = d < half
        cp = COS + b * c_sb + s * c_ss + d
        sp = SIN + b * s_sb + s * s_ss + d
        c1 = tl.load(cp, mask=d_mask, other=0.0).to(tl.float32)
        c2 = tl.load(cp + half, mask=d_mask, other=0.0).to(tl.float32)
        s1 = tl.load(sp, mask=d_mask, other=0.0).to(tl.float32)
        s2 = tl.load(sp + half, mask=d_mask, other=0.0).to(tl.float32)
        if BACKWARD:  # transpose: dx1 = dy1*c1 + dy2*s2, dx2 = dy2*c2 - dy1*s1
            t1 = s2
            t2 = -s1
        else:  # x1*c1 - x2*s1, x2*c2 + x1*s2
            t1 = -s1
            t2 = s2
        _rotate_heads(Q, QO, b * q_sb + s * q_ss, b * qo_sb + s * qo_ss, q_sh, qo_sh, n_q_heads, half,
                      c1, c2, t1, t2, d, d_mask, BLOCK_H)
        _rotate_heads(K, KO, b * k_sb + s * k_ss, b * ko_sb + s * ko_ss, k_sh, ko_sh, n_k_heads, half,
                      c1, c2, t1, t2, d, d_mask, BLOCK_H)


def _bshd_strides(t: Tensor, unsqueeze_dim: int) -> tuple[int, int, int]:
    """Strides of ``t`` for (batch, seq, head): the head dim is ``unsqueeze_dim``."""
    if unsqueeze_dim == 1:  # (B, H, S, D)
        return t.stride(0), t.stride(2), t.stride(1)
    return t.stride(0), t.stride(1), t.stride(2)  # (B, S, H, D)


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def rotary_triton(
    q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1,
    *, backward: bool = False, out_dtypes: tuple[torch.dtype, torch.dtype] | None = None,
) -> tuple[Tensor, Tensor]:
    """Launch the rotary kernel (CUDA tensors, or CPU under ``TRITON_INTERPRET=1``).

    Forward: rotates ``q`` and ``k``. ``backward=True``: ``q``/``k`` are the
    incoming gradients and the transposed rotation is applied. Outputs are
    allocated like ``q``/``k`` in ``out_dtypes`` (default: the forward's
    promoted dtypes). Needs the supported layout (see :func:`apply_rotary`)."""
    require_triton(q, k, cos, sin)
    if not _fusable(q, k, cos, sin, unsqueeze_dim):
        raise ValueError(
            f"rotary_triton: unsupported shapes {_shapes(q, k, cos, sin)} for unsqueeze_dim={unsqueeze_dim}; "
            "apply_rotary runs the reference for these"
        )
    dim = unsqueeze_dim % 4
    if out_dtypes is None:
        out_dtypes = (_out_dtype(q, cos, sin), _out_dtype(k, cos, sin))
    q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
    q_out = torch.empty_like(q, dtype=out_dtypes[0])
    k_out = torch.empty_like(k, dtype=out_dtypes[1])
    batch, seq, head_dim = q.shape[0], cos.shape[1], q.shape[-1]
    n_q_heads, n_k_heads = q.shape[dim], k.shape[dim]
    cos = _last_dim_contiguous(cos).expand(batch, seq, head_dim)
    sin = _last_dim_contiguous(sin).expand(batch, seq, head_dim)
    if q.numel() == 0 and k.numel() == 0:
        return q_out, k_out
    half = head_dim // 2
    block_d = triton.next_power_of_2(half)
    block_h = max(1, min(triton.next_power_of_2(max(n_q_heads, n_k_heads)), 4096 // block_d))
    with device_guard(q):
        _rotary_kernel[(batch * seq,)](
            q, k, cos, sin, q_out, k_out,
            *_bshd_strides(q, dim), *_bshd_strides(k, dim),
            *_bshd_strides(q_out, dim), *_bshd_strides(k_out, dim),
            cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1),
            seq, n_q_heads, n_k_heads, half,
            BACKWARD=backward, BLOCK_H=block_h, BLOCK_D=block_d, num_warps=4,
        )
    return q_out, k_out


# --------------------------------------------------------------------------- dispatch helpers


def _out_dtype(x: Tensor, cos: Tensor, sin: Tensor) -> torch.dtype:
    return torch.promote_types(torch.promote_types(x.dtype, cos.dtype), sin.dtype)


def _shapes(*tensors: Tensor) -> list[tuple[int, ...]]:
    return [tuple(t.shape) for t in tensors]


def _fusable(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int) -> bool:
    """Whether the shapes are the layout the op supports (else the reference runs)."""
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or sin.shape != cos.shape:
        return False
    if not -4 <= unsqueeze_dim <= 3 or unsqueeze_dim % 4 not in (1, 2):
        return False
    seq_dim = 3 - unsqueeze_dim % 4  # the other of dims 1 and 2
    batch, seq, head_dim = q.shape[0], q.shape[seq_dim], q.shape[-1]
    return (
        head_dim % 2 == 0
        and k.shape[0] == batch and k.shape[seq_dim] == seq and k.shape[-1] == head_dim
        and cos.shape[0] in (1, batch) and cos.shape[1] == seq and cos.shape[2] == head_dim
        and all(t.is_floating_point() for t in (q, k, cos, sin))
    )


def _empty_like_layout(x: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.empty_like(_last_dim_contiguous(x), dtype=dtype)


# --------------------------------------------------------------------------- registration


@torch.library.custom_op("zerograph::rotary", mutates_args=())
def _rotary_op(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int) -> tuple[Tensor, Tensor]:
    if use_triton(q, k, cos, sin) and _fusable(q, k, cos, sin, unsqueeze_dim):
        return rotary_triton(q, k, cos, sin, unsqueeze_dim)
    q_ref, k_ref = apply_rotary_reference(q, k, cos, sin, unsqueeze_dim)
    return (
        _empty_like_layout(q, q_ref.dtype).copy_(q_ref),
        _empty_like_layout(k, k_ref.dtype).copy_(k_ref),
    )


@_rotary_op.register_fake
def _(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int) -> tuple[Tensor, Tensor]:
    return _empty_like_layout(q, _out_dtype(q, cos, sin)), _empty_like_layout(k, _out_dtype(k, cos, sin))


@torch.library.custom_op("zerograph::rotary_backward", mutates_args=())
def _rotary_backward_op(
    grad_q: Tensor, grad_k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int,
    q_dtype: torch.dtype, k_dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    if use_triton(grad_q, grad_k, cos, sin) and _fusable(grad_q, grad_k, cos, sin, unsqueeze_dim):
        return rotary_triton(grad_q, grad_k, cos, sin, unsqueeze_dim, backward=True, out_dtypes=(q_dtype, k_dtype))
    dq, dk = rotary_backward_reference(grad_q, grad_k, cos, sin, unsqueeze_dim, q_dtype, k_dtype)
    return _empty_like_layout(grad_q, q_dtype).copy_(dq), _empty_like_layout(grad_k, k_dtype).copy_(dk)


@_rotary_backward_op.register_fake
def _(grad_q, grad_k, cos, sin, unsqueeze_dim, q_dtype, k_dtype):
    return _empty_like_layout(grad_q, q_dtype), _empty_like_layout(grad_k, k_dtype)


def _setup_context(ctx, inputs, output) -> None:
    q, k, cos, sin, unsqueeze_dim = inputs
    ctx.save_for_backward(cos, sin)
    ctx.unsqueeze_dim = unsqueeze_dim
    ctx.dtypes = (q.dtype, k.dtype)


def _backward(ctx, grad_q: Tensor, grad_k: Tensor):
    cos, sin = ctx.saved_tensors
    dq, dk = torch.ops.zerograph.rotary_backward(grad_q, grad_k, cos, sin, ctx.unsqueeze_dim, *ctx.dtypes)
    needs = ctx.needs_input_grad
    return (dq if needs[0] else None, dk if needs[1] else None, None, None, None)


_rotary_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public function


def apply_rotary(
    q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1
) -> tuple[Tensor, Tensor]:
    """Hugging Face ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)``, fused.

    ``q (B, Hq, S, D)``, ``k (B, Hkv, S, D)``, ``cos``/``sin`` ``(B or 1, S, D)``
    with ``unsqueeze_dim=1``; with ``unsqueeze_dim=2`` heads and positions swap
    places in ``q`` and ``k``. Gradients flow to ``q`` and ``k`` only: ``cos`` and
    ``sin`` are constants of the fused op. If ``cos`` or ``sin`` requires grad
    (with grad mode on), or the shapes differ from the above, this runs the
    pure-torch reference instead, which autograd differentiates in full."""
    constants = not (torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad))
    if constants and _fusable(q, k, cos, sin, unsqueeze_dim):
        return torch.ops.zerograph.rotary(q, k, cos, sin, unsqueeze_dim % 4)
    log.debug("apply_rotary: reference path for shapes %s, unsqueeze_dim=%d", _shapes(q, k, cos, sin), unsqueeze_dim)
    return apply_rotary_reference(q, k, cos, sin, unsqueeze_dim)
