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


def default_device() -> torch.device:
    """Where this rank's shards live: follows the process group's backend.

    An initialized group whose backend cannot move CUDA tensors (gloo, the fake
    test backend) keeps everything on the CPU even on a GPU machine; NCCL, or no
    group at all, uses the current CUDA device when there is one.
    """
    cuda = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    if cuda is None:
        return torch.device("cpu")
    if dist.is_initialized():
        backend = str(dist.get_backend()).lower()
        return cuda if "nccl" in backend else torch.device("cpu")
    return cuda


def ensure_process_group(timeout_s: float) -> None:
    """Initialize the default process group from torchrun's environment if needed."""
    if dist.is_initialized() or "WORLD_SIZE" not in os.environ:
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    log.info("initializing process group (%s) from the environment", backend)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))


def data_parallel_group(timeout_s: float = 300.0) -> DataParallelGroup:
    ensure_process_group(timeout_s)
    device = default_device()
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
