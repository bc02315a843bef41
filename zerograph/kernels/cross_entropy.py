"""Cross-entropy without full-vocabulary temporaries, and linear + cross-entropy
without the logits.

``cross_entropy(logits, target, ignore_index, reduction)`` is
``F.cross_entropy`` for ``(N, V)`` logits. The Triton kernel runs one program
per row and reads the row twice in ``BLOCK``-wide vocabulary chunks: an online
logsumexp, then (when the logits need a gradient) the gradient row
``(softmax - onehot) * scale``, written in the same launch (Liger-Kernel
style). So the forward returns the loss *and* the gradient for
``grad_output == 1``; the backward only multiplies that saved gradient by
``grad_output``, in place. Registered as ``zerograph::cross_entropy``::

    forward:  cross_entropy = torch.ops.zerograph.cross_entropy.default(primals_1, primals_2, -100, 'mean', True)
              getitem = cross_entropy[0]; getitem_1 = cross_entropy[1]   # fp32 loss, saved gradient
    backward: mul = torch.ops.aten.mul.Tensor(getitem_1, tangents_1)

``linear_cross_entropy(hidden, weight, target, bias, ...)`` equals
``F.cross_entropy(hidden @ weight.T + bias, target, ...)`` but never holds the
``(N, V)`` logits: rows are processed ``chunk_rows`` at a time (matmul into a
``(chunk_rows, V)`` buffer, the cross-entropy kernel overwrites it with its
gradient, two matmuls give that chunk's ``grad_hidden`` rows and add its
``grad_weight`` contribution). With ``reduction`` ``"mean"``/``"sum"`` the
gradients are computed in the forward and the backward scales them in place;
with ``"none"`` (a per-row ``grad_output``) the forward keeps nothing but its
inputs and ``zerograph::linear_cross_entropy_backward`` recomputes the chunks.

Memory held (``N`` rows, vocabulary ``V``, hidden ``H``, ``b`` bytes per element):

* eager ``F.cross_entropy(logits.float(), y)`` on bf16 logits: peak about
  ``3 * 4 N V`` bytes in the backward (saved log-softmax, its incoming
  gradient and its result, all fp32);
* ``cross_entropy``: the gradient, ``b N V``, from the forward to the end of
  the backward (plus the caller's logits); no fp32 ``(N, V)`` temporary;
* ``linear_cross_entropy`` (mean/sum): ``grad_weight`` (``b V H``),
  ``grad_hidden`` (``b N H``) and one chunk, ``b * chunk_rows * V`` with
  ``chunk_rows ~ H / 4`` (a quarter of the weight), so about ``1.25 b V H``;
  ``"none"``: one chunk in the forward, the same as mean/sum in the backward.

Numerics: everything is accumulated in fp32 and rounded once to the output
dtype, except ``grad_weight`` of ``linear_cross_entropy``, which accumulates
one ``addmm`` per row chunk in the weight's dtype (``ceil(N / chunk_rows)``
roundings; an fp32 accumulator would double its memory). Losses are returned
in the logits' dtype, or fp32 under autocast (as ``F.cross_entropy``).

Targets that are neither ``ignore_index`` nor in ``[0, V)`` raise
``IndexError`` in the reference; the Triton kernel cannot raise and gives that
row a NaN loss and NaN gradient instead. The in-place backward means a graph
through these ops can be backpropagated once in eager mode (``retain_graph=True`` and a
second backward raise autograd's in-place modification error); no double
backward.
"""

from __future__ import annotations

import contextlib
from typing import Optional  # custom_op schemas: the spelling every supported torch parses

import torch
from torch import Tensor

from zerograph.kernels._common import HAS_TRITON, require_triton, tl, triton, use_triton

__all__ = [
    "cross_entropy",
    "linear_cross_entropy",
    "cross_entropy_reference",
    "linear_cross_entropy_reference",
    "cross_entropy_rows_reference",
    "cross_entropy_rows_triton",
    "linear_cross_entropy_chunked",
    "chunk_rows_for",
]

REDUCTIONS = ("mean", "sum", "none")
# Rows per chunk of the pure-torch cross-entropy path: bounds its fp32 temporaries.
_REFERENCE_ELEMENTS = 1 << 24


