"""GELU (erf and tanh): closed-form backward vs autograd, Triton launchers
(interpreter on CPU) vs reference, torch.library registration, single-node tracing."""

from __future__ import annotations

import math
import operator

import pytest
import torch
import torch.nn.functional as F

from tests.kernels._aot import capture_graphs
from zerograph.kernels import gelu as K

# Launchers run on the GPU when there is one, else in Triton's interpreter on CPU
# tensors (tests/conftest.py sets TRITON_INTERPRET=1 without CUDA).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _launch(launcher, *args, **kwargs):
    """Run a Triton launcher on DEVICE; tensor results come back on the CPU."""
    def to(a):
        return a.to(DEVICE) if isinstance(a, torch.Tensor) else a

    out = launcher(*map(to, args), **{k: to(v) for k, v in kwargs.items()})
    return tuple(o.cpu() for o in out) if isinstance(out, tuple) else out.cpu()

SHAPES = [(1,), (3, 37), (2, 5, 100), (3, 2500)]  # (3, 2500): two 2048-wide column blocks
APPROX = ["none", "tanh"]
# fp32 vs an fp64 oracle rounded to fp32: erf/exp/sigmoid rounding, a few ulps (measured
# over [-40, 40]: <= 5e-7 absolute for both forms, forward and backward).
FP32 = dict(rtol=1e-5, atol=1e-6)
# vs ATen's own fp32 backward: its tanh form computes 1 - tanh(z)**2, which cancels where
# tanh(z) ~ +-1 (1e-6 absolute error, measured); ours uses sigmoid(2z) * sigmoid(-2z).
ATEN = dict(rtol=1e-5, atol=2e-6)
# Triton's interpreter evaluates exp in numpy, which warns when exp(-2z) overflows to inf
# (sigmoid is then exactly 0, as on a GPU).
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
# Low precision vs the fp32 reference rounded once: one ulp of rounding plus one of the
# interpreter's truncating fp32->bf16/fp16 conversion.
LOW = {torch.bfloat16: dict(rtol=2**-6, atol=2**-6), torch.float16: dict(rtol=2**-9, atol=2**-9)}


def _inputs(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = 3 * torch.randn(shape, generator=g)
    if x.numel() > 4:
        x.view(-1)[:4] = torch.tensor([0.0, -12.0, 12.0, -40.0])  # zero and saturated tails
    return x.to(dtype), torch.randn(shape, generator=g).to(dtype)


def _autograd_reference(x, dy, approximate):
    """F.gelu and its autograd gradient, evaluated in fp64, in x's dtype."""
    x64 = x.double().requires_grad_()
    y = F.gelu(x64, approximate=approximate)
    (gx,) = torch.autograd.grad(y, x64, dy.double())
    return y.detach().to(x.dtype), gx.to(x.dtype)


@pytest.mark.parametrize("approximate", APPROX)
def test_backward_matches_aten_fp32(approximate):
    x = torch.linspace(-40, 40, 20001)
    xa = x.clone().requires_grad_()
    (ga,) = torch.autograd.grad(F.gelu(xa, approximate=approximate).sum(), xa)
    torch.testing.assert_close(K.gelu_backward_reference(torch.ones_like(x), x, approximate), ga, **ATEN)


def test_tanh_form_is_gpt2_new_gelu():
    x, _ = _inputs((4, 37))
    new_gelu = 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))
    torch.testing.assert_close(K.gelu(x, "tanh"), new_gelu, **FP32)
    torch.testing.assert_close(_launch(K.gelu_forward_triton, x, "tanh"), new_gelu, **FP32)


@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("shape", SHAPES)
def test_backward_reference_is_autograd(shape, approximate):
    x, dy = _inputs(shape)
    _, gx = _autograd_reference(x, dy, approximate)
    torch.testing.assert_close(K.gelu_backward_reference(dy, x, approximate), gx, **FP32)


@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_fp32_matches_reference(shape, approximate):
    x, dy = _inputs(shape)
    y, gx = _autograd_reference(x, dy, approximate)
    torch.testing.assert_close(_launch(K.gelu_forward_triton, x, approximate), y, **FP32)
    torch.testing.assert_close(_launch(K.gelu_backward_triton, dy, x, approximate), gx, **FP32)


@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_low_precision_matches_reference(dtype, approximate):
    x, dy = _inputs((5, 3, 67), dtype)
    tol = LOW[dtype]
    y = _launch(K.gelu_forward_triton, x, approximate)
    assert y.dtype == dtype
    torch.testing.assert_close(y, F.gelu(x.float(), approximate=approximate).to(dtype), **tol)
    gx = _launch(K.gelu_backward_triton, dy, x, approximate)
    assert gx.dtype == dtype
    torch.testing.assert_close(gx, K.gelu_backward_reference(dy, x, approximate), **tol)


def test_triton_strided_input():
    x, _ = _inputs((6, 74))
    xs = x[:, ::2]  # strided last dimension: copied to rows
    xv = x[:, :37]  # row stride 74: read in place
    for t in (xs, xv, x.t()):
        torch.testing.assert_close(_launch(K.gelu_forward_triton, t, "tanh"), F.gelu(t, approximate="tanh"), **FP32)
        dy = torch.randn(t.shape)
        torch.testing.assert_close(_launch(K.gelu_backward_triton, dy, t, "none"), _autograd_reference(t, dy, "none")[1], **FP32)


@pytest.mark.parametrize("approximate", APPROX)
def test_public_function_cpu_autograd(approximate):
    x, dy = _inputs((3, 5, 37))
    y_ref, gx = _autograd_reference(x, dy, approximate)
    x.requires_grad_()
    y = K.gelu(x, approximate)
    y.backward(dy)
    torch.testing.assert_close(y, y_ref, **FP32)
    torch.testing.assert_close(x.grad, gx, **FP32)


def test_default_is_erf():
    x, _ = _inputs((3, 37))
    torch.testing.assert_close(K.gelu(x), F.gelu(x), rtol=0, atol=0)


def test_rejects_unknown_approximation():
    for bad in ("erf", "Tanh", "sigmoid"):
        with pytest.raises(ValueError, match="approximate must be 'none'.*or 'tanh'"):
            K.gelu(torch.randn(3), bad)
    with pytest.raises(TypeError, match="floating point"):
        K.gelu(torch.ones(3, dtype=torch.long))


@pytest.mark.parametrize("approximate", APPROX)
def test_opcheck(approximate):
    x, dy = _inputs((3, 37))
    torch.library.opcheck(torch.ops.zerograph.gelu, (x.clone().requires_grad_(), approximate))
    torch.library.opcheck(torch.ops.zerograph.gelu_backward, (dy, x, approximate))
    xb = x.bfloat16().requires_grad_()
    torch.library.opcheck(torch.ops.zerograph.gelu, (xb, approximate))


def _call_targets(gm):
    skip = (operator.getitem, torch.ops.aten.view.default)
    return [n.target for n in gm.graph.nodes if n.op == "call_function" and n.target not in skip]


def test_single_node_under_aot_autograd():
    x, dy = _inputs((2, 3, 37))
    _, gx = _autograd_reference(x, dy, "tanh")
    x.requires_grad_()
    y, graphs = capture_graphs(lambda t: K.gelu(t, "tanh"), x)
    y.backward(dy)
    assert _call_targets(graphs["forward"]) == [torch.ops.zerograph.gelu.default]
    assert _call_targets(graphs["backward"]) == [torch.ops.zerograph.gelu_backward.default]
    torch.testing.assert_close(x.grad, gx, **FP32)
