"""The device mesh: one builder for every rank's process groups.

zerograph's ranks form one mesh with the dimensions ``("pp", "dp", "sp",
"tp")``, innermost last (:data:`zerograph.runtime.plan.MESH_DIMS`)::

    global rank = ((pp_i * dp + dp_i) * sp + sp_i) * tp + tp_i

:func:`build_mesh` creates it once from the sizes (pipeline stages,
sequence-parallel and tensor-parallel ranks; the data-parallel size is what
is left of the world) and hands out every group the runtime needs, for a
model with pipeline stages and one without alike:

=============  =============================================================
``dp``         the dp ranks of one (pp, sp, tp) index: they read different
               batch rows
``zero``       the ranks ZeRO shards over and averages gradients over: the
               dp x sp ranks of one (pp, tp) index (= ``dp`` without sp),
               in global-rank order
``sp``         the sp ranks of one (pp, dp, tp) index (Ulysses' all-to-alls)
``tp``         the tp ranks of one (pp, dp, sp) index (Megatron's
               all-reduces); ``tp.dp_tp_mesh`` is the stage's 2-D
               ``("dp", "tp")`` DeviceMesh whose "dp" is ``zero``'s ranks
stage group    every rank of one pp index (dp x sp x tp): the model's (a
               stage's) agreement, heartbeats and loss reductions
pipeline       the ranks with this rank's (dp, sp, tp) indices, one per
               stage: they exchange activations (``PipelineGroups.rank_of``)
=============  =============================================================

The ranks of one tp or sp group read the same batch rows. Dimensions of size
1 other than "dp" are left out of the DeviceMesh (no groups of one rank are
made for them). ZeRO++'s node groups are made per model from ``zero``
(:mod:`zerograph.runtime.hierarchy`).
"""

from __future__ import annotations

import dataclasses
import datetime
import logging

import torch
import torch.distributed as dist

from zerograph.config import ConfigError
from zerograph.runtime.dist import (
    DataParallelGroup,
    PipelineGroups,
    SequenceParallelGroup,
    TensorParallelGroup,
    apply_collective_timeout,
    default_device,
    ensure_process_group,
)
from zerograph.runtime.plan import MESH_DIMS, DeviceMeshPlan

log = logging.getLogger(__name__)

# the config key that sets each dimension's size
SIZE_KEYS = {"pp": "pipeline.stages", "sp": "sequence_parallel_size", "tp": "tensor_parallel.autotp_size"}
_NAMES = {"pp": "pipeline stages", "sp": "sequence-parallel ranks", "tp": "tensor-parallel ranks"}


