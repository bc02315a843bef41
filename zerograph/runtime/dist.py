"""Process groups and device meshes.

zerograph uses an already initialized default process group; otherwise it
initializes one from the torchrun environment (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``); with neither it runs as a single process
(world size 1, no process group, no collectives). The backend is NCCL when
CUDA is available and gloo otherwise.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DataParallelGroup:
    """The data-parallel ranks a model is sharded over."""

    rank: int
    world_size: int
    device: torch.device
    mesh: object | None  # torch.distributed.device_mesh.DeviceMesh, None for world size 1
    group_name: str  # "" for world size 1

    @property
    def group(self):
        return None if self.mesh is None else self.mesh.get_group()


def default_device(requested: str | None = None, model_device: torch.device | None = None) -> torch.device:
    """Where this rank's shards live.

    ``requested`` (config ``zerograph.device``) wins. Otherwise the process
    group decides: NCCL uses the current CUDA device, gloo the CPU (gloo
    cannot reduce-scatter CUDA tensors). Without a group, or with another
    backend (the fake test backend), the model stays where it is.
    """
    if requested is not None:
        device = torch.device(requested)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return device
    if dist.is_initialized():
        backend = str(dist.get_backend()).lower()
        if backend == "nccl" and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if backend == "gloo":
            return torch.device("cpu")
    return model_device if model_device is not None else torch.device("cpu")


def ensure_process_group(timeout_s: float) -> None:
    """Initialize the default process group from torchrun's environment if needed."""
    if dist.is_initialized() or "WORLD_SIZE" not in os.environ:
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    log.info("initializing process group (%s) from the environment", backend)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))


def data_parallel_group(
    timeout_s: float = 300.0, device: str | None = None, model_device: torch.device | None = None
) -> DataParallelGroup:
    ensure_process_group(timeout_s)
    device = default_device(device, model_device)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return DataParallelGroup(rank=0, world_size=1, device=device, mesh=None, group_name="")
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("dp",))
    return DataParallelGroup(
        rank=dist.get_rank(),
        world_size=world,
        device=device,
        mesh=mesh,
        group_name=mesh.get_group().group_name,
    )


@dataclasses.dataclass(frozen=True)
class PipelineGroups:
    """This rank's place on the 2-D (pipeline x data-parallel) mesh.

    Global rank ``r`` is stage ``r // dp`` and data-parallel rank ``r % dp``;
    each stage's ``dp`` ranks form its data-parallel group (ZeRO shards
    there), and the ranks with the same data-parallel index form one pipeline.
    """

    stage: int
    stages: int
    dp: DataParallelGroup

    def rank_of(self, stage: int) -> int:
        """The global rank of ``stage`` in this rank's pipeline."""
        return stage * self.dp.world_size + self.dp.rank


def pipeline_groups(stages: int, timeout_s: float = 300.0, device: str | None = None) -> PipelineGroups:
    ensure_process_group(timeout_s)
    dev = default_device(device)
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world % stages or world < stages:
        raise ValueError(
            f"pipeline.stages={stages} needs a world size that is a multiple of it; this run has "
            f"{world} rank(s): launch stages x data-parallel ranks"
        )
    dp = world // stages
    rank = dist.get_rank() if dist.is_initialized() else 0
    stage, dp_rank = divmod(rank, dp)
    if dp == 1:
        group = DataParallelGroup(rank=0, world_size=1, device=dev, mesh=None, group_name="")
    else:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(dev.type, (stages, dp), mesh_dim_names=("pp", "dp"))
        sub = mesh["dp"]
        group = DataParallelGroup(rank=dp_rank, world_size=dp, device=dev, mesh=sub, group_name=sub.get_group().group_name)
    log.info("pipeline mesh: %d stage(s) x %d data-parallel rank(s); this rank is stage %d", stages, dp, stage)
    return PipelineGroups(stage=stage, stages=stages, dp=group)
