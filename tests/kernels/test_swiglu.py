"""SwiGLU: closed-form backward vs autograd, Triton launchers (interpreter on
CPU) vs reference, torch.library registration, and single-node tracing."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F

from tests.kernels._aot import capture_graphs
from zerograph.kernels import swiglu as K

# Launchers run on the GPU when there is one, else in Triton's interpreter on CPU
# tensors (tests/conftest.py sets TRITON_INTERPRET=1 without CUDA).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _launch(launcher, *args, **kwargs):
    """Run a Triton launcher on DEVICE; tensor results come back on the CPU."""
    def to(a):
        return a.to(DEVICE) if isinstance(a, torch.Tensor) else a

    out = launcher(*map(to, args), **{k: to(v) for k, v in kwargs.items()})
    return tuple(o.cpu() for o in out) if isinstance(out, tuple) else out.cpu()

# Odd, non-power-of-two shapes; (3, 2500) spans two 2048-wide column blocks.
SHAPES = [(1,), (3, 37), (2, 5, 100), (7, 1, 129), (3, 2500)]
# fp32: kernel and reference differ by exp/sigmoid rounding and operation order: a few ulps.
FP32 = dict(rtol=1e-5, atol=1e-6)
# Low precision vs the fp32 reference rounded once: one ulp of round-to-nearest plus one of
# the interpreter's truncating fp32->bf16/fp16 conversion (2**-7 / 2**-10 relative each).
LOW = {torch.bfloat16: dict(rtol=2**-6, atol=2**-6), torch.float16: dict(rtol=2**-9, atol=2**-9)}


def _inputs(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple((3 * torch.randn(shape, generator=g)).to(dtype) for _ in range(3))  # gate, up, grad


def _autograd_reference(gate, up, dy):
    gate, up = gate.clone().requires_grad_(), up.clone().requires_grad_()
    y = F.silu(gate) * up
    gg, gu = torch.autograd.grad(y, (gate, up), dy)
    return y.detach(), gg, gu


@pytest.mark.parametrize("shape", SHAPES)
def test_backward_reference_is_autograd(shape):
    gate, up, dy = _inputs(shape)
    _, gg, gu = _autograd_reference(gate, up, dy)
    rg, ru = K.swiglu_backward_reference(dy, gate, up)
    torch.testing.assert_close(rg, gg, **FP32)
    torch.testing.assert_close(ru, gu, **FP32)


@pytest.mark.parametrize("shape", SHAPES)
def test_triton_fp32_matches_reference(shape):
    gate, up, dy = _inputs(shape)
    y, gg, gu = _autograd_reference(gate, up, dy)
    torch.testing.assert_close(_launch(K.swiglu_forward_triton, gate, up), y, **FP32)
    tg, tu = _launch(K.swiglu_backward_triton, dy, gate, up)
    torch.testing.assert_close(tg, gg, **FP32)
    torch.testing.assert_close(tu, gu, **FP32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_low_precision_matches_reference(dtype):
    gate, up, dy = _inputs((5, 3, 67), dtype)
    tol = LOW[dtype]
    y = _launch(K.swiglu_forward_triton, gate, up)
    assert y.dtype == dtype
    ref = (F.silu(gate.float()) * up.float()).to(dtype)
    torch.testing.assert_close(y, ref, **tol)
    tg, tu = _launch(K.swiglu_backward_triton, dy, gate, up)
    rg, ru = K.swiglu_backward_reference(dy, gate, up)
    assert (tg.dtype, tu.dtype) == (dtype, dtype)
    torch.testing.assert_close(tg, rg, **tol)
    torch.testing.assert_close(tu, ru, **tol)


def test_triton_reads_strided_halves_of_a_fused_projection():
    gate_up = torch.randn(4, 7, 2 * 37)
    gate, up = gate_up.chunk(2, dim=-1)  # row stride 74, not contiguous
    dy = torch.randn(4, 7, 37)
    y, gg, gu = _autograd_reference(gate, up, dy)
    torch.testing.assert_close(_launch(K.swiglu_forward_triton, gate, up), y, **FP32)
    tg, tu = _launch(K.swiglu_backward_triton, dy, gate, up)
    torch.testing.assert_close(tg, gg, **FP32)
    torch.testing.assert_close(tu, gu, **FP32)
    # a transposed input (strided last dimension) is copied, still correct
    gt, ut = gate.transpose(0, 2), up.transpose(0, 2)
    torch.testing.assert_close(_launch(K.swiglu_forward_triton, gt, ut), F.silu(gt) * ut, **FP32)


def test_triton_empty_and_mixed_dtypes():
    assert _launch(K.swiglu_forward_triton, torch.empty(0, 5), torch.empty(0, 5)).shape == (0, 5)
    gate, up, dy = _inputs((3, 37))
    y = _launch(K.swiglu_forward_triton, gate.bfloat16(), up)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, F.silu(gate.bfloat16().float()) * up, **FP32)


def test_public_function_cpu_autograd():
    gate, up, dy = _inputs((3, 5, 37))
    y_ref, gg, gu = _autograd_reference(gate, up, dy)
    gate.requires_grad_(), up.requires_grad_()
    y = K.swiglu(gate, up)
    y.backward(dy)
    torch.testing.assert_close(y, y_ref, **FP32)
    torch.testing.assert_close(gate.grad, gg, **FP32)
    torch.testing.assert_close(up.grad, gu, **FP32)


def test_public_function_rejects_bad_inputs():
    with pytest.raises(ValueError, match="same shape"):
        K.swiglu(torch.randn(2, 3), torch.randn(2, 4))
    with pytest.raises(TypeError, match="floating point"):
        K.swiglu(torch.ones(2, dtype=torch.long), torch.ones(2, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    gate, up, dy = _inputs((3, 37), dtype)
    torch.library.opcheck(torch.ops.zerograph.swiglu, (gate.requires_grad_(), up.requires_grad_()))
    torch.library.opcheck(torch.ops.zerograph.swiglu_backward, (dy, gate.detach(), up.detach()))


def _call_targets(gm):
    skip = (operator.getitem, torch.ops.aten.view.default)
    return [n.target for n in gm.graph.nodes if n.op == "call_function" and n.target not in skip]


def test_single_node_under_aot_autograd():
    gate, up, dy = _inputs((2, 3, 37))
    _, gg, gu = _autograd_reference(gate, up, dy)
    gate.requires_grad_(), up.requires_grad_()
    y, graphs = capture_graphs(K.swiglu, gate, up)
    y.backward(dy)
    assert _call_targets(graphs["forward"]) == [torch.ops.zerograph.swiglu.default]
    assert _call_targets(graphs["backward"]) == [torch.ops.zerograph.swiglu_backward.default]
    torch.testing.assert_close(gate.grad, gg, **FP32)
    torch.testing.assert_close(up.grad, gu, **FP32)
