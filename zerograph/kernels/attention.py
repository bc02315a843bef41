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
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor

from zerograph.kernels._common import HAS_TRITON, interpreting, require_triton, tl, triton, use_triton

__all__ = [
    "attention",
    "attention_reference",
    "attention_dropout_mask",
    "attention_forward_triton",
    "attention_backward_triton",
    "attention_backward_reference",
]

_LOG2E = 1.4426950408889634
_MAX_HEAD_DIM = 128


# --------------------------------------------------------------------------- reference


def _visible(B: int, Sq: int, Sk: int, causal: bool, key_padding_mask: Tensor | None, device) -> Tensor:
    """Bool ``(B, 1, Sq, Sk)``: which keys each query sees."""
    vis = torch.ones(B, 1, Sq, Sk, dtype=torch.bool, device=device)
    if causal:
        i = torch.arange(Sq, device=device)[:, None]
        j = torch.arange(Sk, device=device)[None, :]
        vis = vis & (j <= i + (Sk - Sq))
    if key_padding_mask is not None:
        vis = vis & key_padding_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
    return vis


def _expand_kv(t: Tensor, hq: int) -> Tensor:
    return t if t.shape[1] == hq else t.repeat_interleave(hq // t.shape[1], dim=1)


def _reference_probs(q, k, scale, causal, key_padding_mask):
    """``(P, lse, visible)`` in fp32; empty rows have ``P = 0`` and ``lse = +inf``."""
    B, Hq, Sq, _ = q.shape
    Sk = k.shape[2]
    s = q.float() @ _expand_kv(k, Hq).float().transpose(-1, -2) * scale
    vis = _visible(B, Sq, Sk, causal, key_padding_mask, q.device)
    s = s.masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    empty = torch.isneginf(lse)
    lse = lse.masked_fill(empty, float("inf"))
    p = torch.exp(s - lse[..., None])  # exp(-inf) = 0 on empty rows
    return p, lse, vis


def _reference_forward(q, k, v, causal, scale, key_padding_mask, dropout_mask, dropout_p):
    p, lse, _ = _reference_probs(q, k, scale, causal, key_padding_mask)
    if dropout_mask is not None:
        p = p * dropout_mask.to(p.device) / (1.0 - dropout_p)
    out = p @ _expand_kv(v, q.shape[1]).float()
    return out.to(q.dtype), lse


def attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    key_padding_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_mask: Tensor | None = None,
) -> Tensor:
    """Materialized attention in fp32 (differentiable): the CPU path and the test oracle.

    ``dropout_mask``: bool keep-mask ``(B, Hq, Sq, Sk)`` (``None``: no dropout);
    kept probabilities are scaled by ``1 / (1 - dropout_p)``. Rows that see no
    key produce 0. Equals ``F.scaled_dot_product_attention`` with the
    corresponding boolean ``attn_mask`` on every row that sees a key."""
    scale = _default_scale(q, scale)
    return _reference_forward(q, k, v, causal, scale, key_padding_mask, dropout_mask, dropout_p)[0]


