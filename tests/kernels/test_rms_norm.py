"""RMSNorm: reference vs Hugging Face, Triton launchers (interpreter on CPU) vs
reference, torch.library registration, and single-node tracing."""

from __future__ import annotations

import operator

import pytest
import torch

import zerograph
from tests.kernels._aot import capture_graphs
from zerograph.kernels import rms_norm as K

EPS = 1e-6
# Where the Triton launchers run: the GPU, or the interpreter on CPU tensors.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# Odd, non-power-of-two shapes: (leading dims..., hidden). Rows > 4 make the
# backward split rows over several programs (4 under the interpreter), so the
# per-program weight-gradient partial sums are reduced.
SHAPES = [(1, 1), (3, 37), (2, 5, 100), (7, 1, 129)]

# fp32: the kernel and the reference differ only in summation order and
# rsqrt rounding: a few fp32 ulps.
FP32 = dict(rtol=1e-5, atol=1e-6)
# Low precision, vs the fp32-accurate reference rounded once: outputs within
# two ulps. The interpreter rounds fp32->bf16 toward zero (GPUs round to
# nearest even), one ulp; the output is rounded twice (the normalized row to
# x's dtype, then the product), so two ulps of bf16 (2**-7 each) or fp16 (2**-10).
LOW = {torch.bfloat16: dict(rtol=2**-6, atol=2**-6), torch.float16: dict(rtol=2**-9, atol=2**-9)}


def _inputs(shape, dtype, wdtype, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(device, dtype)
    w = (1 + 0.5 * torch.randn(shape[-1], generator=g)).to(device, wdtype)
    dy = torch.randn(shape, generator=g).to(device, torch.promote_types(dtype, wdtype))
    return x, w, dy


def _autograd_reference(x, w, dy):
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_()
    y = K.rms_norm_reference(x, w, EPS)
    gx, gw = torch.autograd.grad(y, (x, w), dy)
    return y.detach(), gx, gw


def test_reference_is_hugging_face_llama_rmsnorm():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    for dtype in (torch.float32, torch.bfloat16):
        x, w, _ = _inputs((2, 3, 37), dtype, torch.float32, device="cpu")
        hf = LlamaRMSNorm(37, eps=EPS)
        with torch.no_grad():
            hf.weight.copy_(w)
        expected = hf(x)
        got = K.rms_norm_reference(x, w, EPS)
        assert got.dtype == expected.dtype
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_backward_reference_is_autograd_of_reference(shape):
    x, w, dy = _inputs(shape, torch.float32, torch.float32)
    _, gx, gw = _autograd_reference(x, w, dy)
    rx, rw = K.rms_norm_backward_reference(dy, x, w, EPS)
    torch.testing.assert_close(rx, gx, **FP32)
    torch.testing.assert_close(rw, gw, **FP32)


@pytest.mark.parametrize("shape", SHAPES)
def test_triton_fp32_matches_reference(shape):
    x, w, dy = _inputs(shape, torch.float32, torch.float32)
    y, gx, gw = _autograd_reference(x, w, dy)
    torch.testing.assert_close(K.rms_norm_forward_triton(x, w, EPS), y, **FP32)
    tx, tw = K.rms_norm_backward_triton(dy, x, w, EPS)
    torch.testing.assert_close(tx, gx, **FP32)
    torch.testing.assert_close(tw, gw, **FP32)


@pytest.mark.parametrize(
    "dtype,wdtype",
    [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16), (torch.bfloat16, torch.float32)],
)
def test_triton_low_precision_matches_reference(dtype, wdtype):
    x, w, dy = _inputs((5, 3, 67), dtype, wdtype)
    out_dtype = torch.promote_types(dtype, wdtype)
    tol = LOW[dtype]
    y = K.rms_norm_forward_triton(x, w, EPS)
    assert y.dtype == out_dtype
    torch.testing.assert_close(y, K.rms_norm_reference(x, w, EPS), **tol)
    # Gradients: the kernel and the closed-form reference both work in fp32
    # and round once at the end (one ulp, plus the interpreter's truncation).
    tx, tw = K.rms_norm_backward_triton(dy, x, w, EPS)
    rx, rw = K.rms_norm_backward_reference(dy, x, w, EPS)
    assert (tx.dtype, tw.dtype) == (dtype, wdtype)
    torch.testing.assert_close(tx, rx, **tol)
    # grad_weight sums rows of dy * normalized(x) with cancellation: its error
    # is bounded relative to the sum of the terms' magnitudes, not to the sum.
    terms = (dy.float() * K.rms_norm_reference(x, torch.ones_like(w), EPS).float()).abs().sum(0)
    torch.testing.assert_close(tw, rw, rtol=tol["rtol"], atol=tol["rtol"] * terms.max().item())
    # Eager autograd rounds intermediates (dy * w, the normalized row) to the
    # low dtype: a few ulps relative to the gradients' magnitude.
    _, gx, gw = _autograd_reference(x, w, dy)
    scale = 4 * tol["rtol"]
    torch.testing.assert_close(tx.float(), gx.float(), rtol=scale, atol=scale * gx.float().abs().max().item())
    torch.testing.assert_close(tw.float(), gw.float(), rtol=scale, atol=scale * gw.float().abs().max().item())


