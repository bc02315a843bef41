"""What every kernel module shares: whether Triton can run, and on which tensors.

Kernels dispatch per call:

* CUDA tensors and Triton importable -> the Triton launcher;
* anything else (CPU training runs) -> the pure-torch reference.

Tests exercise the Triton launchers on CPU tensors with ``TRITON_INTERPRET=1``
(set before the kernel modules are imported; ``tests/conftest.py`` does it),
calling the launchers directly.
"""

from __future__ import annotations

import contextlib
import os

import torch

try:  # Triton is optional: CPU-only installs run the references.
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only without triton
    triton = None
    tl = None
    HAS_TRITON = False


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether an op on ``tensors`` should run its Triton kernel (all on CUDA)."""
    return HAS_TRITON and all(t.is_cuda for t in tensors if t is not None)


def triton_runnable(*tensors: torch.Tensor) -> bool:
    """Whether a Triton launcher can run on ``tensors`` at all: CUDA, or the interpreter."""
    return HAS_TRITON and (all(t.is_cuda for t in tensors if t is not None) or interpreting())


def require_triton(*tensors: torch.Tensor) -> None:
    """Raise a clear error when a launcher is called where Triton cannot run."""
    if not triton_runnable(*tensors):
        raise RuntimeError(
            "this Triton launcher needs CUDA tensors (or TRITON_INTERPRET=1 on CPU); "
            "call the op's public function, which falls back to the pure-torch reference"
        )



def as_rows(t: torch.Tensor, n_cols: int | None = None) -> torch.Tensor:
    """``t`` as a 2-D ``(rows, n_cols)`` tensor whose rows are contiguous (a
    view when possible); ``n_cols`` defaults to the last dimension."""
    if n_cols is None:
        n_cols = t.shape[-1] if t.dim() else 1
    t2 = t.reshape(-1, n_cols)
    if n_cols > 1 and t2.stride(-1) != 1:
        t2 = t2.contiguous()
    return t2


def device_guard(t: torch.Tensor):
    """Launch Triton kernels on ``t``'s GPU, whatever the current device is (nothing on the CPU)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
