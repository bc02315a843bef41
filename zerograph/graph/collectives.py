"""The op sequences that move parameters and gradients between ranks.

Each function here is written with explicit ATen and functional-collective
ops so that the *same* code runs eagerly on tensors (inside the marker ops'
implementations, for code outside compiled regions) and symbolically on
``torch.fx.Proxy`` objects (inside the lowering passes, which emit exactly
these nodes into the graph).

``gather_param`` emits, for a sharded parameter of ``R`` rows on ``W`` ranks::

    shard  = aten._to_copy(shard, device=<compute device>, non_blocking=True)  # only with offload_param
    cast   = aten._to_copy(shard, dtype=compute)        # only if dtypes differ
    padded = aten.constant_pad_nd(cast, [0, 0, 0, p])   # only if R % W != 0
    ag     = _c10d_functional.all_gather_into_tensor(padded, W, group)
    full   = _c10d_functional.wait_tensor(ag)
    full   = aten.slice(full, 0, 0, R)                  # only if padded

``reduce_param_grad`` emits, for ``reduce_scatter``::

    g32    = aten._to_copy(grad, dtype=master)          # only if dtypes differ
    padded = aten.constant_pad_nd(g32, [0, 0, 0, p])    # only if padded
    rs     = _c10d_functional.reduce_scatter_tensor(padded, "sum", W, group)
    shard  = _c10d_functional.wait_tensor(rs)
    shard  = aten.slice(shard, 0, 0, local_rows)        # only if padded
    shard  = aten.mul(shard, 1 / (W * accumulation))
    shard  = aten._to_copy(shard, device=cpu)           # only with offload_param

With ``offload_param`` (``spec.compute_device`` set) the stored shard is in
host memory: the first copy brings it to the compute device right before the
gather's input is prepared (the scheduler moves it with the gather's prefetch),
and the gradient shard goes back to the host (a blocking copy: autograd
accumulates it and the optimizer reads it there). Both are ``host_copy`` nodes.
"""

from __future__ import annotations

from typing import Callable

import torch

from zerograph._torch_private import c10d_functional
from zerograph.runtime.offload import HOST
from zerograph.runtime.specs import ParamSpec

aten = torch.ops.aten

# Called with (role, node_or_tensor) for every emitted op, so the lowering
# passes can tag the nodes they insert. ``role`` is a metadata role; the
# keyword ``location="host"`` marks an op whose output is in host memory
# (NodeTag.location).
Emit = Callable[..., object]


def _noop_emit(_role: str, value: object, **_tag: object) -> object:
    return value


def _cast(x, dtype: torch.dtype, src: torch.dtype, emit: Emit):
    if dtype == src:
        return x
    return emit("comm_prep", aten._to_copy.default(x, dtype=dtype))


def _pad_dim0(x, spec: ParamSpec, pad: int, emit: Emit):
    if pad == 0:
        return x
    widths = [0, 0] * (len(spec.full_shape) - 1) + [0, pad]
    return emit("comm_prep", aten.constant_pad_nd.default(x, widths, 0.0))


def _to_compute_device(shard, spec: ParamSpec, emit: Emit):
    """offload_param: the host shard copied to the compute device (asynchronously
    from pinned memory on an accelerator)."""
    if spec.compute_device is None:
        return shard
    return emit("host_copy", aten._to_copy.default(shard, device=spec.compute_device, non_blocking=True))


def _to_host(grad_shard, spec: ParamSpec, emit: Emit):
    """offload_param: the reduced gradient shard copied back to host memory."""
    if spec.compute_device is None:
        return grad_shard
    return emit("host_copy", aten._to_copy.default(grad_shard, device=HOST), location="host")


def gather_param(shard, spec: ParamSpec, emit: Emit = _noop_emit):
    """The full parameter in ``spec.compute_dtype`` from this rank's shard."""
    x = _to_compute_device(shard, spec, emit)
    x = _cast(x, spec.compute_dtype, spec.master_dtype, emit)
    if spec.storage == "replicated" or spec.world_size == 1:
        return x
    x = _pad_dim0(x, spec, spec.chunk_rows - spec.local_rows, emit)
    x = emit("all_gather", c10d_functional.all_gather_into_tensor.default(x, spec.world_size, spec.group_name))
    x = emit("wait", c10d_functional.wait_tensor.default(x))
    if spec.chunk_rows * spec.world_size != spec.full_rows:
        x = emit("comm_prep", aten.slice.Tensor(x, 0, 0, spec.full_rows))
    return x


def reduce_param_grad(grad, spec: ParamSpec, emit: Emit = _noop_emit):
    """This rank's shard of the data-parallel average of ``grad`` (full size)."""
    x = _cast(grad, spec.master_dtype, spec.compute_dtype, emit)
    if spec.world_size == 1:
        pass
    elif spec.grad_reduce == "reduce_scatter":
        x = _pad_dim0(x, spec, spec.chunk_rows * spec.world_size - spec.full_rows, emit)
        x = emit(
            "reduce_scatter",
            c10d_functional.reduce_scatter_tensor.default(x, "sum", spec.world_size, spec.group_name),
        )
        x = emit("wait", c10d_functional.wait_tensor.default(x))
        if spec.local_rows != spec.chunk_rows:
            x = emit("comm_prep", aten.slice.Tensor(x, 0, 0, spec.local_rows))
    else:
        x = emit("all_reduce", c10d_functional.all_reduce.default(x, "sum", spec.group_name))
        x = emit("wait", c10d_functional.wait_tensor.default(x))
        if spec.grad_reduce == "all_reduce_slice" and spec.local_rows != spec.full_rows:
            x = emit("comm_prep", aten.slice.Tensor(x, 0, spec.row_start, spec.row_start + spec.local_rows))
    if spec.grad_scale != 1.0:
        x = emit("comm_prep", aten.mul.Tensor(x, spec.grad_scale))
    return _to_host(x, spec, emit)


