"""The attention backward (flash-attention-2): its Triton kernels (``delta =
rowsum(dO*O)``, then ``dK, dV`` per key block and ``dQ`` per query block; no
atomics, deterministic), their launcher :func:`attention_backward_triton`, and
the ``zerograph::attention_backward`` op that the forward op's autograd calls
(see :mod:`zerograph.kernels.attention` for the semantics)."""

from __future__ import annotations

import torch
from torch import Tensor

from zerograph.kernels._common import HAS_TRITON, device_guard, interpreting, require_triton, tl, triton, use_triton
from zerograph.kernels.attention_common import (
    _LOG2E,
    _common_args,
    _last_contig,
    _prec,
    _rng_ints,
)
from zerograph.kernels.attention_reference import _cpu_dropout_mask, attention_backward_reference

if HAS_TRITON:
    from zerograph.kernels.attention_common import _DKDV_CONFIGS, _DQ_CONFIGS, _TUNE_KEY, _keep, _valid

__all__ = ["attention_backward_triton"]


# --------------------------------------------------------------------------- Triton kernels

if HAS_TRITON:

    @triton.jit
    def _attn_bwd_delta_kernel(O, DO, DELTA, sob, soh, sos, sdb, sdh, sds, Hq, Sq,
                               HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        """delta[b, h, i] = sum_d dO * O in fp32 (the backward's preprocess)."""
        bh = tl.program_id(1)
        b = (bh // Hq).to(tl.int64)
        h = (bh % Hq).to(tl.int64)
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (rows < Sq)[:, None] & (offs_d < HEAD_D)[None, :]
        o = tl.load(O + b * sob + h * soh + rows[:, None] * sos + offs_d[None, :], mask=mask, other=0.0)
        do = tl.load(DO + b * sdb + h * sdh + rows[:, None] * sds + offs_d[None, :], mask=mask, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(DELTA + bh.to(tl.int64) * Sq + rows, delta, mask=rows < Sq)

    @triton.autotune(configs=_DKDV_CONFIGS, key=_TUNE_KEY)
    @triton.jit
    def _attn_bwd_dkdv_kernel(
        Q, K, V, DO, LSE, DELTA, KPM, DK, DV,
        sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sdb, sdh, sds,
        Hq, Hkv, GROUP, Sq, Sk, qk_scale, sm_scale, dropout_p, drop_scale, seed, offset,
        HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr, PREC: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        bhk = tl.program_id(1)
        b = (bhk // Hkv).to(tl.int64)
        hk = (bhk % Hkv).to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_D
        n_ok = cols < Sk
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(K + b * skb + hk * skh + cols[:, None] * sks + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + b * svb + hk * svh + cols[:, None] * svs + offs_d[None, :], mask=kv_mask, other=0.0)
        kp_ok = n_ok
        if HAS_KPM:
            kp_ok = tl.load(KPM + b * Sk + cols, mask=n_ok, other=0) != 0
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        diag = Sk - Sq
        lo = 0
        if CAUSAL:
            lo = tl.maximum(pid_n * BLOCK_N - diag, 0)
            lo = (lo // BLOCK_M) * BLOCK_M
        for g in range(0, GROUP):
            h = hk * GROUP + g
            bh = b * Hq + h
            q_base = Q + b * sqb + h * sqh
            do_base = DO + b * sdb + h * sdh
            for start_m in range(lo, Sq, BLOCK_M):
                rows = start_m + offs_m
                m_ok = rows < Sq
                qd_mask = m_ok[:, None] & d_ok[None, :]
                q = tl.load(q_base + rows[:, None] * sqs + offs_d[None, :], mask=qd_mask, other=0.0)
                do = tl.load(do_base + rows[:, None] * sds + offs_d[None, :], mask=qd_mask, other=0.0)
                lse = tl.load(LSE + bh * Sq + rows, mask=m_ok, other=float("inf")) * 1.4426950408889634
                delta = tl.load(DELTA + bh * Sq + rows, mask=m_ok, other=0.0)
                s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
                p = tl.math.exp2(s - lse[:, None])
                p = tl.where(_valid(rows, cols, Sk, diag, kp_ok, CAUSAL, HAS_KPM), p, 0.0)
                dp = tl.dot(do, tl.trans(v), input_precision=PREC)
                if DROPOUT:
                    keep = _keep(seed, offset, bh, Sq, Sk, rows, cols, dropout_p)
                    pd = tl.where(keep, p * drop_scale, 0.0)
                    dp = tl.where(keep, dp * drop_scale, 0.0)
                else:
                    pd = p
                dv += tl.dot(tl.trans(pd.to(do.dtype)), do, input_precision=PREC)
                ds = p * (dp - delta[:, None])
                dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
        dk = dk * sm_scale
        out_off = bhk.to(tl.int64) * Sk * HEAD_D + cols[:, None] * HEAD_D + offs_d[None, :]
        tl.store(DK + out_off, dk.to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=kv_mask)

    @triton.autotune(configs=_DQ_CONFIGS, key=_TUNE_KEY)
    @triton.jit
    def _attn_bwd_dq_kernel(
        Q, K, V, DO, LSE, DELTA, KPM, DQ,
        sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sdb, sdh, sds,
        Hq, GROUP, Sq, Sk, qk_scale, sm_scale, dropout_p, drop_scale, seed, offset,
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
        qd_mask = m_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqs + offs_d[None, :], mask=qd_mask, other=0.0)
        do = tl.load(DO + b * sdb + h * sdh + rows[:, None] * sds + offs_d[None, :], mask=qd_mask, other=0.0)
        lse = tl.load(LSE + bh.to(tl.int64) * Sq + rows, mask=m_ok, other=float("inf")) * 1.4426950408889634
        delta = tl.load(DELTA + bh.to(tl.int64) * Sq + rows, mask=m_ok, other=0.0)
        k_base = K + b * skb + hk * skh
        v_base = V + b * svb + hk * svh
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        diag = Sk - Sq
        hi = Sk
        if CAUSAL:
            hi = tl.maximum(tl.minimum(Sk, (pid_m + 1) * BLOCK_M + diag), 0)
        for start_n in range(0, hi, BLOCK_N):
            cols = start_n + offs_n
            n_ok = cols < Sk
            kv_mask = n_ok[:, None] & d_ok[None, :]
            k = tl.load(k_base + cols[:, None] * sks + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_base + cols[:, None] * svs + offs_d[None, :], mask=kv_mask, other=0.0)
            kp_ok = n_ok
            if HAS_KPM:
                kp_ok = tl.load(KPM + b * Sk + cols, mask=n_ok, other=0) != 0
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
            p = tl.math.exp2(s - lse[:, None])
            p = tl.where(_valid(rows, cols, Sk, diag, kp_ok, CAUSAL, HAS_KPM), p, 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PREC)
            if DROPOUT:
                keep = _keep(seed, offset, bh, Sq, Sk, rows, cols, dropout_p)
                dp = tl.where(keep, dp * drop_scale, 0.0)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
        dq = dq * sm_scale
        tl.store(DQ + bh.to(tl.int64) * Sq * HEAD_D + rows[:, None] * HEAD_D + offs_d[None, :],
                 dq.to(DQ.dtype.element_ty), mask=qd_mask)


# --------------------------------------------------------------------------- launcher


def attention_backward_triton(grad, q, k, v, out, lse, key_padding_mask, causal: bool, scale: float,
                              dropout_p: float = 0.0, rng: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Launch the backward kernels; returns contiguous ``(dq, dk, dv)``."""
    require_triton(grad, q, k, v, out, lse)
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    q, k, v, kpm = _common_args(q, k, v, key_padding_mask)
    grad = _last_contig(grad)
    dq = torch.empty((B, Hq, Sq, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, Hkv, Sk, D), dtype=k.dtype, device=k.device)
    dv = torch.empty((B, Hkv, Sk, D), dtype=v.dtype, device=v.device)
    if dq.numel() == 0 or dk.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    out = _last_contig(out)
    lse = lse.contiguous()
    delta = torch.empty((B, Hq, Sq), dtype=torch.float32, device=q.device)
    seed, offset = _rng_ints(rng)
    common = dict(
        HEAD_D=D, BLOCK_D=max(16, triton.next_power_of_2(D)), CAUSAL=causal,
        HAS_KPM=key_padding_mask is not None, DROPOUT=dropout_p > 0, PREC=_prec(q),
    )
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), grad.stride(0), grad.stride(1), grad.stride(2))
    tail = (scale * _LOG2E, scale, dropout_p, 1.0 / (1.0 - dropout_p), seed, offset)
    with device_guard(q):
        dm = 16 if interpreting() else 64
        _attn_bwd_delta_kernel[(triton.cdiv(Sq, dm), B * Hq)](
            out, grad, delta, out.stride(0), out.stride(1), out.stride(2), grad.stride(0), grad.stride(1),
            grad.stride(2), Hq, Sq, HEAD_D=D, BLOCK_M=dm, BLOCK_D=max(16, triton.next_power_of_2(D)),
        )
        _attn_bwd_dkdv_kernel[lambda meta: (triton.cdiv(Sk, meta["BLOCK_N"]), B * Hkv)](
            q, k, v, grad, lse, delta, kpm, dk, dv, *strides, Hq, Hkv, Hq // Hkv, Sq, Sk, *tail,
            **common,
        )
        _attn_bwd_dq_kernel[lambda meta: (triton.cdiv(Sq, meta["BLOCK_M"]), B * Hq)](
            q, k, v, grad, lse, delta, kpm, dq, *strides, Hq, Hq // Hkv, Sq, Sk, *tail,
            **common,
        )
    return dq, dk, dv


# --------------------------------------------------------------------------- registration


@torch.library.custom_op("zerograph::attention_backward", mutates_args=())
def _attention_backward_op(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                           key_padding_mask: Tensor | None, causal: bool, scale: float, dropout_p: float,
                           rng: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    if use_triton(grad, q, k, v):
        return attention_backward_triton(grad, q, k, v, out, lse, key_padding_mask, causal, scale, dropout_p, rng)
    B, Hq, Sq, _ = q.shape
    mask = _cpu_dropout_mask(rng, (B, Hq, Sq, k.shape[2]), dropout_p, q.device) if dropout_p > 0 else None
    dq, dk, dv = attention_backward_reference(grad, q, k, v, out, causal=causal, scale=scale,
                                              key_padding_mask=key_padding_mask, dropout_p=dropout_p,
                                              dropout_mask=mask)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@_attention_backward_op.register_fake
def _(grad, q, k, v, out, lse, key_padding_mask, causal, scale, dropout_p, rng):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)
