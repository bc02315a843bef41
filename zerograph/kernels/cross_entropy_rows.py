"""The row-level core the cross-entropy ops share: per-row losses, logsumexps
and gradients ``(softmax - onehot) * scale`` (:func:`cross_entropy_rows_triton`,
one Triton program per row; :func:`cross_entropy_rows_reference`, its pure-torch
contract), the fp32 test oracle :func:`cross_entropy_reference`, and the
checks, reductions and in-place gradient scaling that
:mod:`zerograph.kernels.cross_entropy` and
:mod:`zerograph.kernels.linear_cross_entropy` both use."""

from __future__ import annotations


import torch
from torch import Tensor

from zerograph.kernels._common import HAS_TRITON, device_guard, require_triton, tl, triton, use_triton

__all__ = ["REDUCTIONS", "cross_entropy_reference", "cross_entropy_rows_reference", "cross_entropy_rows_triton"]

REDUCTIONS = ("mean", "sum", "none")


def _check_reduction(reduction: str, name: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{name}: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


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


# --------------------------------------------------------------------------- references


def cross_entropy_reference(logits: Tensor, target: Tensor, ignore_index: int = -100, reduction: str = "mean") -> Tensor:
    """``F.cross_entropy`` computed in fp32, returned in the logits' dtype
    (differentiable): the test oracle."""
    loss = torch.nn.functional.cross_entropy(logits.float(), target.long(), ignore_index=ignore_index, reduction=reduction)
    return loss.to(logits.dtype)


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
        with device_guard(logits):
            _ce_rows_kernel[(n_rows,)](
                logits, logits.stride(0), target, loss, lse, grad, grad.stride(0) if with_grad else 0,
                scale_arg, n_cols, ignore_index,
                WITH_GRAD=with_grad, SCALE_MODE=mode, BLOCK=block, num_warps=warps,
            )
    return loss, lse, grad


def _rows_impl(*tensors: Tensor):
    return cross_entropy_rows_triton if use_triton(*tensors) else cross_entropy_rows_reference


# --------------------------------------------------------------------------- reductions and gradient scaling


def _mean_scale(target: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """``(n_valid, 1 / max(n_valid, 1))`` as device tensors (no host sync)."""
    n_valid = (target != ignore_index).sum()
    return n_valid, 1.0 / n_valid.clamp(min=1).to(torch.float32)


def _reduce(row_loss: Tensor, n_valid: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return row_loss
    total = row_loss.sum()
    return total / n_valid.to(torch.float32) if reduction == "mean" else total


def _scale_(grad: Tensor, grad_output: Tensor) -> Tensor:
    """``grad * grad_output`` (a 0-dim ``grad_output`` for mean/sum, else one per row).

    Eagerly in place (the saved gradient is the op's private scratch output, so
    no second copy exists); when traced (fake/functional tensors) out of place,
    which the graph compiler may reuse in place itself."""
    scale = grad_output.unsqueeze(-1) if grad_output.dim() else grad_output
    traced = torch.compiler.is_compiling() or type(grad) is not Tensor or type(grad_output) is not Tensor
    return (grad * scale).to(grad.dtype) if traced else grad.mul_(scale)
