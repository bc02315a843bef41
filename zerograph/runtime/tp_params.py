"""Tensor-parallel parameters as 2-D DTensors on the ``("dp", "tp")`` mesh.

With ``tensor_parallel.autotp_size`` > 1 every parameter the user sees
(``model.parameters()``, ``param.grad``, ``state_dict()``, the optimizer's
states) is a DTensor on the 2-D mesh ``("dp", "tp")``: ``"dp"`` is ZeRO's
group (with Ulysses ``sequence_parallel_size`` its dp x sp ranks, with
pipeline stages the ranks of this rank's stage), ``"tp"`` the
tensor-parallel group. The local tensor (``to_local()``) is what the lowered
graphs read and write, as before: ZeRO's rows (``torch.chunk`` order over dp)
of this rank's tp slice (:class:`~zerograph.runtime.tp_layout.TpLayout`).

Placements ``(dp, tp)``, in DTensor's left-to-right convention:

==============================================  ========================  =======================
parameter                                       ZeRO stores shards         ZeRO stores it whole
==============================================  ========================  =======================
not split (norms, ...)                          ``Shard(0), Replicate()``  ``Replicate(), Replicate()``
column / vocab split (tp cuts dim 0)            ``_StridedShard(0, sf=tp), Shard(0)``  ``Replicate(), Shard(0)``
row split (tp cuts dim 1)                       ``Shard(0), Shard(1)``     ``Replicate(), Shard(1)``
fused, equal parts, tp cuts dim d > 0           ``Shard(0), _StridedShard(d, sf=parts)``  ``Replicate(), _StridedShard(d, sf=parts)``
fused, equal parts, tp cuts dim 0               *stacked* (below)          ``Replicate(), _StridedShard(0, sf=parts)``
fused, unequal parts                            *stacked*                  *stacked*
key/value heads on every tp rank (replicas=tp)  ``Shard(0), Replicate()``  ``Replicate(), Replicate()``
==============================================  ========================  =======================

``_StridedShard(0, sf=tp)`` on dp says "tp cut dim 0 first, ZeRO then cut
this rank's slice" (torch's FSDP2 + TP convention); uneven ZeRO rows are
fine. For all of these ``full_tensor()`` is the user's whole parameter.

Not expressible by a placement on this mesh (decided here, documented in
docs/tensor_parallel.md):

* *stacked*: a fused weight whose per-part slices ZeRO cuts along the same
  dim (``[q_i | k_i | v_i]`` rows 0..r of a ``[3C, C]`` qkv: a ZeRO chunk
  crosses part boundaries), or whose parts differ in size. Its placements
  are those of a plain column/row split, so the DTensor stands for the tp
  slices stacked in tp-rank order along the cut dim (``[q_0 k_0 v_0 | q_1
  k_1 v_1]``): the same elements as the user's tensor in another order.
  Norms, ``clip_grad_norm_`` and element-wise optimizers are exact;
  ``full_tensor()`` is that permutation, and :func:`whole_tensor` (used by
  ``zerograph.full_state_dict``) reassembles the user's order.
* key/value heads on some but not all tp ranks (1 < replicas < tp): no
  placement on a 1-D ``tp`` dimension says "block ``i`` on ranks
  ``i*r..(i+1)*r-1``". Such a parameter keeps the tp-local form (a 1-D
  DTensor over dp, or a plain tensor at one dp rank); torch's
  ``clip_grad_norm_`` over a mix of meshes refuses it, zerograph's own
  ``gradient_clipping`` and every checkpoint path handle it.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard

from zerograph._torch_private import is_strided_shard, strided_shard
from zerograph.runtime.tp_layout import TpLayout

__all__ = ["TpPlacement", "param_mesh", "placement_for", "as_dtensor", "whole_tensor", "is_tp_dtensor",
           "dp_sharded", "tp_slice_offsets", "local_of_whole"]


@dataclasses.dataclass(frozen=True)
class TpPlacement:
    placements: tuple  # (dp placement, tp placement)
    exact: bool  # full_tensor() is the user's tensor; else the tp slices stacked in tp-rank order


def param_mesh(tp_group):
    """The 2-D ``("dp", "tp")`` mesh of ``tp_group``
    (:class:`zerograph.runtime.dist.TensorParallelGroup`): this rank's stage's,
    its "dp" being ZeRO's ranks (dp x sp) of each tp index
    (:func:`zerograph.runtime.mesh.build_mesh`)."""
    return tp_group.dp_tp_mesh


def placement_for(layout: TpLayout | None, dp_sharded_storage: bool) -> TpPlacement | None:
    """The ``(dp, tp)`` placements of a parameter (module doc's table), or
    None where it stays tp-local (1 < replicas < tp)."""
    dp = Shard(0) if dp_sharded_storage else Replicate()
    if layout is None or layout.blocks == 1:  # whole on every tp rank
        return TpPlacement((dp, Replicate()), True)
    if layout.replicas > 1:
        return None
    d, parts = layout.dim, layout.parts
    if len(parts) > 1 and len(set(parts)) == 1 and not (dp_sharded_storage and d == 0):
        return TpPlacement((dp, strided_shard(d, len(parts))), True)
    if dp_sharded_storage and d == 0:  # tp cut rows first, ZeRO cut this rank's slice
        dp = strided_shard(0, layout.size)
    return TpPlacement((dp, Shard(d)), len(parts) == 1)


def as_dtensor(local: torch.Tensor, mesh, placement: TpPlacement, whole_shape: tuple[int, ...]) -> DTensor:
    """``local`` (this rank's ZeRO rows of its tp slice) as the 2-D DTensor."""
    stride = torch.empty(whole_shape, device="meta").stride()
    return DTensor.from_local(local, mesh, placement.placements, run_check=False, shape=torch.Size(whole_shape),
                              stride=stride)


def whole_tensor(value: DTensor, layout: TpLayout | None, placement: TpPlacement) -> torch.Tensor:
    """The user's whole tensor (collective over the mesh)."""
    full = value.full_tensor()
    if placement.exact:
        return full
    return layout.assemble(list(full.chunk(layout.size, layout.dim)))


def is_tp_dtensor(t) -> bool:
    """``t`` is a DTensor on a mesh with a ``"tp"`` dimension."""
    return isinstance(t, DTensor) and "tp" in (t.device_mesh.mesh_dim_names or ())


def dp_sharded(placement) -> bool:
    """A dp placement that shards (``Shard`` or ``_StridedShard``)."""
    return placement.is_shard() or is_strided_shard(placement)


def tp_slice_offsets(value: DTensor, tp_slice_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Where ``value.to_local()`` starts in this rank's tp slice (ZeRO's
    ``torch.chunk`` rows over the mesh's ``"dp"`` dimension)."""
    offsets = [0] * len(tp_slice_shape)
    if tp_slice_shape and dp_sharded(value.placements[0]):
        mesh = value.device_mesh
        rows = tp_slice_shape[0]
        chunk = math.ceil(rows / mesh.size(0))
        offsets[0] = min(mesh.get_local_rank(0) * chunk, rows)
    return tuple(offsets)


def local_of_whole(whole: torch.Tensor, spec) -> torch.Tensor:
    """This rank's local data of a parameter given its whole tensor: the tp
    slice (``spec.tp``), then ZeRO's rows of it (a
    :class:`~zerograph.runtime.specs.ParamSpec`)."""
    data = spec.tp.local_part(whole) if spec.tp is not None else whole
    if spec.storage == "sharded" and data.dim():
        data = data.narrow(0, spec.row_start, spec.local_rows)
    return data
