"""Cross-entropy and linear cross-entropy: the Triton row kernel (interpreter on
CPU) vs the reference, the public functions vs F.cross_entropy (reductions,
ignore_index, dtypes), chunking without (N, V) temporaries, torch.library
registration and single-node tracing."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F

from tests.kernels._aot import capture_graphs
from zerograph._torch_private import TorchDispatchMode
from zerograph.kernels import cross_entropy as K

# Launchers run on the GPU when there is one, else in Triton's interpreter on CPU
# tensors (tests/conftest.py sets TRITON_INTERPRET=1 without CUDA).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _launch(launcher, *args, **kwargs):
    """Run a Triton launcher on DEVICE; tensor results come back on the CPU."""
    def to(a):
        return a.to(DEVICE) if isinstance(a, torch.Tensor) else a

    out = launcher(*map(to, args), **{k: to(v) for k, v in kwargs.items()})
    return tuple(o.cpu() for o in out) if isinstance(out, tuple) else out.cpu()

IGNORE = -100
# fp32: logsumexp/exp rounding and summation order differ from ATen's: a few ulps.
FP32 = dict(rtol=1e-5, atol=1e-6)
# bf16/fp16 logits: kernel and reference both compute in fp32 from the same inputs and
# round the gradient once (plus one ulp of the interpreter's truncating conversion);
# losses are fp32 (row kernel) so they stay at fp32 tolerance.
LOW = {torch.bfloat16: dict(rtol=2**-6, atol=2**-9), torch.float16: dict(rtol=2**-9, atol=2**-12)}


def _logits(n, v, dtype=torch.float32, seed=0, n_ignored=2):
    g = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(n, v, generator=g)).to(dtype)
    t = torch.randint(0, v, (n,), generator=g)
    t[torch.randperm(n, generator=g)[:n_ignored]] = IGNORE
    return x, t


def _rows_oracle(x, t, scale):
    """Per-row loss and gradient from fp64 autograd of F.cross_entropy(reduction='none')."""
    x64 = x.double().requires_grad_()
    loss = F.cross_entropy(x64, t, ignore_index=IGNORE, reduction="none")
    w = torch.ones(len(t), dtype=torch.float64) if scale is None else scale.double().expand(len(t))
    (g,) = torch.autograd.grad(loss, x64, w)
    return loss.float(), g


# --------------------------------------------------------------------------- row kernel


@pytest.mark.parametrize("n,v,block", [(1, 1, None), (7, 37, None), (7, 37, 16), (5, 100, 32), (3, 300, None)])
@pytest.mark.parametrize("scale_kind", ["none", "scalar", "rows"])
def test_row_kernel_fp32_matches_oracle(n, v, block, scale_kind):
    x, t = _logits(n, v, n_ignored=min(2, n - 1))
    scale = {"none": None, "scalar": torch.tensor(0.25), "rows": torch.rand(n) + 0.5}[scale_kind]
    loss_ref, g_ref = _rows_oracle(x, t, scale)
    loss, lse, grad = _launch(K.cross_entropy_rows_triton, x, t, IGNORE, scale, with_grad=True, block=block)
    torch.testing.assert_close(loss, loss_ref, **FP32)
    torch.testing.assert_close(grad, g_ref.float(), **FP32)
    valid = t != IGNORE
    torch.testing.assert_close(lse[valid], torch.logsumexp(x[valid], 1), **FP32)
    # the reference row function has the same contract
    r_loss, r_lse, r_grad = K.cross_entropy_rows_reference(x, t, IGNORE, scale, with_grad=True)
    torch.testing.assert_close(r_loss, loss_ref, **FP32)
    torch.testing.assert_close(r_grad, g_ref.float(), **FP32)
    torch.testing.assert_close(r_lse, lse, **FP32)
    # without the gradient: losses only
    loss2, _, grad2 = _launch(K.cross_entropy_rows_triton, x, t, IGNORE, scale, with_grad=False, block=block)
    assert grad2.numel() == 0
    torch.testing.assert_close(loss2, loss, rtol=0, atol=0)


def test_row_kernel_in_place_gradient():
    x, t = _logits(6, 45)
    _, g_ref = _rows_oracle(x, t, None)
    buf = x.clone().to(DEVICE)
    _, _, grad = K.cross_entropy_rows_triton(buf, t.to(DEVICE), IGNORE, None, with_grad=True, grad_out=buf, block=16)
    assert grad.data_ptr() == buf.data_ptr()
    torch.testing.assert_close(buf.cpu(), g_ref.float(), **FP32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_row_kernel_low_precision(dtype):
    x, t = _logits(5, 67, dtype)
    loss_ref, g_ref = _rows_oracle(x, t, None)
    loss, _, grad = _launch(K.cross_entropy_rows_triton, x, t, IGNORE, None, with_grad=True, block=32)
    assert grad.dtype == dtype and loss.dtype == torch.float32
    torch.testing.assert_close(loss, loss_ref, **FP32)
    torch.testing.assert_close(grad, g_ref.to(dtype), **LOW[dtype])


def test_row_kernel_masked_vocabulary_and_large_logits():
    x, t = _logits(4, 40, n_ignored=0)
    x[:, :20] = float("-inf")  # a whole first 16-wide chunk is -inf (masked vocabulary)
    x[1] += 1000.0  # large logits: no overflow in the online logsumexp
    t = t.clamp(min=20)
    loss_ref, g_ref = _rows_oracle(x, t, None)
    loss, _, grad = _launch(K.cross_entropy_rows_triton, x, t, IGNORE, None, with_grad=True, block=16)
    torch.testing.assert_close(loss, loss_ref, **FP32)
    torch.testing.assert_close(grad, g_ref.float(), **FP32)


def test_invalid_target_poisons_the_row_in_triton_and_raises_in_reference():
    x, t = _logits(4, 37, n_ignored=1)
    t[2] = 37
    t[3] = -5
    loss, _, grad = _launch(K.cross_entropy_rows_triton, x, t, IGNORE, None, with_grad=True, block=16)
    assert loss[2:].isnan().all() and grad[2:].isnan().all()
    assert loss[:2].isfinite().all() and grad[:2].isfinite().all()
    with pytest.raises(IndexError, match="target 37 is out of range for 37 classes"):
        K.cross_entropy_rows_reference(x, t, IGNORE, None, with_grad=True)


# --------------------------------------------------------------------------- public cross_entropy


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignore_index", [IGNORE, 3])
def test_public_matches_f_cross_entropy(reduction, ignore_index):
    x, t = _logits(11, 37)
    t[4] = 3
    if ignore_index != IGNORE:  # -100 would be an out-of-range target
        t = torch.where(t == IGNORE, ignore_index, t)
    x.requires_grad_()
    loss = K.cross_entropy(x, t, ignore_index=ignore_index, reduction=reduction)
    ref = F.cross_entropy(x, t, ignore_index=ignore_index, reduction=reduction)
    go = torch.randn(ref.shape)
    (g,) = torch.autograd.grad(loss, x, go)
    (g_ref,) = torch.autograd.grad(ref, x, go)
    assert loss.dtype == ref.dtype and loss.shape == ref.shape
    torch.testing.assert_close(loss, ref, **FP32)
    torch.testing.assert_close(g, g_ref, **FP32)


def test_all_ignored_mean_is_nan_with_zero_gradient_like_pytorch():
    x = torch.randn(3, 5, requires_grad=True)
    t = torch.full((3,), IGNORE)
    loss = K.cross_entropy(x, t)
    assert loss.isnan()
    loss.backward()
    assert torch.equal(x.grad, torch.zeros(3, 5))
    assert K.cross_entropy(torch.randn(0, 5), torch.zeros(0, dtype=torch.long)).isnan()
    assert K.cross_entropy(torch.randn(0, 5), torch.zeros(0, dtype=torch.long), reduction="sum") == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_public_low_precision_logits(dtype):
    x, t = _logits(9, 50, dtype)
    x.requires_grad_()
    loss = K.cross_entropy(x, t)
    loss.backward()
    assert loss.dtype == dtype and x.grad.dtype == dtype
    x64 = x.detach().double().requires_grad_()
    ref = F.cross_entropy(x64, t)
    ref.backward()
    # loss: fp32-accurate, rounded once to dtype; gradient: rounded once
    torch.testing.assert_close(loss, ref.to(dtype), rtol=LOW[dtype]["rtol"], atol=0)
    torch.testing.assert_close(x.grad, x64.grad.to(dtype), **LOW[dtype])


def test_autocast_returns_fp32_loss_like_f_cross_entropy():
    x, t = _logits(6, 37, torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert K.cross_entropy(x, t).dtype == F.cross_entropy(x, t).dtype == torch.float32


def test_no_gradient_work_without_grad():
    x, t = _logits(6, 37)
    x.requires_grad_()
    with torch.no_grad():
        loss = K.cross_entropy(x, t)
    assert loss.grad_fn is None
    _, grad = torch.ops.zerograph.cross_entropy(x.detach(), t, IGNORE, "mean", False)
    assert grad.numel() == 0


def test_second_backward_through_the_in_place_gradient_raises():
    x, t = _logits(6, 37)
    x.requires_grad_()
    loss = K.cross_entropy(x, t)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("which", ["cross_entropy", "linear_cross_entropy"])
def test_eager_backward_scales_in_place_and_allocates_nothing(which):
    """The backward's only work is an in-place multiply of the saved gradients, which
    AccumulateGrad then takes over (``detach``, no copy): no zero tangents for the
    gradient outputs, no second (N, V) or (V, H) tensor."""
    x, t = _logits(20, 30)
    h, w = torch.randn(20, 8, requires_grad=True), torch.randn(30, 8, requires_grad=True)
    x.requires_grad_()
    loss = K.cross_entropy(x, t) if which == "cross_entropy" else K.linear_cross_entropy(h, w, t)
    rec = _RecordOps()
    with rec:
        loss.backward()
    assert set(rec.ops) == {torch.ops.aten.ones_like.default, torch.ops.aten.mul_.Tensor, torch.ops.aten.detach.default}


def test_in_place_scaling_returns_the_forward_buffer():
    x, t = _logits(6, 37)
    x.requires_grad_()
    loss, grad = torch.ops.zerograph.cross_entropy(x, t, IGNORE, "mean", True)
    expected = grad.clone() * 2.0
    (gx,) = torch.autograd.grad(loss, x, torch.tensor(2.0))
    assert gx.data_ptr() == grad.data_ptr()
    torch.testing.assert_close(gx, expected, rtol=0, atol=0)


def test_public_rejects_bad_inputs():
    with pytest.raises(ValueError, match="reduction must be"):
        K.cross_entropy(torch.randn(2, 3), torch.zeros(2, dtype=torch.long), reduction="avg")
    with pytest.raises(ValueError, match=r"logits must be 2-D \(N, V\)"):
        K.cross_entropy(torch.randn(2, 3, 4), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"target must have shape \(2,\)"):
        K.cross_entropy(torch.randn(2, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="class indices"):
        K.cross_entropy(torch.randn(2, 3), torch.zeros(2))
    with pytest.raises(IndexError, match="out of range"):
        K.cross_entropy(torch.randn(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="one device"):
        K.cross_entropy(torch.randn(2, 3), torch.zeros(2, dtype=torch.long, device="meta"))


# --------------------------------------------------------------------------- linear_cross_entropy


def _linear_inputs(n, h, v, dtype=torch.float32, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) / h**0.5).to(dtype)
    b = torch.randn(v, generator=g).to(dtype) if bias else None
    t = torch.randint(0, v, (n,), generator=g)
    t[torch.randperm(n, generator=g)[:3]] = IGNORE
    return hidden, weight, b, t


def _linear_oracle(hidden, weight, bias, t, reduction, go):
    """Loss and gradients of F.cross_entropy(F.linear(...)) in fp64."""
    leaves = [a.detach().double().requires_grad_() for a in (hidden, weight) + ((bias,) if bias is not None else ())]
    loss = F.cross_entropy(F.linear(leaves[0], leaves[1], leaves[2] if bias is not None else None), t,
                           ignore_index=IGNORE, reduction=reduction)
    grads = torch.autograd.grad(loss, leaves, go.double())
    return loss, grads


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_public_matches_f_cross_entropy(reduction, bias):
    hidden, weight, b, t = _linear_inputs(150, 24, 37, bias=bias)  # 150 rows: 3 chunks of 64
    leaves = [a.requires_grad_() for a in (hidden, weight, b) if a is not None]
    loss = K.linear_cross_entropy(hidden, weight, t, b, reduction=reduction)
    go = torch.rand(loss.shape) + 0.5
    grads = torch.autograd.grad(loss, leaves, go)
    loss_ref, grads_ref = _linear_oracle(hidden, weight, b, t, reduction, go)
    assert loss.dtype == torch.float32 and loss.shape == loss_ref.shape
    torch.testing.assert_close(loss, loss_ref.float(), **FP32)
    # On CUDA, cuBLAS sums the chunked matmuls in another order than the
    # oracle's single matmul; gradients with cancellation differ by ~1e-6.
    grad_tol = FP32 if hidden.device.type == "cpu" else {"rtol": 1e-5, "atol": 3e-6}
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want.float(), **grad_tol)


@pytest.mark.parametrize("use_kernel", [False, True])
@pytest.mark.parametrize("scale_kind", ["mean", "rows"])
def test_linear_chunked_small_chunks(use_kernel, scale_kind):
    hidden, weight, b, t = _linear_inputs(13, 11, 37)
    n_valid = (t != IGNORE).sum()
    scale = 1.0 / n_valid.float() if scale_kind == "mean" else torch.rand(13) + 0.5
    rows_fn = (lambda *a: K.cross_entropy_rows_triton(*a, block=16)) if use_kernel else K.cross_entropy_rows_reference
    dev = DEVICE if use_kernel else "cpu"
    inputs = (a.to(dev) for a in (hidden, weight, t, b))
    outputs = K.linear_cross_entropy_chunked(
        *inputs, IGNORE, scale.to(dev), True, True, True, True, chunk_rows=4, rows_fn=rows_fn
    )
    row_loss, gh, gw, gb = (o.cpu() for o in outputs)
    go = scale.expand(13)
    _, (gh_ref, gw_ref, gb_ref) = _linear_oracle(hidden, weight, b, t, "none", go)
    loss_ref, _ = _linear_oracle(hidden, weight, b, t, "none", go)
    torch.testing.assert_close(row_loss, loss_ref.float(), **FP32)
    torch.testing.assert_close(gh, gh_ref.float(), **FP32)
    torch.testing.assert_close(gw, gw_ref.float(), **FP32)
    torch.testing.assert_close(gb, gb_ref.float(), **FP32)


def test_linear_chunks_never_hold_full_logits():
    n, h, v, chunk = 40, 16, 37, 8
    hidden, weight, b, t = _linear_inputs(n, h, v)
    scale = torch.tensor(0.1)

    def fwd_bwd(hidden, weight, b, t, scale):
        return K.linear_cross_entropy_chunked(hidden, weight, t, b, IGNORE, scale, True, True, True, True,
                                              chunk_rows=chunk, rows_fn=K.cross_entropy_rows_reference)

    sizes = []

    class RecordOutputs(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            sizes.extend(o.numel() for o in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(o, torch.Tensor))
            return out

    with RecordOutputs():
        row_loss, *_ = fwd_bwd(hidden, weight, b, t, scale)
    assert max(sizes) == max(n * h, v * h)  # grad_hidden, grad_weight; chunks are 8 x 37 = 296
    assert max(sizes) < n * v  # no (N, V) = 1480-element tensor
    assert chunk * v in sizes


def test_linear_frozen_weight_skips_its_gradient():
    hidden, weight, b, t = _linear_inputs(9, 8, 21)
    out = torch.ops.zerograph.linear_cross_entropy(hidden, weight, t, b, IGNORE, "mean", True, False, False)
    assert out[1].shape == hidden.shape and out[2].numel() == 0 and out[3].numel() == 0
    hidden.requires_grad_()
    K.linear_cross_entropy(hidden, weight, t, b).backward()
    _, (gh_ref, _, _) = _linear_oracle(hidden, weight, b, t, "mean", torch.tensor(1.0))
    torch.testing.assert_close(hidden.grad, gh_ref.float(), **FP32)
    assert weight.grad is None


def test_linear_bf16_and_autocast():
    hidden, weight, b, t = _linear_inputs(70, 32, 45, torch.bfloat16)
    hidden.requires_grad_(), weight.requires_grad_()
    loss = K.linear_cross_entropy(hidden, weight, t)
    loss.backward()
    assert loss.dtype == torch.bfloat16
    _, (gh_ref, gw_ref) = _linear_oracle(hidden, weight, None, t, "mean", torch.tensor(1.0))
    # The logits are rounded to bf16 by the matmul (as eager's), then everything is fp32 and
    # rounded once; grad_weight accumulates 2 chunks in bf16. Relative to the gradients'
    # scale: a few bf16 ulps.
    for got, want in ((hidden.grad, gh_ref), (weight.grad, gw_ref)):
        torch.testing.assert_close(got.float(), want.float(), rtol=2**-5, atol=2**-5 * want.abs().max().item())
    # autocast: fp32 parameters, bf16 matmuls, fp32 loss (like F.linear + F.cross_entropy)
    h32, w32 = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = K.linear_cross_entropy(h32, w32, t)
        ref = F.cross_entropy(F.linear(h32, w32), t)
    assert loss.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=2**-7, atol=0)
    loss.backward()
    assert w32.grad.dtype == torch.float32


def test_linear_rejects_bad_inputs():
    h, w, b, t = _linear_inputs(4, 8, 10)
    with pytest.raises(ValueError, match=r"hidden must be \(N, H\) and weight \(V, H\)"):
        K.linear_cross_entropy(h, w[:, :7], t)
    with pytest.raises(ValueError, match=r"bias must have shape \(10,\)"):
        K.linear_cross_entropy(h, w, t, b[:9])
    with pytest.raises(TypeError, match="share one floating-point dtype"):
        K.linear_cross_entropy(h.bfloat16(), w, t)


# --------------------------------------------------------------------------- registration


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_opcheck_cross_entropy(reduction):
    x, t = _logits(5, 37)
    torch.library.opcheck(torch.ops.zerograph.cross_entropy, (x.requires_grad_(), t, IGNORE, reduction, True))
    torch.library.opcheck(torch.ops.zerograph.cross_entropy, (x.detach().bfloat16(), t, IGNORE, reduction, False))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_opcheck_linear_cross_entropy(reduction):
    hidden, weight, b, t = _linear_inputs(7, 8, 11)
    args = (hidden.requires_grad_(), weight.requires_grad_(), t, b.requires_grad_(), IGNORE, reduction, True, True, True)
    torch.library.opcheck(torch.ops.zerograph.linear_cross_entropy, args)
    go = torch.rand(7)
    torch.library.opcheck(
        torch.ops.zerograph.linear_cross_entropy_backward,
        (go, hidden.detach(), weight.detach(), t, None, IGNORE, True, True, False),
    )


def _call_targets(gm):
    skip = (operator.getitem, torch.ops.aten.view.default, torch.ops.aten.unsqueeze.default)
    return [n.target for n in gm.graph.nodes if n.op == "call_function" and n.target not in skip]


def test_cross_entropy_single_node_under_aot_autograd():
    x, t = _logits(7, 37)
    x.requires_grad_()
    loss, graphs = capture_graphs(K.cross_entropy, x, t)
    loss.backward()
    assert _call_targets(graphs["forward"]) == [torch.ops.zerograph.cross_entropy.default]
    assert _call_targets(graphs["backward"]) == [torch.ops.aten.mul.Tensor]  # scale the saved gradient
    (g_ref,) = torch.autograd.grad(F.cross_entropy(x, t), x)
    torch.testing.assert_close(x.grad, g_ref, **FP32)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_single_node_under_aot_autograd(reduction):
    hidden, weight, b, t = _linear_inputs(9, 8, 21)
    hidden.requires_grad_(), weight.requires_grad_()
    fn = lambda h, w, y: K.linear_cross_entropy(h, w, y, reduction=reduction).sum()  # noqa: E731
    loss, graphs = capture_graphs(fn, hidden, weight, t)
    loss.backward()
    fwd = _call_targets(graphs["forward"])
    assert fwd[0] == torch.ops.zerograph.linear_cross_entropy.default
    bwd = _call_targets(graphs["backward"])
    if reduction == "none":
        assert torch.ops.zerograph.linear_cross_entropy_backward.default in bwd
    else:
        # the gradients were computed in the forward: the backward only scales them
        assert torch.ops.aten.mul.Tensor in bwd
        assert set(bwd) <= {torch.ops.aten.mul.Tensor, torch.ops.aten.expand.default}  # expand: from .sum()
    _, (gh, gw) = _linear_oracle(hidden, weight, None, t, reduction, torch.ones(() if reduction == "mean" else 9))
    torch.testing.assert_close(hidden.grad, gh.float(), **FP32)
    torch.testing.assert_close(weight.grad, gw.float(), **FP32)


class _TinyLM(torch.nn.Module):
    """Embedding -> Llama MLP (SwiGLU) -> lm_head + loss, fused or eager."""

    def __init__(self, vocab=41, hidden=16, inter=24, fused=True):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.gate = torch.nn.Linear(hidden, inter, bias=False)
        self.up = torch.nn.Linear(hidden, inter, bias=False)
        self.down = torch.nn.Linear(inter, hidden, bias=False)
        self.lm_head = torch.nn.Linear(hidden, vocab, bias=False)
        self.fused = fused

    def forward(self, idx, targets):
        from zerograph.kernels.swiglu import swiglu

        x = self.embed(idx).flatten(0, 1)
        if self.fused:
            x = x + self.down(swiglu(self.gate(x), self.up(x)))
            return K.linear_cross_entropy(x, self.lm_head.weight, targets.flatten())
        x = x + self.down(F.silu(self.gate(x)) * self.up(x))
        return F.cross_entropy(self.lm_head(x), targets.flatten())


def test_zerograph_backend_smoke_single_process():
    import zerograph

    torch.manual_seed(0)
    model, ref = _TinyLM(), _TinyLM(fused=False)
    ref.load_state_dict(model.state_dict())
    idx = torch.randint(0, 41, (2, 7))
    targets = torch.randint(0, 41, (2, 7))
    targets[0, :3] = IGNORE
    torch.compiler.reset()
    compiled = zerograph.compile(model, {"zero_optimization": {"stage": 3}})
    loss = compiled(idx, targets)
    loss.backward()
    ref_loss = ref(idx, targets)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, **FP32)
    params = dict(model.named_parameters())
    for name, p in ref.named_parameters():
        torch.testing.assert_close(params[name].grad, p.grad, **FP32)
    fw = zerograph.inspect(model).forward
    targets_called = [t for gm in fw for t in _call_targets(gm)]
    assert torch.ops.zerograph.linear_cross_entropy.default in targets_called
    assert torch.ops.zerograph.swiglu.default in targets_called


_COMPILE_FOR_SM90 = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from zerograph.kernels import cross_entropy as C, gelu as G, swiglu as S

def build(fn, signature, constexprs, warps):
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})

for p in ("*bf16", "*fp32"):
    build(S._swiglu_fwd_kernel, dict(G=p, U=p, Y=p, stride_g="i64", stride_u="i64", n_cols="i32", BLOCK="constexpr"),
          {"BLOCK": 2048}, 8)
    build(S._swiglu_bwd_kernel, dict(DY=p, G=p, U=p, DG=p, DU=p, stride_dy="i64", stride_g="i64", stride_u="i64",
                                     n_cols="i32", BLOCK="constexpr"), {"BLOCK": 2048}, 8)
    for tanh in (True, False):
        build(G._gelu_fwd_kernel, dict(X=p, Y=p, stride_x="i64", n_cols="i32", TANH="constexpr", BLOCK="constexpr"),
              {"TANH": tanh, "BLOCK": 2048}, 8)
        build(G._gelu_bwd_kernel, dict(DY=p, X=p, DX=p, stride_dy="i64", stride_x="i64", n_cols="i32",
                                       TANH="constexpr", BLOCK="constexpr"), {"TANH": tanh, "BLOCK": 2048}, 8)
    for with_grad, mode in ((False, 0), (True, 0), (True, 1), (True, 2)):
        build(C._ce_rows_kernel, dict(X=p, stride_x="i64", T="*i64", LOSS="*fp32", LSE="*fp32", DX=p, stride_dx="i64",
                                      SCALE="*fp32", n_cols="i32", ignore_index="i32", WITH_GRAD="constexpr",
                                      SCALE_MODE="constexpr", BLOCK="constexpr"),
              {"WITH_GRAD": with_grad, "SCALE_MODE": mode, "BLOCK": 32768}, 32)
print("compiled")
"""


@pytest.mark.timeout(300)
def test_kernels_compile_for_sm90_without_a_gpu(tmp_path):
    """The interpreter accepts code the compiler rejects (loop-carried type changes,
    unsupported ops): compile every kernel variant for an H100 (sm_90) with Triton's
    bundled toolchain, in a process without TRITON_INTERPRET."""
    if torch.cuda.is_available():
        pytest.skip("with a GPU the launcher tests run the compiled kernels")
    pytest.importorskip("triton.backends.nvidia")
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", _COMPILE_FOR_SM90], env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-4000:]
