"""Linear + cross-entropy without the ``(N, V)`` logits: the public function
:func:`linear_cross_entropy`, its row-chunk loop
:func:`linear_cross_entropy_chunked`, and the ``zerograph::linear_cross_entropy``
and ``zerograph::linear_cross_entropy_backward`` ops with their autograd. The
memory it holds and its numerics are in :mod:`zerograph.kernels.cross_entropy`'s
docstring; the row kernel is :mod:`zerograph.kernels.cross_entropy_rows`."""

from __future__ import annotations

from typing import Optional  # custom_op schemas: the spelling every supported torch parses

import torch
from torch import Tensor

from zerograph.kernels.cross_entropy_rows import (
    _check_reduction,
    _check_target,
    _loss_dtype,
    _mean_scale,
    _reduce,
    _rows_impl,
    _scale_,
    cross_entropy_reference,
)

__all__ = ["chunk_rows_for", "linear_cross_entropy", "linear_cross_entropy_chunked", "linear_cross_entropy_reference"]


def linear_cross_entropy_reference(
    hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None,
    ignore_index: int = -100, reduction: str = "mean",
) -> Tensor:
    """``F.cross_entropy(F.linear(hidden, weight, bias).float(), ...)`` in the
    logits' dtype (differentiable; materializes the logits): the test oracle."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    return cross_entropy_reference(logits, target, ignore_index, reduction)


# --------------------------------------------------------------------------- chunked loop


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


# --------------------------------------------------------------------------- ops


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


# --------------------------------------------------------------------------- public function


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