def _check_reduction(reduction: str, name: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{name}: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


# --------------------------------------------------------------------------- references


def cross_entropy_reference(logits: Tensor, target: Tensor, ignore_index: int = -100, reduction: str = "mean") -> Tensor:
    """``F.cross_entropy`` computed in fp32, returned in the logits' dtype
    (differentiable): the test oracle."""
    loss = torch.nn.functional.cross_entropy(logits.float(), target.long(), ignore_index=ignore_index, reduction=reduction)
    return loss.to(logits.dtype)


def linear_cross_entropy_reference(
    hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None,
    ignore_index: int = -100, reduction: str = "mean",
) -> Tensor:
    """``F.cross_entropy(F.linear(hidden, weight, bias).float(), ...)`` in the
    logits' dtype (differentiable; materializes the logits): the test oracle."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    return cross_entropy_reference(logits, target, ignore_index, reduction)


def cross_entropy_rows_reference(
    logits: Tensor, target: Tensor, ignore_index: int, scale: Tensor | None = None,
    with_grad: bool = False, grad_out: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row cross-entropy in pure torch; the contract of :func:`cross_entropy_rows_triton`.

    Returns ``(loss, lse, grad)``: fp32 ``(N,)`` losses and logsumexps (0 on
    ignored rows) and, when ``with_grad``, ``(softmax - onehot) * scale`` with
    zero rows where ``target == ignore_index`` (written into ``grad_out`` if
    given, which may be ``logits`` itself). ``scale``: ``None`` (1), a 0-dim
    tensor, or one value per row."""
    n_rows, n_cols = logits.shape
    x = logits.float()
    tgt = target.long()
    valid = tgt != ignore_index
    bad = valid & ((tgt < 0) | (tgt >= n_cols))
    if bool(bad.any()):
        raise IndexError(
            f"cross_entropy: target {int(tgt[bad][0])} is out of range for {n_cols} classes "
            f"and is not ignore_index ({ignore_index})"
        )
    safe = torch.where(valid, tgt, 0).unsqueeze(1)
    lse = torch.logsumexp(x, dim=1) if n_cols else x.new_full((n_rows,), float("-inf"))
    loss = torch.where(valid, lse - x.gather(1, safe).squeeze(1), 0.0)
    lse = torch.where(valid, lse, 0.0)
    if not with_grad:
        return loss, lse, logits.new_empty(0)
    g = torch.exp(x - lse.unsqueeze(1))
    g.scatter_add_(1, safe, torch.full_like(lse, -1.0).unsqueeze(1))
    if scale is not None:
        g = g * (scale.float().unsqueeze(1) if scale.dim() else scale.float())
    g = torch.where(valid.unsqueeze(1), g, 0.0)
    if grad_out is None:
        return loss, lse, g.to(logits.dtype)
    grad_out.copy_(g)
    return loss, lse, grad_out


# --------------------------------------------------------------------------- Triton kernel

if HAS_TRITON:

    @triton.jit
    def _ce_rows_kernel(
        X, stride_x, T, LOSS, LSE, DX, stride_dx, SCALE, n_cols, ignore_index,
        WITH_GRAD: tl.constexpr, SCALE_MODE: tl.constexpr, BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        x_row = X + row * stride_x
        dx_row = DX + row * stride_dx
        offs = tl.arange(0, BLOCK)
        t = tl.load(T + row).to(tl.int64)
        if t == ignore_index:
            tl.store(LOSS + row, 0.0)
            tl.store(LSE + row, 0.0)
            if WITH_GRAD:
                for start in range(0, n_cols, BLOCK):
                    cols = start + offs
                    tl.store(dx_row + cols, tl.zeros((BLOCK,), tl.float32).to(DX.dtype.element_ty), mask=cols < n_cols)
            return
        # pass 1: online logsumexp over BLOCK-wide chunks
        m = float("-inf")
        s = 0.0
        for start in range(0, n_cols, BLOCK):
            cols = start + offs
            x = tl.load(x_row + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # an all -inf prefix stays s == 0
            s = s * tl.exp(m - ref) + tl.sum(tl.exp(x - ref), axis=0)
            m = m_new
        lse = m + tl.log(s)
        in_range = (t >= 0) & (t < n_cols)
        x_t = tl.load(x_row + t, mask=in_range, other=float("nan")).to(tl.float32)
        tl.store(LOSS + row, lse - x_t)
        tl.store(LSE + row, lse)
        if WITH_GRAD:
            if SCALE_MODE == 1:
                scale = tl.load(SCALE).to(tl.float32)
            elif SCALE_MODE == 2:
                scale = tl.load(SCALE + row).to(tl.float32)
            else:
                scale = 1.0
            poison = tl.where(in_range, 0.0, float("nan"))  # an invalid target poisons its row
            # pass 2: the gradient row; each element is read before it is written,
            # so DX may be X (in place).
            for start in range(0, n_cols, BLOCK):
                cols = start + offs
                mask = cols < n_cols
                x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
                g = tl.exp(x - lse) - tl.where(cols == t, 1.0, 0.0)
                tl.store(dx_row + cols, (g * scale + poison).to(DX.dtype.element_ty), mask=mask)


def _launch_settings(n_cols: int, block: int | None) -> tuple[int, int]:
    """``(BLOCK, num_warps)``: vocabulary chunks of up to 32k elements, ~32 per thread."""
    if block is None:
        block = min(32768, triton.next_power_of_2(max(n_cols, 1)))
    warps = 32 if block >= 32768 else 16 if block >= 8192 else 8 if block >= 2048 else 4
    return block, warps


def _device_guard(t: Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def cross_entropy_rows_triton(
    logits: Tensor, target: Tensor, ignore_index: int, scale: Tensor | None = None,
    with_grad: bool = False, grad_out: Tensor | None = None, block: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Launch the row kernel (CUDA tensors, or CPU under ``TRITON_INTERPRET=1``).

    Same contract as :func:`cross_entropy_rows_reference`; ``grad_out`` must be
    row-contiguous ``(N, V)`` and may be ``logits`` (in place). ``block``
    overrides the vocabulary chunk width (a power of two; tests use small ones)."""
    require_triton(logits, target)
    n_rows, n_cols = logits.shape
    if logits.stride(1) != 1 and n_cols > 1:
        logits = logits.contiguous()
    target = target.contiguous()
    loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    if with_grad:
        grad = torch.empty((n_rows, n_cols), dtype=logits.dtype, device=logits.device) if grad_out is None else grad_out
        if grad.stride(1) != 1 and n_cols > 1:
            raise ValueError("cross_entropy_rows_triton: grad_out must have contiguous rows")
    else:
        grad = logits.new_empty(0)
    if scale is None:
        mode, scale_arg = 0, loss  # unused
    else:
        scale_arg = scale.to(device=logits.device, dtype=torch.float32).contiguous()
        mode = 1 if scale_arg.dim() == 0 else 2
    if n_rows:
        block, warps = _launch_settings(n_cols, block)
        with _device_guard(logits):
            _ce_rows_kernel[(n_rows,)](
                logits, logits.stride(0), target, loss, lse, grad, grad.stride(0) if with_grad else 0,
                scale_arg, n_cols, ignore_index,
                WITH_GRAD=with_grad, SCALE_MODE=mode, BLOCK=block, num_warps=warps,
            )
    return loss, lse, grad


def _rows_impl(*tensors: Tensor):
    return cross_entropy_rows_triton if use_triton(*tensors) else cross_entropy_rows_reference


def _mean_scale(target: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """``(n_valid, 1 / max(n_valid, 1))`` as device tensors (no host sync)."""
    n_valid = (target != ignore_index).sum()
    return n_valid, 1.0 / n_valid.clamp(min=1).to(torch.float32)


def _reduce(row_loss: Tensor, n_valid: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return row_loss
    total = row_loss.sum()
    return total / n_valid.to(torch.float32) if reduction == "mean" else total


# --------------------------------------------------------------------------- cross_entropy op


def _cross_entropy_forward(
    logits: Tensor, target: Tensor, ignore_index: int, reduction: str, with_grad: bool
) -> tuple[Tensor, Tensor]:
    n_rows, n_cols = logits.shape
    n_valid, inv = _mean_scale(target, ignore_index)
    scale = inv if reduction == "mean" else None
    if use_triton(logits, target):
        row_loss, _, grad = cross_entropy_rows_triton(logits, target, ignore_index, scale, with_grad)
        return _reduce(row_loss, n_valid, reduction), grad
    # reference path: row chunks bound the fp32 temporaries
    row_loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format) if with_grad else logits.new_empty(0)
    step = max(1, _REFERENCE_ELEMENTS // max(n_cols, 1))
    for start in range(0, n_rows, step):
        end = min(n_rows, start + step)
        out = grad[start:end] if with_grad else None
        row_loss[start:end] = cross_entropy_rows_reference(
            logits[start:end], target[start:end], ignore_index, scale, with_grad, out
        )[0]
    return _reduce(row_loss, n_valid, reduction), grad


@torch.library.custom_op("zerograph::cross_entropy", mutates_args=())
def _cross_entropy_op(
    logits: Tensor, target: Tensor, ignore_index: int, reduction: str, with_grad: bool
) -> tuple[Tensor, Tensor]:
    """``(loss in fp32, d loss / d logits for grad_output 1 or an empty tensor)``."""
    return _cross_entropy_forward(logits, target, ignore_index, reduction, with_grad)


@_cross_entropy_op.register_fake
def _(logits, target, ignore_index, reduction, with_grad):
    shape = (logits.shape[0],) if reduction == "none" else ()
    grad = logits.new_empty(logits.shape) if with_grad else logits.new_empty(0)
    return logits.new_empty(shape, dtype=torch.float32), grad


def _ce_setup_context(ctx, inputs, output) -> None:
    logits, _, _, reduction, with_grad = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zero (N, V) tangent for the gradient output
    ctx.save_for_backward(output[1])
    ctx.reduction = reduction
    ctx.with_grad = with_grad


def _scale_(grad: Tensor, grad_output: Tensor) -> Tensor:
    """``grad * grad_output`` (a 0-dim ``grad_output`` for mean/sum, else one per row).

    Eagerly in place (the saved gradient is the op's private scratch output, so
    no second copy exists); when traced (fake/functional tensors) out of place,
    which the graph compiler may reuse in place itself."""
    scale = grad_output.unsqueeze(-1) if grad_output.dim() else grad_output
    traced = torch.compiler.is_compiling() or type(grad) is not Tensor or type(grad_output) is not Tensor
    return (grad * scale).to(grad.dtype) if traced else grad.mul_(scale)


def _ce_backward(ctx, grad_loss: Tensor | None, _unused: Tensor | None):
    if not ctx.with_grad:
        raise RuntimeError(
            "zerograph::cross_entropy was called with with_grad=False but its loss is being "
            "differentiated; call zerograph.kernels.cross_entropy.cross_entropy, which sets it"
        )
    (grad,) = ctx.saved_tensors
    if grad_loss is None:
        return None, None, None, None, None
    return _scale_(grad, grad_loss), None, None, None, None


_cross_entropy_op.register_autograd(_ce_backward, setup_context=_ce_setup_context)


# --------------------------------------------------------------------------- linear_cross_entropy ops


def chunk_rows_for(n_rows: int, hidden: int, vocab: int) -> int:
    """Rows per chunk of :func:`linear_cross_entropy`: a chunk's logits are about
    an eighth of the weight (``hidden / 8`` rows, at least 64), all rows if fewer.
    (A quarter measured 0.26x eager's peak at N=4096, H=4096, V=128256 on an
    H100; an eighth keeps it under the 1/4 target.)"""
    return max(1, min(n_rows, max(64, hidden // 8)))


def linear_cross_entropy_chunked(
    hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None, ignore_index: int,
    scale: Tensor | None, with_grad: bool, need_hidden: bool, need_weight: bool, need_bias: bool,
    chunk_rows: int | None = None, rows_fn=None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One pass over row chunks: ``(row_loss fp32, grad_hidden, grad_weight, grad_bias)``.

    Each chunk: ``logits = hidden[c] @ weight.T (+ bias)`` in the compute dtype;
    the row kernel (Triton on CUDA, else the reference) writes
    ``(softmax - onehot) * scale`` over it in place; then
    ``grad_hidden[c] = g @ weight``, ``grad_weight += g.T @ hidden[c]``,
    ``grad_bias += g.sum(0)`` (fp32). Gradients not asked for are empty.
    ``chunk_rows`` and ``rows_fn`` (the per-chunk row function) override the
    defaults (tests: small chunks, the Triton kernel under the interpreter)."""
    n_rows, n_hidden = hidden.shape
    vocab = weight.shape[0]
    rows_fn = rows_fn or _rows_impl(hidden, weight, target)
    step = chunk_rows or chunk_rows_for(n_rows, n_hidden, vocab)
    row_loss = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)

    def empty() -> Tensor:  # a fresh one each: op outputs must not alias
        return hidden.new_empty(0)

    grad_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format) if with_grad and need_hidden else empty()
    grad_weight = torch.zeros_like(weight, memory_format=torch.contiguous_format) if with_grad and need_weight else empty()
    grad_bias = torch.zeros(vocab, dtype=torch.float32, device=hidden.device) if with_grad and need_bias else empty()
    weight_t = weight.t()
    for start in range(0, n_rows, step):
        end = min(n_rows, start + step)
        h = hidden[start:end]
        logits = torch.addmm(bias, h, weight_t) if bias is not None else torch.mm(h, weight_t)
        chunk_scale = scale[start:end] if scale is not None and scale.dim() else scale
        row_loss[start:end] = rows_fn(
            logits, target[start:end], ignore_index, chunk_scale, with_grad, logits if with_grad else None
        )[0]
        if not with_grad:
            continue
        if need_hidden:
            torch.mm(logits, weight, out=grad_hidden[start:end])
        if need_weight:
            grad_weight.addmm_(logits.t(), h)
        if need_bias:
            grad_bias += logits.sum(0, dtype=torch.float32)
    if with_grad and need_bias:
        grad_bias = grad_bias.to(bias.dtype)
    return row_loss, grad_hidden, grad_weight, grad_bias


@torch.library.custom_op("zerograph::linear_cross_entropy", mutates_args=())
def _linear_ce_op(
    hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor], ignore_index: int, reduction: str,
    need_hidden: bool, need_weight: bool, need_bias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(loss fp32, grad_hidden, grad_weight, grad_bias)``; the gradients (for
    grad_output 1) only for mean/sum and when asked for, else empty tensors."""
    n_valid, inv = _mean_scale(target, ignore_index)
    with_grad = reduction != "none" and (need_hidden or need_weight or need_bias)
    row_loss, gh, gw, gb = linear_cross_entropy_chunked(
        hidden, weight, target, bias, ignore_index, inv if reduction == "mean" else None,
        with_grad, need_hidden, need_weight, need_bias and bias is not None,
    )
    return _reduce(row_loss, n_valid, reduction), gh, gw, gb


@_linear_ce_op.register_fake
def _(hidden, weight, target, bias, ignore_index, reduction, need_hidden, need_weight, need_bias):
    with_grad = reduction != "none"
    shape = (hidden.shape[0],) if reduction == "none" else ()
    return (
        hidden.new_empty(shape, dtype=torch.float32),
        hidden.new_empty(hidden.shape) if with_grad and need_hidden else hidden.new_empty(0),
        weight.new_empty(weight.shape) if with_grad and need_weight else hidden.new_empty(0),
        bias.new_empty(bias.shape) if with_grad and need_bias and bias is not None else hidden.new_empty(0),
    )


@torch.library.custom_op("zerograph::linear_cross_entropy_backward", mutates_args=())
def _linear_ce_backward_op(
    grad_loss: Tensor, hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor], ignore_index: int,
    need_hidden: bool, need_weight: bool, need_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients for a per-row ``grad_loss`` (reduction "none"), recomputing the chunks."""
    _, gh, gw, gb = linear_cross_entropy_chunked(
        hidden, weight, target, bias, ignore_index, grad_loss.float(), True,
        need_hidden, need_weight, need_bias and bias is not None,
    )
    return gh, gw, gb


@_linear_ce_backward_op.register_fake
def _(grad_loss, hidden, weight, target, bias, ignore_index, need_hidden, need_weight, need_bias):
    return (
        hidden.new_empty(hidden.shape) if need_hidden else hidden.new_empty(0),
        weight.new_empty(weight.shape) if need_weight else hidden.new_empty(0),
        bias.new_empty(bias.shape) if need_bias and bias is not None else hidden.new_empty(0),
    )


def _lce_setup_context(ctx, inputs, output) -> None:
    hidden, weight, target, bias, ignore_index, reduction, need_hidden, need_weight, need_bias = inputs
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # no zero tangents for the gradient outputs
    ctx.reduction = reduction
    ctx.ignore_index = ignore_index
    ctx.needs = (need_hidden, need_weight, need_bias)
    if reduction == "none":
        ctx.save_for_backward(hidden, weight, target, bias)
    else:
        ctx.save_for_backward(*output[1:])


def _lce_backward(ctx, grad_loss: Tensor | None, *_unused: Tensor | None):
    if grad_loss is None:
        return (None,) * 9
    need_hidden, need_weight, need_bias = ctx.needs
    asked = ctx.needs_input_grad
    if (asked[0] and not need_hidden) or (asked[1] and not need_weight) or (asked[3] and not need_bias):
        raise RuntimeError(
            "zerograph::linear_cross_entropy was called without computing a gradient that is now needed; "
            "call zerograph.kernels.cross_entropy.linear_cross_entropy, which sets need_* from requires_grad"
        )
    if ctx.reduction == "none":
        hidden, weight, target, bias = ctx.saved_tensors
        gh, gw, gb = torch.ops.zerograph.linear_cross_entropy_backward(
            grad_loss, hidden, weight, target, bias, ctx.ignore_index, need_hidden, need_weight, need_bias
        )
    else:
        gh, gw, gb = ctx.saved_tensors
        gh, gw, gb = (_scale_(g, grad_loss) if g.numel() else g for g in (gh, gw, gb))
    return (
        gh if asked[0] else None, gw if asked[1] else None, None, gb if asked[3] else None,
        None, None, None, None, None,
    )


_linear_ce_op.register_autograd(_lce_backward, setup_context=_lce_setup_context)


# --------------------------------------------------------------------------- public functions


def _loss_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The logits' dtype, or fp32 under autocast (``F.cross_entropy`` autocasts to fp32)."""
    return torch.float32 if torch.is_autocast_enabled(device.type) else dtype


def _check_target(target: Tensor, n_rows: int, name: str, *others: Tensor | None) -> None:
    devices = {t.device for t in (target, *others) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"{name}: all tensors must be on one device, got {sorted(map(str, devices))}")
    if target.shape != (n_rows,):
        raise ValueError(f"{name}: target must have shape ({n_rows},), got {tuple(target.shape)}")
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name}: target must hold class indices (int64 or int32), got {target.dtype}")


def cross_entropy(logits: Tensor, target: Tensor, ignore_index: int = -100, reduction: str = "mean") -> Tensor:
    """``F.cross_entropy(logits, target, ignore_index=..., reduction=...)`` for
    ``(N, V)`` logits (bf16/fp16/fp32, accumulated in fp32) and ``(N,)`` class
    indices. ``"mean"`` averages over non-ignored targets (NaN when all are
    ignored, like PyTorch). Differentiable in ``logits``; the gradient is
    computed in the forward pass when ``logits`` requires grad."""
    _check_reduction(reduction, "cross_entropy")
    if logits.dim() != 2:
        raise ValueError(
            f"cross_entropy: logits must be 2-D (N, V), got shape {tuple(logits.shape)}; "
            "flatten with logits.reshape(-1, logits.shape[-1]) and target.reshape(-1)"
        )
    if not logits.is_floating_point():
        raise TypeError(f"cross_entropy: logits must be floating point, got {logits.dtype}")
    _check_target(target, logits.shape[0], "cross_entropy", logits)
    with_grad = torch.is_grad_enabled() and logits.requires_grad
    loss, _ = torch.ops.zerograph.cross_entropy(logits, target, int(ignore_index), reduction, with_grad)
    return loss.to(_loss_dtype(logits.dtype, logits.device))


def linear_cross_entropy(
    hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None,
    ignore_index: int = -100, reduction: str = "mean",
) -> Tensor:
    """``F.cross_entropy(hidden @ weight.T + bias, target, ...)`` without
    materializing the ``(N, V)`` logits (see the module docstring for memory).

    ``hidden``: ``(N, H)``; ``weight``: ``(V, H)`` (an ``nn.Linear``/lm_head
    weight); ``bias``: ``(V,)`` or ``None``; ``target``: ``(N,)``. Under autocast
    the matmuls run in the autocast dtype. Differentiable in ``hidden``,
    ``weight`` and ``bias``."""
    name = "linear_cross_entropy"
    _check_reduction(reduction, name)
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"{name}: hidden must be (N, H) and weight (V, H), got {tuple(hidden.shape)} and {tuple(weight.shape)}; "
            "flatten hidden with hidden.reshape(-1, hidden.shape[-1])"
        )
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"{name}: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    _check_target(target, hidden.shape[0], name, hidden, weight, bias)
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    dtypes = {t.dtype for t in (hidden, weight, bias) if t is not None}
    if len(dtypes) != 1 or not hidden.is_floating_point():
        raise TypeError(
            f"{name}: hidden, weight and bias must share one floating-point dtype, got {sorted(map(str, dtypes))}; "
            "cast them, or run under torch.autocast"
        )
    grad = torch.is_grad_enabled()
    loss, *_ = torch.ops.zerograph.linear_cross_entropy(
        hidden, weight, target, bias, int(ignore_index), reduction,
        grad and hidden.requires_grad, grad and weight.requires_grad,
        grad and bias is not None and bias.requires_grad,
    )
    return loss.to(_loss_dtype(hidden.dtype, hidden.device))
