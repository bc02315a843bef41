"""The pure-PyTorch definition of :func:`zerograph.kernels.attention.attention`:
materialized fp32 attention (forward and closed-form backward), the CPU path of
the ops and the oracle of the Triton kernels' tests, plus the CPU dropout mask
drawn from ``(seed, offset)``."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["attention_backward_reference", "attention_reference"]


def _default_scale(q: Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


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