def mesh_sizes(world: int, pp: int = 1, sp: int = 1, tp: int = 1) -> dict[str, int]:
    """The size of every mesh dimension for ``world`` ranks: the data-parallel
    size is ``world / (pp * sp * tp)``. Raises ConfigError naming the sizes
    and the fix when their product does not divide the world."""
    given = {"pp": pp, "sp": sp, "tp": tp}
    for dim, n in given.items():
        if n < 1:
            raise ConfigError(f"{SIZE_KEYS[dim]}={n}: the number of {_NAMES[dim]} must be at least 1")
    need = pp * sp * tp
    if world % need:
        raise ConfigError(_indivisible(world, given))
    return {"pp": pp, "dp": world // need, "sp": sp, "tp": tp}


def _indivisible(world: int, given: dict[str, int]) -> str:
    used = [(d, n) for d, n in given.items() if n > 1]
    need = 1
    for _, n in used:
        need *= n
    sizes = " x ".join(f"{SIZE_KEYS[d]}={n}" for d, n in used)
    if len(used) > 1:
        head = f"{sizes} needs a world size that is a multiple of {need}; this run has {world} rank(s)"
    elif used[0][0] == "pp":
        head = f"{sizes} needs a world size that is a multiple of it; this run has {world} rank(s)"
    else:
        head = f"{sizes} does not divide the world size {world}"
    layout = " x ".join(["data-parallel ranks"] + [_NAMES[d] for d, _ in used])
    keys = " or ".join(SIZE_KEYS[d] for d, _ in used)
    return (f"{head}: launch a multiple of {need} ranks (world = {layout}; e.g. {need * max(1, world // need)}), "
            f"or change {keys} so that {need if len(used) == 1 else 'their product'} divides {world}")


@dataclasses.dataclass(frozen=True)
class MeshGroups:
    """This rank's place on the ``("pp", "dp", "sp", "tp")`` mesh and every
    group the runtime needs (module docstring)."""

    layout: DeviceMeshPlan  # every dimension's size and this rank's index on it
    device: torch.device
    mesh: object | None  # the DeviceMesh: "pp" (pp > 1), "dp", "sp" (sp > 1), "tp" (tp > 1); None: one rank a stage
    dp: DataParallelGroup  # the dp ranks of one (pp, sp, tp) index
    zero: DataParallelGroup  # ZeRO's ranks: dp x sp of one (pp, tp) index
    sp: SequenceParallelGroup | None = None  # None: sp = 1
    tp: TensorParallelGroup | None = None  # None: tp = 1
    stage_group: object = None  # every rank of this rank's pp index (None: the default group)

    def size(self, dim: str) -> int:
        return self.layout.size(dim)

    def index(self, dim: str) -> int:
        return self.layout.index(dim)

    @property
    def dp_tp_mesh(self):
        """The 2-D ``("dp", "tp")`` DeviceMesh of this rank's stage, its "dp"
        being ZeRO's ranks (dp x sp of this rank's tp index); None without
        tensor parallelism."""
        return self.tp.dp_tp_mesh if self.tp is not None else None

    def pipeline(self) -> PipelineGroups:
        """The groups as pipeline stages read them."""
        return PipelineGroups(stage=self.index("pp"), stages=self.size("pp"), dp=self.dp, tp=self.tp, sp=self.sp,
                              zero=self.zero if self.sp is not None else None)


def _one_rank(device: torch.device) -> DataParallelGroup:
    return DataParallelGroup(rank=0, world_size=1, device=device, mesh=None, group_name="")


def _group(sub, rank: int, size: int, device: torch.device) -> DataParallelGroup:
    if size == 1:
        return _one_rank(device)
    return DataParallelGroup(rank=rank, world_size=size, device=device, mesh=sub, group_name=sub.get_group().group_name)


def build_mesh(pp: int = 1, sp: int = 1, tp: int = 1, *, timeout_s: float = 300.0, device: str | None = None,
               model_device: torch.device | None = None) -> MeshGroups:
    """The one mesh over every rank (collective: every rank calls it with
    the same sizes). ``device``: config ``zerograph.device``; every group
    gets ``timeout_s`` (``zerograph.collective_timeout_s``)."""
    ensure_process_group(timeout_s)
    dev = default_device(device, model_device)
    world = dist.get_world_size() if dist.is_initialized() else 1
    sizes = mesh_sizes(world, pp, sp, tp)
    rank = dist.get_rank() if dist.is_initialized() else 0
    coords, rest = {}, rank
    for dim in reversed(MESH_DIMS):
        rest, coords[dim] = divmod(rest, sizes[dim])
    layout = DeviceMeshPlan(sizes=tuple((d, sizes[d]) for d in MESH_DIMS), coords=tuple((d, coords[d]) for d in MESH_DIMS))
    dp, stage_ranks = sizes["dp"], sizes["dp"] * sp * tp
    if stage_ranks == 1:  # one rank per stage (or per run): no group but the default one
        if world > 1:
            apply_collective_timeout(dist.group.WORLD, timeout_s)
        one = _one_rank(dev)
        log.info("device mesh: %s; this rank is stage %d", layout.describe(), coords["pp"])
        return MeshGroups(layout=layout, device=dev, mesh=None, dp=one, zero=one)
    from torch.distributed.device_mesh import init_device_mesh

    names = tuple(d for d in MESH_DIMS if d == "dp" or sizes[d] > 1)
    mesh = init_device_mesh(dev.type, tuple(sizes[d] for d in names), mesh_dim_names=names)
    zero_mesh = mesh
    if sp > 1:  # ZeRO's ranks (dp x sp of one tp index) as one dimension, in global-rank order
        zero_names = tuple(d for d in names if d != "sp")
        zero_mesh = init_device_mesh(dev.type, tuple(dp * sp if d == "dp" else sizes[d] for d in zero_names),
                                     mesh_dim_names=zero_names)
    if len(names) > 1:  # stages exchange activations, tied gradients and the loss on the default group
        apply_collective_timeout(dist.group.WORLD, timeout_s)
    for d in names:
        apply_collective_timeout(mesh[d].get_group(), timeout_s)
    if zero_mesh is not mesh:
        for d in zero_names:
            apply_collective_timeout(zero_mesh[d].get_group(), timeout_s)
    dp_group = _group(mesh["dp"], coords["dp"], dp, dev)
    zero = _group(zero_mesh["dp"], coords["dp"] * sp + coords["sp"], dp * sp, dev)
    stage_group = None
    if pp > 1 and tp > 1:  # every rank creates every stage's (dp x sp x tp) group, in order
        for s in range(pp):
            made = dist.new_group(list(range(s * stage_ranks, (s + 1) * stage_ranks)),
                                  timeout=datetime.timedelta(seconds=timeout_s))
            if s == coords["pp"]:
                stage_group = made
    elif pp > 1:
        stage_group = zero.group
    seq = None
    if sp > 1:
        seq = SequenceParallelGroup(rank=coords["sp"], world_size=sp, mesh=mesh,
                                    group_name=mesh["sp"].get_group().group_name)
    ten = None
    if tp > 1:
        ten = TensorParallelGroup(rank=coords["tp"], world_size=tp, mesh=zero_mesh,
                                  group_name=zero_mesh["tp"].get_group().group_name, stage_group=stage_group)
    log.info("device mesh: %s; this rank is %s", layout.describe(),
             ", ".join(f"{d} {coords[d]}" for d in MESH_DIMS if sizes[d] > 1))
    return MeshGroups(layout=layout, device=dev, mesh=mesh, dp=dp_group, zero=zero, sp=seq, tp=ten,
                      stage_group=stage_group)


def mesh_of_config(cfg, model_device: torch.device | None = None) -> MeshGroups:
    """:func:`build_mesh` with the sizes of ``cfg`` (a
    :class:`zerograph.config.Config`), after refusing the settings that do
    not compose (sequence x tensor parallelism)."""
    from zerograph.runtime.sequence import refuse_with_tensor_parallelism

    sp, tp = cfg.sequence_parallel_size, max(1, cfg.tensor_parallel.autotp_size)
    if sp > 1 and tp > 1:
        refuse_with_tensor_parallelism(cfg)
    zg = cfg.zerograph
    return build_mesh(max(1, cfg.pipeline.stages), sp, tp, timeout_s=zg.collective_timeout_s, device=zg.device,
                      model_device=model_device)
