"""Rotary embedding: reference vs Hugging Face, the Triton kernel (interpreter
on CPU) vs reference forward and backward, registration, single-node tracing."""

from __future__ import annotations

import operator

import pytest
import torch

import zerograph
from tests.kernels._aot import compile_capturing
from zerograph.kernels import rotary as K

# fp32: one product pair and a sum per element; the kernel may fuse them into
# an FMA: an ulp or two of the terms' magnitude (|q|, |cos| ~ 1).
FP32 = dict(rtol=1e-5, atol=1e-6)
# bf16/fp16: eager rounds both products and the sum to the low dtype, the
# kernel rounds once from fp32 (the interpreter toward zero: one more ulp):
# a few ulps of bf16 (2**-7) / fp16 (2**-10) of terms of magnitude ~3.
LOW = {torch.bfloat16: dict(rtol=2**-6, atol=2**-5), torch.float16: dict(rtol=2**-9, atol=2**-8)}
# Where the Triton launchers run: the GPU, or the interpreter on CPU tensors.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _cos_sin(batch, seq, head_dim, dtype=torch.float32, generic=False, seed=1, device=DEVICE):
    """Llama-style cos/sin (halves repeated), or arbitrary values (``generic``)."""
    if generic:
        g = torch.Generator().manual_seed(seed)
        angles = torch.randn(batch, seq, head_dim, generator=g) * 3
    else:
        inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
        pos = torch.arange(seq).float()[None, :, None] + torch.arange(batch).float()[:, None, None]
        freqs = pos * inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos().to(device, dtype), angles.sin().to(device, dtype)