def _flat(x, numel: int):
    return aten.view.default(x, [numel])


def gather_bucket(shards, specs: list[ParamSpec], emit: Emit = _noop_emit) -> list:
    """Full parameters for several sharded parameters with one all-gather.

    Each rank packs its padded shards into one flat buffer of ``S`` elements
    (the same layout on every rank); the gathered ``[W * S]`` buffer is viewed
    as ``[W, S]`` and each parameter's ``[W, chunk]`` column block is copied
    out into its full shape::

        buf  = aten.cat([view(pad(cast(shard_i)), [chunk_i]) ...])
        ag   = _c10d_functional.all_gather_into_tensor(buf, W, group)
        full = aten.view(wait_tensor(ag), [W, S])
        p_i  = aten.slice(view(clone(aten.slice(full, 1, off_i, off_i + chunk_i)), [W * rows_i, ...]), 0, 0, R_i)
    """
    world = specs[0].world_size
    flats = []
    for x, spec in zip(shards, specs):
        x = _to_compute_device(x, spec, emit)
        x = _cast(x, spec.compute_dtype, spec.master_dtype, emit)
        x = _pad_dim0(x, spec, spec.chunk_rows - spec.local_rows, emit)
        flats.append(emit("comm_prep", _flat(x, spec.chunk_rows * spec.row_numel)))
    total = sum(s.chunk_rows * s.row_numel for s in specs)
    buf = emit("comm_prep", aten.cat.default(flats))
    x = emit("all_gather", c10d_functional.all_gather_into_tensor.default(buf, world, specs[0].group_name))
    x = emit("wait", c10d_functional.wait_tensor.default(x))
    full = emit("comm_prep", aten.view.default(x, [world, total]))
    outs, offset = [], 0
    for spec in specs:
        chunk = spec.chunk_rows * spec.row_numel
        part = emit("comm_prep", aten.slice.Tensor(full, 1, offset, offset + chunk))
        part = emit("comm_prep", aten.clone.default(part, memory_format=torch.contiguous_format))
        part = emit("comm_prep", aten.view.default(part, [world * spec.chunk_rows, *spec.full_shape[1:]]))
        if world * spec.chunk_rows != spec.full_rows:
            part = emit("comm_prep", aten.slice.Tensor(part, 0, 0, spec.full_rows))
        outs.append(part)
        offset += chunk
    return outs


def reduce_bucket(grads, specs: list[ParamSpec], emit: Emit = _noop_emit) -> list:
    """Gradient shards for several parameters with one collective.

    ``reduce_scatter``: each full gradient, padded to ``W * chunk_rows`` rows,
    is viewed as ``[W, chunk]``; the blocks are concatenated along dim 1 so
    rank ``r``'s slice of the flat buffer holds its rows of every parameter::

        buf  = aten.cat([view(pad(cast(g_i)), [W, chunk_i]) ...], 1)
        rs   = _c10d_functional.reduce_scatter_tensor(view(buf, [W * S]), "sum", W, group)
        out  = aten.mul(wait_tensor(rs), 1 / (W * accumulation))
        g'_i = aten.slice(view(aten.slice(out, 0, off_i, off_i + chunk_i), [rows_i, ...]), 0, 0, local_rows_i)

    ``all_reduce`` / ``all_reduce_slice`` (stages 0-1): the flat full
    gradients are concatenated, all-reduced once and split again.
    """
    first = specs[0]
    world = first.world_size
    scatter = first.grad_reduce == "reduce_scatter"
    parts = []
    for g, spec in zip(grads, specs):
        g = _cast(g, spec.master_dtype, spec.compute_dtype, emit)
        if scatter:
            g = _pad_dim0(g, spec, spec.chunk_rows * world - spec.full_rows, emit)
            parts.append(emit("comm_prep", aten.view.default(g, [world, spec.chunk_rows * spec.row_numel])))
        else:
            parts.append(emit("comm_prep", _flat(g, spec.numel)))
    if scatter:
        total = sum(s.chunk_rows * s.row_numel for s in specs)
        buf = emit("comm_prep", aten.cat.default(parts, 1))
        buf = emit("comm_prep", _flat(buf, world * total))
        x = emit("reduce_scatter", c10d_functional.reduce_scatter_tensor.default(buf, "sum", world, first.group_name))
    else:
        buf = emit("comm_prep", aten.cat.default(parts))
        x = emit("all_reduce", c10d_functional.all_reduce.default(buf, "sum", first.group_name))
    x = emit("wait", c10d_functional.wait_tensor.default(x))
    if first.grad_scale != 1.0:
        x = emit("comm_prep", aten.mul.Tensor(x, first.grad_scale))
    x = _to_host(x, first, emit)  # one copy of the bucket's reduced shards
    outs, offset = [], 0
    for spec in specs:
        size = spec.chunk_rows * spec.row_numel if scatter else spec.numel
        part = emit("comm_prep", aten.slice.Tensor(x, 0, offset, offset + size))
        if scatter:
            part = emit("comm_prep", aten.view.default(part, [spec.chunk_rows, *spec.full_shape[1:]]))
            if spec.local_rows != spec.chunk_rows:
                part = emit("comm_prep", aten.slice.Tensor(part, 0, 0, spec.local_rows))
        else:
            part = emit("comm_prep", aten.view.default(part, list(spec.full_shape)))
            if spec.grad_reduce == "all_reduce_slice" and spec.local_rows != spec.full_rows:
                part = emit("comm_prep", aten.slice.Tensor(part, 0, spec.row_start, spec.row_start + spec.local_rows))
        outs.append(part)
        offset += size
    return outs
