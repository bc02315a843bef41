"""What the attention forward (:mod:`zerograph.kernels.attention`) and backward
(:mod:`zerograph.kernels.attention_backward`) Triton kernels share: the autotune
configs and key, the dropout keep-mask and visibility (causal, key padding)
``@triton.jit`` helpers, the launchers' argument helpers, and
:func:`attention_dropout_mask`, which materializes the kernels' keep-mask."""

from __future__ import annotations


import torch
from torch import Tensor

from zerograph.kernels._common import HAS_TRITON, device_guard, interpreting, require_triton, tl, triton

__all__ = ["attention_dropout_mask"]

_LOG2E = 1.4426950408889634


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


def attention_dropout_mask(seed: int, offset: int, B: int, H: int, Sq: int, Sk: int, p: float, device) -> Tensor:
    """The bool keep-mask ``(B, H, Sq, Sk)`` the Triton kernels use for ``(seed, offset)``
    (same Philox formula, via a small kernel; CUDA, or CPU under ``TRITON_INTERPRET=1``)."""
    out = torch.empty((B, H, Sq, Sk), dtype=torch.int8, device=device)
    require_triton(out)
    if out.numel():
        bm, bn = (16, 16) if interpreting() else (64, 64)
        with device_guard(out):
            _dropout_mask_kernel[(triton.cdiv(Sq, bm), triton.cdiv(Sk, bn), B * H)](
                out, int(seed), int(offset), Sq, Sk, float(p), BLOCK_M=bm, BLOCK_N=bn
            )
    return out.bool()