def attention_backward_reference(grad, q, k, v, out, *, causal, scale, key_padding_mask=None,
                                 dropout_p=0.0, dropout_mask=None):
    """Closed-form gradients ``(dq, dk, dv)`` of :func:`attention_reference`, in fp32."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    p, _, _ = _reference_probs(q, k, scale, causal, key_padding_mask)
    z = 1.0 if dropout_mask is None else dropout_mask.to(p.device).float() / (1.0 - dropout_p)
    do = grad.float()
    ke, ve = _expand_kv(k, Hq).float(), _expand_kv(v, Hq).float()
    dv = (p * z).transpose(-1, -2) @ do
    dp = (do @ ve.transpose(-1, -2)) * z
    delta = (dp * p).sum(-1, keepdim=True)  # == rowsum(dO * O)
    ds = p * (dp - delta)
    dq = ds @ ke * scale
    dk = ds.transpose(-1, -2) @ q.float() * scale
    g = Hq // Hkv
    dk = dk.view(B, Hkv, g, Sk, D).sum(2)
    dv = dv.view(B, Hkv, g, Sk, D).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _cpu_dropout_mask(rng: Tensor, shape, p: float, device) -> Tensor:
    seed, offset = (int(x) for x in rng.tolist())
    gen = torch.Generator(device="cpu").manual_seed((seed * 1_000_003 + offset) % (2**63))
    return (torch.rand(shape, generator=gen) >= p).to(device)


# --------------------------------------------------------------------------- Triton kernels

if HAS_TRITON:

    def _configs(pairs):
        """Autotune candidates ``(BLOCK_M, BLOCK_N, num_warps, num_stages)``; one small
        config under the interpreter. Configs that exceed shared memory are pruned by
        the autotuner (fp32 at D=128 needs the small ones)."""
        if interpreting():
            return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st) for m, n, w, st in pairs]

    # Tuned per (head dim, sequence lengths, mask/dropout flavour): training shapes repeat.
    _TUNE_KEY = ["HEAD_D", "Sq", "Sk", "CAUSAL", "HAS_KPM", "DROPOUT", "PREC"]
    # forward: BLOCK_M queries x BLOCK_N keys per step
    _FWD_CONFIGS = _configs([(128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2), (128, 32, 4, 3),
                             (64, 64, 4, 3), (64, 32, 4, 2)])
    # dK/dV: BLOCK_N keys per program, BLOCK_M queries per step
    _DKDV_CONFIGS = _configs([(32, 128, 8, 2), (64, 128, 8, 2), (32, 128, 4, 3), (64, 64, 4, 2),
                              (32, 64, 4, 2), (16, 64, 4, 1)])
    # dQ: BLOCK_M queries per program, BLOCK_N keys per step
    _DQ_CONFIGS = _configs([(128, 32, 8, 2), (128, 64, 8, 2), (128, 32, 4, 3), (64, 64, 4, 2),
                            (64, 32, 4, 2), (64, 16, 4, 1)])

    @triton.jit
    def _keep(seed, offset, bh, Sq, Sk, rows, cols, p):
        lin = offset + (bh.to(tl.int64) * Sq + rows[:, None].to(tl.int64)) * Sk + cols[None, :].to(tl.int64)
        return tl.rand(seed, lin) >= p

    @triton.jit
    def _dropout_mask_kernel(OUT, seed, offset, Sq, Sk, p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        bh = tl.program_id(2)
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        keep = _keep(seed, offset, bh, Sq, Sk, rows, cols, p)
        ptrs = OUT + (bh.to(tl.int64) * Sq + rows[:, None]) * Sk + cols[None, :]
        tl.store(ptrs, keep.to(tl.int8), mask=(rows[:, None] < Sq) & (cols[None, :] < Sk))

    @triton.jit
    def _valid(rows, cols, Sk, diag, kp_ok, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr):
        ok = (cols < Sk)[None, :] & (rows >= 0)[:, None]
        if CAUSAL:
            ok = ok & (cols[None, :] <= rows[:, None] + diag)
        if HAS_KPM:
            ok = ok & kp_ok[None, :]
        return ok

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


# --------------------------------------------------------------------------- launchers


def _device_guard(t: Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _last_contig(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _rng_ints(rng: Tensor | None) -> tuple[int, int]:
    if rng is None:
        return 0, 0
    seed, offset = (int(x) for x in rng.tolist())
    return seed, offset


def _prec(q: Tensor) -> str:
    return "ieee" if q.dtype == torch.float32 else "tf32"


def _common_args(q, k, v, key_padding_mask):
    q, k, v = _last_contig(q), _last_contig(k), _last_contig(v)
    kpm = (key_padding_mask.to(device=q.device, dtype=torch.int8).contiguous()
           if key_padding_mask is not None else torch.empty(1, dtype=torch.int8, device=q.device))
    return q, k, v, kpm


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
    with _device_guard(q):
        _attn_fwd_kernel[lambda meta: (triton.cdiv(Sq, meta["BLOCK_M"]), B * Hq)](
            q, k, v, out, lse, kpm,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            Hq, Hq // Hkv, Sq, Sk, scale * _LOG2E, dropout_p, 1.0 / (1.0 - dropout_p), seed, offset,
            HEAD_D=D, BLOCK_D=max(16, triton.next_power_of_2(D)),
            CAUSAL=causal, HAS_KPM=key_padding_mask is not None, DROPOUT=dropout_p > 0, PREC=_prec(q),
        )
    return out, lse


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
    with _device_guard(q):
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


def attention_dropout_mask(seed: int, offset: int, B: int, H: int, Sq: int, Sk: int, p: float, device) -> Tensor:
    """The bool keep-mask ``(B, H, Sq, Sk)`` the Triton kernels use for ``(seed, offset)``
    (same Philox formula, via a small kernel; CUDA, or CPU under ``TRITON_INTERPRET=1``)."""
    out = torch.empty((B, H, Sq, Sk), dtype=torch.int8, device=device)
    require_triton(out)
    if out.numel():
        bm, bn = (16, 16) if interpreting() else (64, 64)
        with _device_guard(out):
            _dropout_mask_kernel[(triton.cdiv(Sq, bm), triton.cdiv(Sk, bn), B * H)](
                out, int(seed), int(offset), Sq, Sk, float(p), BLOCK_M=bm, BLOCK_N=bn
            )
    return out.bool()


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


def _default_scale(q: Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


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