def test_triton_handles_non_contiguous_input():
    x, w, dy = _inputs((37, 6), torch.float32, torch.float32)
    xt = x.t()  # (6, 37) with a strided last dimension
    w = torch.linspace(0.5, 1.5, 37, device=DEVICE)
    dyt = torch.randn(6, 37, device=DEVICE)
    y, gx, gw = _autograd_reference(xt, w, dyt)
    torch.testing.assert_close(K.rms_norm_forward_triton(xt, w, EPS), y, **FP32)
    tx, tw = K.rms_norm_backward_triton(dyt, xt, w, EPS)
    torch.testing.assert_close(tx, gx, **FP32)
    torch.testing.assert_close(tw, gw, **FP32)


def test_triton_empty_input():
    x = torch.empty(0, 37, device=DEVICE)
    w = torch.ones(37, device=DEVICE)
    assert K.rms_norm_forward_triton(x, w, EPS).shape == (0, 37)
    gx, gw = K.rms_norm_backward_triton(x, x, w, EPS)
    assert gx.shape == (0, 37) and torch.equal(gw, torch.zeros_like(w))


def test_public_function_cpu_autograd():
    x, w, dy = _inputs((3, 5, 37), torch.float32, torch.float32)
    y_ref, gx_ref, gw_ref = _autograd_reference(x, w, dy)
    x, w = x.requires_grad_(), w.requires_grad_()
    y = K.rms_norm(x, w, EPS)
    y.backward(dy)
    torch.testing.assert_close(y, y_ref, **FP32)
    torch.testing.assert_close(x.grad, gx_ref, **FP32)
    torch.testing.assert_close(w.grad, gw_ref, **FP32)


def test_public_function_only_weight_requires_grad():
    x, w, dy = _inputs((4, 37), torch.float32, torch.float32)
    w.requires_grad_()
    K.rms_norm(x, w, EPS).backward(dy)
    _, _, gw_ref = _autograd_reference(x, w.detach(), dy)
    torch.testing.assert_close(w.grad, gw_ref, **FP32)


