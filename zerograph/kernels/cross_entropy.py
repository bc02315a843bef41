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

This module holds ``cross_entropy`` and its op; ``linear_cross_entropy`` and
its ops are in :mod:`~zerograph.kernels.linear_cross_entropy`, the row kernel,
references and shared helpers in :mod:`~zerograph.kernels.cross_entropy_rows`.
Every public name stays importable from here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from zerograph.kernels._common import HAS_TRITON, use_triton
from zerograph.kernels.cross_entropy_rows import (
    REDUCTIONS,  # noqa: F401 (re-exported)
    _check_reduction,
    _check_target,
    _loss_dtype,
    _mean_scale,
    _reduce,
    _scale_,
    cross_entropy_reference,
    cross_entropy_rows_reference,
    cross_entropy_rows_triton,
)
from zerograph.kernels.linear_cross_entropy import (
    chunk_rows_for,
    linear_cross_entropy,
    linear_cross_entropy_chunked,
    linear_cross_entropy_reference,
)

if HAS_TRITON:
    from zerograph.kernels.cross_entropy_rows import _ce_rows_kernel  # noqa: F401 (tests compile it by this name)

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

# Rows per chunk of the pure-torch cross-entropy path: bounds its fp32 temporaries.
_REFERENCE_ELEMENTS = 1 << 24


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


# --------------------------------------------------------------------------- public function


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