def _qk(batch, hq, hk, seq, head_dim, dtype=torch.float32, unsqueeze_dim=1, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    shape = (lambda h: (batch, h, seq, head_dim)) if unsqueeze_dim == 1 else (lambda h: (batch, seq, h, head_dim))
    return (torch.randn(shape(hq), generator=g).to(device, dtype),
            torch.randn(shape(hk), generator=g).to(device, dtype))


def _autograd_reference(q, k, cos, sin, unsqueeze_dim, gq, gk):
    q = q.detach().clone().requires_grad_()
    k = k.detach().clone().requires_grad_()
    oq, ok = K.apply_rotary_reference(q, k, cos, sin, unsqueeze_dim)
    dq, dk = torch.autograd.grad((oq, ok), (q, k), (gq, gk))
    return oq.detach(), ok.detach(), dq, dk


def test_reference_is_hugging_face_apply_rotary_pos_emb():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q, k = _qk(2, 4, 2, 7, 10, device="cpu")
    cos, sin = _cos_sin(2, 7, 10, generic=True, device="cpu")
    for dim, qq, kk in ((1, q, k), (2, q.transpose(1, 2), k.transpose(1, 2))):
        got = K.apply_rotary_reference(qq, kk, cos, sin, dim)
        want = apply_rotary_pos_emb(qq, kk, cos, sin, unsqueeze_dim=dim)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize(
    "batch,hq,hk,seq,head_dim,cos_batch",
    [(1, 1, 1, 1, 2, 1), (2, 3, 1, 5, 10, 2), (2, 5, 5, 3, 6, 1), (1, 6, 2, 9, 34, 1)],
)
def test_triton_fp32_matches_reference(batch, hq, hk, seq, head_dim, cos_batch):
    q, k = _qk(batch, hq, hk, seq, head_dim)
    cos, sin = _cos_sin(cos_batch, seq, head_dim, generic=True)
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    oq, ok, dq, dk = _autograd_reference(q, k, cos, sin, 1, gq, gk)
    tq, tk = K.rotary_triton(q, k, cos, sin, 1)
    torch.testing.assert_close(tq, oq, **FP32)
    torch.testing.assert_close(tk, ok, **FP32)
    tdq, tdk = K.rotary_triton(gq, gk, cos, sin, 1, backward=True, out_dtypes=(q.dtype, k.dtype))
    torch.testing.assert_close(tdq, dq, **FP32)
    torch.testing.assert_close(tdk, dk, **FP32)
    rq, rk = K.rotary_backward_reference(gq, gk, cos, sin, 1, q.dtype, k.dtype)
    torch.testing.assert_close(rq, dq, **FP32)
    torch.testing.assert_close(rk, dk, **FP32)


def test_triton_bshd_layout_and_transposed_views():
    """HF's q is ``proj(x).view(B, S, H, D).transpose(1, 2)``: the output keeps that layout."""
    batch, seq, hq, hk, head_dim = 2, 5, 3, 1, 12
    q_bshd, k_bshd = _qk(batch, hq, hk, seq, head_dim, unsqueeze_dim=2)
    cos, sin = _cos_sin(1, seq, head_dim)
    for dim, q, k in ((2, q_bshd, k_bshd), (1, q_bshd.transpose(1, 2), k_bshd.transpose(1, 2))):
        gq, gk = torch.randn_like(q), torch.randn_like(k)
        oq, ok, dq, dk = _autograd_reference(q, k, cos, sin, dim, gq, gk)
        tq, tk = K.rotary_triton(q, k, cos, sin, dim)
        assert tq.stride() == q.stride() and tk.stride() == k.stride()
        torch.testing.assert_close(tq, oq, **FP32)
        torch.testing.assert_close(tk, ok, **FP32)
        tdq, tdk = K.rotary_triton(gq, gk, cos, sin, dim, backward=True, out_dtypes=(q.dtype, k.dtype))
        torch.testing.assert_close(tdq, dq, **FP32)
        torch.testing.assert_close(tdk, dk, **FP32)


def test_triton_strided_head_dim_and_sliced_inputs():
    q_full, k_full = _qk(2, 4, 2, 5, 16)
    q = q_full[:, 1:3]  # a head slice: not dense
    k = k_full.transpose(-1, -2).contiguous().transpose(-1, -2)  # D not unit-stride
    cos, sin = _cos_sin(2, 5, 16, generic=True)
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    oq, ok, dq, dk = _autograd_reference(q, k, cos, sin, 1, gq, gk)
    tq, tk = K.rotary_triton(q, k, cos, sin, 1)
    torch.testing.assert_close(tq, oq, **FP32)
    torch.testing.assert_close(tk, ok, **FP32)


@pytest.mark.parametrize("dtype,cos_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                             (torch.bfloat16, torch.float32)])
def test_triton_low_precision(dtype, cos_dtype):
    q, k = _qk(2, 3, 1, 7, 18, dtype=dtype)
    cos, sin = _cos_sin(1, 7, 18, dtype=cos_dtype)
    out_dtype = torch.promote_types(dtype, cos_dtype)
    gq, gk = torch.randn_like(q, dtype=out_dtype), torch.randn_like(k, dtype=out_dtype)
    oq, ok, dq, dk = _autograd_reference(q, k, cos, sin, 1, gq, gk)
    tq, tk = K.rotary_triton(q, k, cos, sin, 1)
    assert tq.dtype == tk.dtype == out_dtype
    tol = LOW[dtype]
    torch.testing.assert_close(tq, oq, **tol)
    torch.testing.assert_close(tk, ok, **tol)
    tdq, tdk = K.rotary_triton(gq, gk, cos, sin, 1, backward=True, out_dtypes=(dtype, dtype))
    assert tdq.dtype == tdk.dtype == dtype
    torch.testing.assert_close(tdq, dq, **tol)
    torch.testing.assert_close(tdk, dk, **tol)


def test_public_function_cpu_autograd_gqa():
    q, k = _qk(2, 4, 2, 5, 8)
    cos, sin = _cos_sin(2, 5, 8)
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    oq, ok, dq, dk = _autograd_reference(q, k, cos, sin, 1, gq, gk)
    q.requires_grad_()
    k.requires_grad_()
    tq, tk = K.apply_rotary(q, k, cos, sin)
    torch.autograd.backward((tq, tk), (gq, gk))
    torch.testing.assert_close(tq, oq, **FP32)
    torch.testing.assert_close(tk, ok, **FP32)
    torch.testing.assert_close(q.grad, dq, **FP32)
    torch.testing.assert_close(k.grad, dk, **FP32)


def test_public_function_only_q_used():
    q, k = _qk(1, 2, 1, 3, 4)
    cos, sin = _cos_sin(1, 3, 4)
    q.requires_grad_()
    k.requires_grad_()
    tq, _ = K.apply_rotary(q, k, cos, sin)
    tq.sum().backward()
    _, _, dq, _ = _autograd_reference(q, k, cos, sin, 1, torch.ones_like(q), torch.zeros_like(k))
    torch.testing.assert_close(q.grad, dq, **FP32)
    assert torch.equal(k.grad, torch.zeros_like(k))


def test_cos_sin_requiring_grad_fall_back_to_reference():
    q, k = _qk(1, 2, 1, 3, 4)
    cos, sin = _cos_sin(1, 3, 4)
    cos.requires_grad_()
    oq, ok = K.apply_rotary(q, k, cos, sin)
    (oq.sum() + ok.sum()).backward()
    leaf = cos.detach().clone().requires_grad_()
    rq, rk = K.apply_rotary_reference(q, k, leaf, sin)
    (rq.sum() + rk.sum()).backward()
    torch.testing.assert_close(cos.grad, leaf.grad, **FP32)


def test_unsupported_layout_falls_back_to_reference():
    q, k = _qk(1, 2, 1, 3, 4)
    cos, sin = _cos_sin(1, 3, 4)
    # unsqueeze_dim=0 broadcasts (1, 1, 3, 4) over q's batch: HF allows it.
    got = K.apply_rotary(q, k, cos[0:1], sin[0:1], unsqueeze_dim=0)
    want = K.apply_rotary_reference(q, k, cos[0:1], sin[0:1], unsqueeze_dim=0)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not K._fusable(q, k, cos, sin, 0)
    assert K._fusable(q, k, cos, sin, -3) and K._fusable(q.transpose(1, 2), k.transpose(1, 2), cos, sin, 2)
    with pytest.raises(ValueError, match="unsupported shapes"):
        K.rotary_triton(q, k, cos, sin, 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dim", [1, 2])
def test_opcheck(dim, device):
    q, k = _qk(2, 3, 1, 5, 6, unsqueeze_dim=dim, device=device)
    cos, sin = _cos_sin(1, 5, 6, device=device)
    torch.library.opcheck(torch.ops.zerograph.rotary, (q.requires_grad_(), k.requires_grad_(), cos, sin, dim))
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    args = (gq, gk, cos, sin, dim, torch.float32, torch.float32)
    torch.library.opcheck(torch.ops.zerograph.rotary_backward, args)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_mixed_dtypes_and_layout(device):
    q, k = _qk(2, 3, 1, 5, 6, dtype=torch.bfloat16, unsqueeze_dim=2, device=device)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    cos, sin = _cos_sin(2, 5, 6, device=device)
    torch.library.opcheck(torch.ops.zerograph.rotary, (q.requires_grad_(), k.requires_grad_(), cos, sin, 1))


def _call_targets(gm):
    skip = (operator.getitem, torch.ops.aten.view.default)
    return [n.target for n in gm.graph.nodes if n.op == "call_function" and n.target not in skip]


def test_single_node_under_aot_autograd():

    q, k = _qk(2, 4, 2, 5, 8)
    cos, sin = _cos_sin(1, 5, 8)
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    oq, ok, dq, dk = _autograd_reference(q, k, cos, sin, 1, gq, gk)
    q.requires_grad_()
    k.requires_grad_()
    fn, graphs = compile_capturing(lambda *a: K.apply_rotary(*a))
    tq, tk = fn(q, k, cos, sin)
    torch.autograd.backward((tq, tk), (gq, gk))
    assert _call_targets(graphs["forward"]) == [torch.ops.zerograph.rotary.default]
    assert _call_targets(graphs["backward"]) == [torch.ops.zerograph.rotary_backward.default]
    torch.testing.assert_close(tq, oq, **FP32)
    torch.testing.assert_close(q.grad, dq, **FP32)
    torch.testing.assert_close(k.grad, dk, **FP32)


class _TinyAttention(torch.nn.Module):
    def __init__(self, hidden=16, heads=2, kv_heads=1):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, hidden // heads
        self.q = torch.nn.Linear(hidden, heads * self.head_dim)
        self.k = torch.nn.Linear(hidden, kv_heads * self.head_dim)
        self.fused = True

    def forward(self, x, cos, sin):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        rope = K.apply_rotary if self.fused else K.apply_rotary_reference
        q, k = rope(q, k, cos, sin)
        return (q @ k.transpose(-1, -2)).pow(2).mean()


def test_zerograph_backend_smoke_single_process():
    torch.manual_seed(0)
    model = _TinyAttention()
    ref = _TinyAttention()
    ref.load_state_dict(model.state_dict())
    ref.fused = False
    torch.compiler.reset()
    compiled = zerograph.compile(model, {"zero_optimization": {"stage": 3}})
    device = next(model.parameters()).device  # zerograph's device: the GPU if there is one
    ref.to(device)
    x = torch.randn(2, 5, 16, device=device)
    cos, sin = _cos_sin(1, 5, 8, device=device)
    loss = compiled(x, cos, sin)
    loss.backward()
    ref_loss = ref(x, cos, sin)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, **FP32)
    for name, p in ref.named_parameters():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, p.grad, **FP32)
    fw = zerograph.inspect(model).forward
    assert any(torch.ops.zerograph.rotary.default in _call_targets(gm) for gm in fw)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("hq,hk,head_dim", [(32, 8, 128), (12, 12, 64)])
def test_cuda_public_function_llama_sizes(hq, hk, head_dim):
    seq = 333
    q, k = _qk(2, hq, hk, seq, head_dim, dtype=torch.bfloat16, unsqueeze_dim=2)  # (B, S, H, D)
    q, k = q.transpose(1, 2), k.transpose(1, 2)  # HF layout: (B, H, S, D) views of (B, S, H, D)
    cos, sin = _cos_sin(1, seq, head_dim, dtype=torch.bfloat16)
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    oq, ok, dq, dk = _autograd_reference(q, k, cos, sin, 1, gq, gk)
    q.requires_grad_()
    k.requires_grad_()
    tq, tk = K.apply_rotary(q, k, cos, sin)
    assert tq.stride() == q.stride()
    torch.autograd.backward((tq, tk), (gq, gk))
    for got, want in ((tq, oq), (tk, ok), (q.grad, dq), (k.grad, dk)):
        torch.testing.assert_close(got, want, **LOW[torch.bfloat16])
