"""LayerNorm: reference vs F.layer_norm, Triton launchers (interpreter on CPU)
vs reference, torch.library registration, and single-node tracing."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F

import zerograph
from tests.kernels._aot import compile_capturing
from zerograph.kernels import layer_norm as K

EPS = 1e-5
# Where the Triton launchers run: the GPU, or the interpreter on CPU tensors.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# Odd, non-power-of-two shapes; more than 4 rows splits the backward over
# several programs (4 under the interpreter), exercising the partial sums.
SHAPES = [(1, 3), (3, 37), (2, 5, 100), (7, 1, 129)]
AFFINE = [(True, True), (True, False), (False, True), (False, False)]
# fp32: summation order and rsqrt rounding only, a few fp32 ulps.
FP32 = dict(rtol=1e-5, atol=1e-5)
# Low precision: both sides compute in fp32 and round once; the interpreter
# rounds fp32->bf16 toward zero (GPUs to nearest even): one ulp of the output
# dtype (bf16 2**-7, fp16 2**-10), taken twice for margin.
LOW = {torch.bfloat16: dict(rtol=2**-6, atol=2**-6), torch.float16: dict(rtol=2**-9, atol=2**-9)}


def _inputs(shape, dtype, wdtype, affine=(True, True), seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    x = (3 + 2 * torch.randn(shape, generator=g)).to(device, dtype)  # a mean to subtract
    w = (1 + 0.5 * torch.randn(shape[-1], generator=g)).to(device, wdtype) if affine[0] else None
    b = (0.5 * torch.randn(shape[-1], generator=g)).to(device, wdtype) if affine[1] else None
    dy = torch.randn(shape, generator=g).to(device, dtype)
    return x, w, b, dy


def _eager(x, w, b, dy):
    """F.layer_norm and its autograd gradients (None where there is no input)."""
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    y = F.layer_norm(leaves[0], (x.shape[-1],), leaves[1], leaves[2], EPS)
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(y, present, dy))
    return y.detach(), [next(grads) if t is not None else None for t in leaves]


def _bias_dtype(b):
    return b.dtype if b is not None else None


@pytest.mark.parametrize("affine", AFFINE)
def test_reference_is_f_layer_norm(affine):
    x, w, b, dy = _inputs((2, 5, 37), torch.float32, torch.float32, affine)
    y, (gx, gw, gb) = _eager(x, w, b, dy)
    torch.testing.assert_close(K.layer_norm_reference(x, w, b, EPS), y, **FP32)
    rx, rw, rb = K.layer_norm_backward_reference(dy, x, w, EPS, _bias_dtype(b))
    torch.testing.assert_close(rx, gx, **FP32)
    if w is not None:
        torch.testing.assert_close(rw, gw, **FP32)
    else:
        assert rw.numel() == 0
    if b is not None:
        torch.testing.assert_close(rb, gb, **FP32)
    else:
        assert rb.numel() == 0


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("affine", [(True, True), (False, False)])
def test_triton_fp32_matches_f_layer_norm(shape, affine):
    x, w, b, dy = _inputs(shape, torch.float32, torch.float32, affine)
    y, (gx, gw, gb) = _eager(x, w, b, dy)
    torch.testing.assert_close(K.layer_norm_forward_triton(x, w, b, EPS), y, **FP32)
    tx, tw, tb = K.layer_norm_backward_triton(dy, x, w, EPS, _bias_dtype(b))
    torch.testing.assert_close(tx, gx, **FP32)
    if w is not None:
        torch.testing.assert_close(tw, gw, **FP32)
        torch.testing.assert_close(tb, gb, **FP32)
    else:
        assert tw.numel() == 0 and tb.numel() == 0


@pytest.mark.parametrize("affine", [(True, False), (False, True)])
def test_triton_weight_or_bias_only(affine):
    x, w, b, dy = _inputs((6, 37), torch.float32, torch.float32, affine)
    y, (gx, gw, gb) = _eager(x, w, b, dy)
    torch.testing.assert_close(K.layer_norm_forward_triton(x, w, b, EPS), y, **FP32)
    tx, tw, tb = K.layer_norm_backward_triton(dy, x, w, EPS, _bias_dtype(b))
    torch.testing.assert_close(tx, gx, **FP32)
    torch.testing.assert_close(tw if w is not None else tb, gw if w is not None else gb, **FP32)


@pytest.mark.parametrize(
    "dtype,wdtype",
    [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16), (torch.bfloat16, torch.float32)],
)
def test_triton_low_precision_matches_reference(dtype, wdtype):
    x, w, b, dy = _inputs((5, 3, 67), dtype, wdtype)
    tol = LOW[dtype]
    y = K.layer_norm_forward_triton(x, w, b, EPS)
    assert y.dtype == dtype
    torch.testing.assert_close(y, K.layer_norm_reference(x, w, b, EPS), **tol)
    # F.layer_norm takes these dtype combinations (mixed bf16/fp32 on CPU only)
    if dtype == wdtype or (dtype == torch.bfloat16 and x.device.type == "cpu"):
        torch.testing.assert_close(y, F.layer_norm(x, (67,), w, b, EPS), **tol)
    tx, tw, tb = K.layer_norm_backward_triton(dy, x, w, EPS, b.dtype)
    rx, rw, rb = K.layer_norm_backward_reference(dy, x, w, EPS, b.dtype)
    assert (tx.dtype, tw.dtype, tb.dtype) == (dtype, wdtype, wdtype)
    torch.testing.assert_close(tx, rx, **tol)
    # Weight/bias gradients are sums over rows with cancellation: their error
    # is bounded relative to the sum of the terms' magnitudes.
    terms = dy.float().abs().sum(0).reshape(-1, 67).sum(0).max().item()
    torch.testing.assert_close(tw, rw, rtol=tol["rtol"], atol=tol["rtol"] * 4 * terms)
    torch.testing.assert_close(tb, rb, rtol=tol["rtol"], atol=tol["rtol"] * terms)


def test_triton_handles_non_contiguous_input():
    x, w, b, _ = _inputs((37, 6), torch.float32, torch.float32)
    xt = x.t()
    w, b = torch.linspace(0.5, 1.5, 37, device=DEVICE), torch.linspace(-1, 1, 37, device=DEVICE)
    dy = torch.randn(6, 37, device=DEVICE)
    y, (gx, gw, gb) = _eager(xt, w, b, dy)
    torch.testing.assert_close(K.layer_norm_forward_triton(xt, w, b, EPS), y, **FP32)
    tx, tw, tb = K.layer_norm_backward_triton(dy, xt, w, EPS, b.dtype)
    for got, want in ((tx, gx), (tw, gw), (tb, gb)):
        torch.testing.assert_close(got, want, **FP32)


def test_triton_empty_input():
    x = torch.empty(0, 37, device=DEVICE)
    w = torch.ones(37, device=DEVICE)
    assert K.layer_norm_forward_triton(x, w, w, EPS).shape == (0, 37)
    gx, gw, gb = K.layer_norm_backward_triton(x, x, w, EPS, torch.float32)
    zeros = torch.zeros_like(w)
    assert gx.shape == (0, 37) and torch.equal(gw, zeros) and torch.equal(gb, zeros)


@pytest.mark.parametrize("affine", AFFINE)
def test_public_function_cpu_autograd(affine):
    x, w, b, dy = _inputs((3, 5, 37), torch.float32, torch.float32, affine)
    y_ref, grads_ref = _eager(x, w, b, dy)
    leaves = [t.requires_grad_() if t is not None else None for t in (x, w, b)]
    y = K.layer_norm(*leaves, EPS)
    y.backward(dy)
    torch.testing.assert_close(y, y_ref, **FP32)
    for t, g in zip(leaves, grads_ref):
        if t is not None:
            torch.testing.assert_close(t.grad, g, **FP32)


def test_public_function_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"bias must have shape \(37,\)"):
        K.layer_norm(torch.randn(2, 37), None, torch.ones(36), EPS)
    with pytest.raises(TypeError, match="floating point"):
        K.layer_norm(torch.ones(2, 3, dtype=torch.long), None, None, EPS)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("affine", [(True, True), (False, False)])
def test_opcheck(affine, device):
    x, w, b, dy = _inputs((3, 37), torch.float32, torch.float32, affine, device=device)
    args = [t.requires_grad_() if t is not None else None for t in (x, w, b)]
    torch.library.opcheck(torch.ops.zerograph.layer_norm, (*args, EPS))
    detached = [t.detach() if t is not None else None for t in (x, w)]
    torch.library.opcheck(torch.ops.zerograph.layer_norm_backward, (dy, *detached, EPS, _bias_dtype(b)))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_mixed_dtypes(device):
    x, w, b, dy = _inputs((3, 37), torch.bfloat16, torch.float32, device=device)
    torch.library.opcheck(torch.ops.zerograph.layer_norm, (x.requires_grad_(), w.requires_grad_(), b, EPS))
    torch.library.opcheck(torch.ops.zerograph.layer_norm_backward, (dy, x.detach(), w.detach(), EPS, b.dtype))


def _call_targets(gm):
    skip = (operator.getitem, torch.ops.aten.view.default)
    return [n.target for n in gm.graph.nodes if n.op == "call_function" and n.target not in skip]


def test_single_node_under_aot_autograd():

    x, w, b, dy = _inputs((2, 3, 37), torch.float32, torch.float32)
    leaves = [t.requires_grad_() for t in (x, w, b)]
    fn, graphs = compile_capturing(lambda *a: K.layer_norm(*a, EPS))
    fn(*leaves).backward(dy)
    assert _call_targets(graphs["forward"]) == [torch.ops.zerograph.layer_norm.default]
    assert _call_targets(graphs["backward"]) == [torch.ops.zerograph.layer_norm_backward.default]
    # The bias is not saved for the backward (only its dtype is a constant).
    bw_inputs = [n for n in graphs["backward"].graph.nodes if n.op == "placeholder"]
    assert len(bw_inputs) == 3, bw_inputs  # x, weight, the incoming gradient
    _, grads = _eager(x.detach(), w.detach(), b.detach(), dy)
    for t, g in zip(leaves, grads):
        torch.testing.assert_close(t.grad, g, **FP32)


class _TinyBlock(torch.nn.Module):
    def __init__(self, hidden=24):
        super().__init__()
        self.ln = torch.nn.LayerNorm(hidden)
        self.fc = torch.nn.Linear(hidden, hidden)
        self.fused = True

    def forward(self, x):
        if self.fused:
            h = K.layer_norm(x, self.ln.weight, self.ln.bias, self.ln.eps)
        else:
            h = self.ln(x)
        return self.fc(h).pow(2).mean()


def test_zerograph_backend_smoke_single_process():
    torch.manual_seed(0)
    model = _TinyBlock()
    with torch.no_grad():
        model.ln.weight.uniform_(0.5, 1.5)
        model.ln.bias.uniform_(-0.5, 0.5)
    ref = _TinyBlock()
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
    assert any(torch.ops.zerograph.layer_norm.default in _call_targets(gm) for gm in fw)


@CUDA
@pytest.mark.parametrize("hidden", [768, 4096])
@pytest.mark.parametrize("dtype,wdtype", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_cuda_public_function_gpt_sizes(hidden, dtype, wdtype):
    x, w, b, dy = _inputs((3, 333, hidden), dtype, wdtype)
    leaves = [t.requires_grad_() for t in (x, w, b)]
    y = K.layer_norm(*leaves, EPS)
    y.backward(dy)
    tol = LOW[dtype]
    torch.testing.assert_close(y, K.layer_norm_reference(x.detach(), w.detach(), b.detach(), EPS), **tol)
    rx, rw, rb = K.layer_norm_backward_reference(dy, x.detach(), w.detach(), EPS, b.dtype)
    torch.testing.assert_close(x.grad, rx, **tol)
    terms = (dy.float().abs() * 4).reshape(-1, hidden).sum(0).max().item()  # |xhat| <~ 4
    torch.testing.assert_close(w.grad, rw, rtol=tol["rtol"], atol=1e-5 * terms)
    torch.testing.assert_close(b.grad, rb, rtol=tol["rtol"], atol=1e-5 * terms)
    # Reproducible: no atomics in the weight/bias-gradient reductions.
    again = K.layer_norm_backward_triton(dy, x.detach(), w.detach(), EPS, b.dtype)
    assert torch.equal(again[1], w.grad) and torch.equal(again[2], b.grad)
