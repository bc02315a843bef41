"""Flash attention (forward and backward) without a materialized score matrix.

``attention(q, k, v, causal=..., scale=..., key_padding_mask=..., dropout_p=...)``
computes ``softmax(q @ k^T * scale + mask) @ v`` for ``q: (B, Hq, Sq, D)`` and
``k, v: (B, Hkv, Sk, D)`` with ``Hq % Hkv == 0`` (GQA/MQA: query head ``h``
reads key/value head ``h // (Hq // Hkv)``, as ``repeat_interleave`` or SDPA's
``enable_gqa`` would, but nothing is repeated in memory). It is registered as
two ops, each one node under Dynamo and AOTAutograd::

    attention = torch.ops.zerograph.attention.default(q, k, v, kpm, causal, scale, p, rng)
    out, lse = attention[0], attention[1]
    ...
    attention_backward = torch.ops.zerograph.attention_backward.default(
        tangent, q, k, v, out, lse, kpm, causal, scale, p, rng)   # -> (dq, dk, dv)

Semantics (the reference :func:`attention_reference` is the definition):

* ``causal``: query ``i`` sees keys ``j <= i + (Sk - Sq)`` (bottom-right aligned,
  like flash-attn). With ``Sq == Sk`` that is the usual lower-triangular mask;
  with ``Sq > Sk`` the first ``Sq - Sk`` queries see nothing.
* ``key_padding_mask``: bool ``(B, Sk)``, ``True`` = attend.
* A query row that sees no key at all produces **0** (not nan), and its
  gradient is 0. (SDPA returns nan there; the reference zeroes those rows.)
* Dropout on the attention probabilities with keep-probability ``1 - p`` and
  rescaling by ``1 / (1 - p)``. The public function draws ``(seed, offset)``
  from torch's default generator of ``q``'s device (``torch.manual_seed``
  controls it) into a 2-element int64 ``rng`` tensor that the op keeps for the
  backward, which regenerates the identical keep-mask from
  ``(seed, offset, b, h, i, j)``. On CUDA the mask is Philox ``tl.rand`` at
  linear index ``offset + ((b*Hq + h)*Sq + i)*Sk + j``
  (:func:`attention_dropout_mask` materializes it for tests). On CPU the
  reference draws ``torch.rand`` from a ``torch.Generator`` seeded from
  ``(seed, offset)``: equally reproducible, a different random stream.

The forward saves the per-row logsumexp (fp32, natural log; ``+inf`` for rows
that see nothing). The backward is flash-attention-2: ``delta = rowsum(dO*O)``,
(a small kernel), then one kernel computing ``dK, dV`` per key block (looping over the query
heads of its group and over query blocks) and one computing ``dQ`` per query
block. No atomics: results are deterministic. Head dims up to 128 (64 and 128
natively; others padded to the next power of two with masked loads). Dtypes
fp16/bf16/fp32 (fp32 matmuls in full IEEE precision, not TF32); accumulation
is always fp32. Reading ``rng`` costs one host sync per call on CUDA when
``dropout_p > 0``. No double backward.

This module holds the public function, the forward kernel and launcher and
the ``zerograph::attention`` op with its autograd; the backward kernels and
op are in :mod:`~zerograph.kernels.attention_backward`, what both kernels
share in :mod:`~zerograph.kernels.attention_common`, the pure-PyTorch
definition in :mod:`~zerograph.kernels.attention_reference`. Every public
name stays importable from here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from zerograph.kernels._common import HAS_TRITON, device_guard, require_triton, tl, triton, use_triton
from zerograph.kernels.attention_backward import attention_backward_triton
from zerograph.kernels.attention_common import (
    _LOG2E,
    _common_args,
    _prec,
    _rng_ints,
    attention_dropout_mask,
)
from zerograph.kernels.attention_reference import (
    _cpu_dropout_mask,
    _default_scale,
    _reference_forward,
    attention_backward_reference,
    attention_reference,
)

if HAS_TRITON:
    from zerograph.kernels.attention_common import _FWD_CONFIGS, _TUNE_KEY, _keep, _valid

__all__ = [
    "attention",
    "attention_reference",
    "attention_dropout_mask",
    "attention_forward_triton",
    "attention_backward_triton",
    "attention_backward_reference",
]

_MAX_HEAD_DIM = 128


# --------------------------------------------------------------------------- forward Triton kernel

if HAS_TRITON:

    @triton.jit
    def _fwd_block(acc, l_i, m_i, q, k_base, v_base, KPM, b, bh, rows, start_n, offs_n, offs_d, d_ok,
                   sks, svs, Sq, Sk, diag, qk_scale, dropout_p, drop_scale, seed, offset,
                   MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr,
                   PREC: tl.constexpr):
        """One key block of the online softmax; MASKED=False for blocks every row sees fully."""
        cols = start_n + offs_n
        n_ok = cols < Sk
        if MASKED:
            kt = tl.load(k_base + cols[None, :] * sks + offs_d[:, None], mask=n_ok[None, :] & d_ok[:, None], other=0.0)
            v = tl.load(v_base + cols[:, None] * svs + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        else:
            kt = tl.load(k_base + cols[None, :] * sks + offs_d[:, None], mask=d_ok[:, None], other=0.0)
            v = tl.load(v_base + cols[:, None] * svs + offs_d[None, :], mask=d_ok[None, :], other=0.0)
        s = tl.dot(q, kt, input_precision=PREC) * qk_scale
        if MASKED:
            kp_ok = n_ok
            if HAS_KPM:
                kp_ok = tl.load(KPM + b * Sk + cols, mask=n_ok, other=0) != 0
            s = tl.where(_valid(rows, cols, Sk, diag, kp_ok, CAUSAL, HAS_KPM), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if DROPOUT:
            keep = _keep(seed, offset, bh, Sq, Sk, rows, cols, dropout_p)
            p = tl.where(keep, p * drop_scale, 0.0)
        acc += tl.dot(p.to(v.dtype), v, input_precision=PREC)
        return acc, l_i, m_new

    @triton.autotune(configs=_FWD_CONFIGS, key=_TUNE_KEY)
    @triton.jit
    def _attn_fwd_kernel(
        Q, K, V, O, LSE, KPM,
        sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sob, soh, sos,
        Hq, GROUP, Sq, Sk, qk_scale, dropout_p, drop_scale, seed, offset,
        HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr, PREC: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // Hq).to(tl.int64)
        h = bh % Hq
        hk = (h // GROUP).to(tl.int64)
        h = h.to(tl.int64)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_D
        m_ok = rows < Sq
        q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqs + offs_d[None, :],
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        k_base = K + b * skb + hk * skh
        v_base = V + b * svb + hk * svh
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        diag = Sk - Sq
        hi = Sk
        if CAUSAL:
            hi = tl.maximum(tl.minimum(Sk, (pid_m + 1) * BLOCK_M + diag), 0)
        # key blocks [0, full) are in range and fully visible to every row of
        # this block: no mask work; [full, hi) are masked.
        full = (Sk // BLOCK_N) * BLOCK_N
        if CAUSAL:
            full = tl.minimum(full, tl.maximum(((pid_m * BLOCK_M + diag + 1) // BLOCK_N) * BLOCK_N, 0))
        if HAS_KPM:
            full = 0
        full = tl.minimum(full, hi)
        for start_n in range(0, full, BLOCK_N):
            acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, k_base, v_base, KPM, b, bh, rows, start_n, offs_n, offs_d,
                                       d_ok, sks, svs, Sq, Sk, diag, qk_scale, dropout_p, drop_scale, seed, offset,
                                       False, CAUSAL, HAS_KPM, DROPOUT, PREC)
        for start_n in range(full, hi, BLOCK_N):
            acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, k_base, v_base, KPM, b, bh, rows, start_n, offs_n, offs_d,
                                       d_ok, sks, svs, Sq, Sk, diag, qk_scale, dropout_p, drop_scale, seed, offset,
                                       True, CAUSAL, HAS_KPM, DROPOUT, PREC)
        empty = l_i == 0.0
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        tl.store(O + b * sob + h * soh + rows[:, None] * sos + offs_d[None, :], out.to(O.dtype.element_ty),
                 mask=m_ok[:, None] & d_ok[None, :])
        lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
        tl.store(LSE + bh.to(tl.int64) * Sq + rows, lse, mask=m_ok)


# --------------------------------------------------------------------------- launcher


def attention_forward_triton(q, k, v, key_padding_mask, causal: bool, scale: float, dropout_p: float = 0.0,
                             rng: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Launch the forward kernel; returns ``(out, lse)`` (lse fp32 ``(B, Hq, Sq)``)."""
    require_triton(q, k, v)
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    q, k, v, kpm = _common_args(q, k, v, key_padding_mask)
    out = torch.empty((B, Hq, Sq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, Sq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse.fill_(float("inf"))
    seed, offset = _rng_ints(rng)
    with device_guard(q):
        _attn_fwd_kernel[lambda meta: (triton.cdiv(Sq, meta["BLOCK_M"]), B * Hq)](
            q, k, v, out, lse, kpm,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            Hq, Hq // Hkv, Sq, Sk, scale * _LOG2E, dropout_p, 1.0 / (1.0 - dropout_p), seed, offset,
            HEAD_D=D, BLOCK_D=max(16, triton.next_power_of_2(D)),
            CAUSAL=causal, HAS_KPM=key_padding_mask is not None, DROPOUT=dropout_p > 0, PREC=_prec(q),
        )
    return out, lse


# --------------------------------------------------------------------------- registration


@torch.library.custom_op("zerograph::attention", mutates_args=())
def _attention_op(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, causal: bool,
                  scale: float, dropout_p: float, rng: Tensor | None) -> tuple[Tensor, Tensor]:
    if use_triton(q, k, v):
        return attention_forward_triton(q, k, v, key_padding_mask, causal, scale, dropout_p, rng)
    B, Hq, Sq, _ = q.shape
    mask = _cpu_dropout_mask(rng, (B, Hq, Sq, k.shape[2]), dropout_p, q.device) if dropout_p > 0 else None
    out, lse = _reference_forward(q, k, v, causal, scale, key_padding_mask, mask, dropout_p)
    return out.contiguous(), lse.contiguous()


@_attention_op.register_fake
def _(q, k, v, key_padding_mask, causal, scale, dropout_p, rng):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, key_padding_mask, causal, scale, dropout_p, rng = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, rng)
    ctx.causal, ctx.scale, ctx.dropout_p = causal, scale, dropout_p


def _backward(ctx, grad_out: Tensor, grad_lse: Tensor | None):
    q, k, v, out, lse, key_padding_mask, rng = ctx.saved_tensors
    dq, dk, dv = torch.ops.zerograph.attention_backward(
        grad_out, q, k, v, out, lse, key_padding_mask, ctx.causal, ctx.scale, ctx.dropout_p, rng
    )
    need = ctx.needs_input_grad
    return (dq if need[0] else None, dk if need[1] else None, dv if need[2] else None, None, None, None, None, None)


_attention_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public function


def _check(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, dropout_p: float) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"attention: q, k, v must be 4-D (batch, heads, seq, head_dim), got {q.dim()}-D, {k.dim()}-D, "
            f"{v.dim()}-D (for (batch, seq, heads, head_dim) inputs pass .transpose(1, 2))"
        )
    B, Hq, _, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(
            f"attention: k and v must be (B={B}, Hkv, Sk, D={D}) alike, got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if k.shape[1] == 0 or Hq % k.shape[1]:
        raise ValueError(f"attention: query heads ({Hq}) must be a multiple of key/value heads ({k.shape[1]})")
    if D > _MAX_HEAD_DIM:
        raise ValueError(
            f"attention: head_dim {D} > {_MAX_HEAD_DIM} is not supported; use F.scaled_dot_product_attention"
        )
    if not (q.dtype == k.dtype == v.dtype and q.is_floating_point()):
        raise TypeError(f"attention: q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    kpm = key_padding_mask
    if kpm is not None and (kpm.dtype != torch.bool or tuple(kpm.shape) != (B, k.shape[2])):
        raise ValueError(
            f"attention: key_padding_mask must be bool (B, Sk) = ({B}, {k.shape[2]}) with True = attend, "
            f"got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
        )
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"attention: dropout_p must be in [0, 1), got {dropout_p}")


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    key_padding_mask: Tensor | None = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """Flash attention: ``softmax(q @ k^T * scale + mask) @ v``, ``(B, Hq, Sq, D)`` in q's dtype.

    ``q: (B, Hq, Sq, D)``, ``k, v: (B, Hkv, Sk, D)``, ``Hq % Hkv == 0``;
    ``scale`` defaults to ``1/sqrt(D)``; ``causal`` is bottom-right aligned
    (query ``i`` sees keys ``j <= i + Sk - Sq``); ``key_padding_mask`` is bool
    ``(B, Sk)`` with ``True`` = attend; rows seeing no key give 0. Pass
    ``dropout_p=0`` in eval mode. See the module docstring for the randomness."""
    _check(q, k, v, key_padding_mask, dropout_p)
    rng = None
    if dropout_p > 0:
        rng = torch.randint(0, 2**31 - 1, (2,), device=q.device, dtype=torch.int64)
    out, _ = torch.ops.zerograph.attention(q, k, v, key_padding_mask, bool(causal), _default_scale(q, scale),
                                           float(dropout_p), rng)
    return out