def test_public_function_rejects_bad_weight():
    with pytest.raises(ValueError, match=r"weight must have shape \(37,\)"):
        K.rms_norm(torch.randn(2, 37), torch.ones(36), EPS)
    with pytest.raises(TypeError, match="floating point"):
        K.rms_norm(torch.ones(2, 3, dtype=torch.long), torch.ones(3), EPS)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("dtype,wdtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)])
def test_opcheck(dtype, wdtype, device):
    x, w, dy = _inputs((3, 37), dtype, wdtype, device=device)
    torch.library.opcheck(torch.ops.zerograph.rms_norm, (x, w.requires_grad_(), EPS))
    torch.library.opcheck(torch.ops.zerograph.rms_norm, (x.requires_grad_(), w, EPS))
    torch.library.opcheck(torch.ops.zerograph.rms_norm_backward, (dy, x.detach(), w.detach(), EPS))


def _call_targets(gm):
    """Ops called by ``gm``, without tuple indexing and views."""
    skip = (operator.getitem, torch.ops.aten.view.default)
    return [n.target for n in gm.graph.nodes if n.op == "call_function" and n.target not in skip]


def test_single_node_under_aot_autograd():
    x, w, dy = _inputs((2, 3, 37), torch.float32, torch.float32)
    x.requires_grad_()
    w.requires_grad_()
    y, graphs = capture_graphs(lambda a, b: K.rms_norm(a, b, EPS), x, w)
    y.backward(dy)
    assert _call_targets(graphs["forward"]) == [torch.ops.zerograph.rms_norm.default]
    assert _call_targets(graphs["backward"]) == [torch.ops.zerograph.rms_norm_backward.default]
    _, gx, gw = _autograd_reference(x.detach(), w.detach(), dy)
    torch.testing.assert_close(x.grad, gx, **FP32)
    torch.testing.assert_close(w.grad, gw, **FP32)


class _TinyLlamaBlock(torch.nn.Module):
    def __init__(self, hidden=24):
        super().__init__()
        self.norm = torch.nn.Parameter(1 + 0.1 * torch.randn(hidden))
        self.fc = torch.nn.Linear(hidden, hidden)
        self.fused = True

    def forward(self, x):
        h = K.rms_norm(x, self.norm, EPS) if self.fused else K.rms_norm_reference(x, self.norm, EPS)
        return self.fc(h).pow(2).mean()


def test_zerograph_backend_smoke_single_process():
    torch.manual_seed(0)
    model = _TinyLlamaBlock()
    ref = _TinyLlamaBlock()
    ref.load_state_dict(model.state_dict())
    ref.fused = False
    torch.compiler.reset()
    compiled = zerograph.compile(model, {"zero_optimization": {"stage": 3}})
    device = next(model.parameters()).device  # zerograph's device: the GPU if there is one
    ref.to(device)
    x = torch.randn(2, 5, 24, device=device)
    loss = compiled(x)
    loss.backward()
    ref_loss = ref(x)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, **FP32)
    for name, p in ref.named_parameters():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, p.grad, **FP32)
    fw = zerograph.inspect(model).forward
    assert any(torch.ops.zerograph.rms_norm.default in _call_targets(gm) for gm in fw)



def test_torch_compile_zerograph_backend_plain_model():
    """``torch.compile(model, backend="zerograph")`` on an unsharded model (no ZeRO)."""
    torch.manual_seed(0)
    model = _TinyLlamaBlock().to(DEVICE)
    ref = _TinyLlamaBlock().to(DEVICE)
    ref.load_state_dict(model.state_dict())
    ref.fused = False
    x = torch.randn(2, 5, 24, device=DEVICE)
    torch.compiler.reset()
    loss = torch.compile(model, backend="zerograph")(x)
    loss.backward()
    ref_loss = ref(x)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, **FP32)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **FP32, msg=name)

@CUDA
@pytest.mark.parametrize("hidden", [768, 4096, 5120])
@pytest.mark.parametrize("dtype,wdtype", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_cuda_public_function_llama_sizes(hidden, dtype, wdtype):
    x, w, dy = _inputs((3, 333, hidden), dtype, wdtype)
    x.requires_grad_()
    w.requires_grad_()
    y = K.rms_norm(x, w, EPS)
    y.backward(dy)
    rx, rw = K.rms_norm_backward_reference(dy, x.detach(), w.detach(), EPS)
    torch.testing.assert_close(y, K.rms_norm_reference(x.detach(), w.detach(), EPS), **LOW[dtype])
    torch.testing.assert_close(x.grad, rx, **LOW[dtype])
    terms = (dy.float().abs() * 4).reshape(-1, hidden).sum(0).max().item()  # |normalized x| <~ 4
    torch.testing.assert_close(w.grad, rw, rtol=LOW[dtype]["rtol"], atol=1e-5 * terms)
    # Reproducible: no atomics in the weight-gradient reduction.
    assert torch.equal(K.rms_norm_backward_triton(dy, x.detach(), w.detach(), EPS)[1], w.grad)


@CUDA
def test_cuda_above_max_fused_size_runs_reference():
    x, w, dy = _inputs((3, K.MAX_FUSED_SIZE + 3), torch.float32, torch.float32)
    x.requires_grad_()
    K.rms_norm(x, w, EPS).backward(dy)
    _, gx, _ = _autograd_reference(x.detach(), w, dy)
    torch.testing.assert_close(x.grad, gx, **FP32)
