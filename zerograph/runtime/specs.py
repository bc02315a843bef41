"""How one parameter is stored and communicated (a frozen, per-rank record)."""

from __future__ import annotations

import dataclasses
import math
import torch

from zerograph.runtime.offload import HOST
from zerograph.runtime.plan import GradReduce, Storage
from zerograph.runtime.tp_layout import TpLayout


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """Storage and communication of one parameter on this rank.

    A sharded parameter is split along dim 0 in ``torch.chunk`` order (the
    layout of DTensor ``Shard(0)``): rank ``r`` holds rows
    ``[r * chunk_rows, r * chunk_rows + local_rows)``. Collectives pad the
    local rows to ``chunk_rows`` so every rank sends the same size.
    """

    name: str  # parameter FQN in the user's model
    full_shape: tuple[int, ...]
    storage: Storage
    grad_reduce: GradReduce
    rank: int
    world_size: int
    group_name: str
    master_dtype: torch.dtype  # dtype of the stored shard (fp32 master)
    compute_dtype: torch.dtype  # dtype of the gathered parameter
    grad_scale: float  # multiplies the reduced gradient: 1 / (world * accumulation steps)
    # offload_param: the stored shard lives in host memory and is copied to this
    # (compute) device before its gather; its reduced gradient is copied back.
    # None: the shard lives on the device it is computed on.
    compute_device: torch.device | None = None
    # tensor parallelism: how this parameter is split over the tp ranks (None:
    # whole on every tp rank). ``full_shape`` is then this rank's tp slice,
    # which is what ZeRO shards and gathers over the data-parallel ranks.
    tp: TpLayout | None = None
    # the label of the process group its collectives run on (NodeTag.group):
    # "dp", or "node" for an hpZ secondary partition (zerograph.runtime.hierarchy)
    comm_group: str = "dp"

    @property
    def offloaded(self) -> bool:
        return self.compute_device is not None

    def gathered_device(self, shard_device: torch.device) -> torch.device:
        """Where the gathered parameter lives, given the stored shard's device."""
        return self.compute_device if self.compute_device is not None else shard_device

    def grad_shard_device(self, grad_device: torch.device) -> torch.device:
        """Where the reduced gradient shard lives, given the full gradient's device."""
        if self.compute_device is None:
            return grad_device
        return HOST

    @property
    def full_rows(self) -> int:
        return self.full_shape[0] if self.full_shape else 1

    @property
    def chunk_rows(self) -> int:
        if self.storage == "replicated":
            return self.full_rows
        return math.ceil(self.full_rows / self.world_size)

    @property
    def row_start(self) -> int:
        if self.storage == "replicated":
            return 0
        return min(self.rank * self.chunk_rows, self.full_rows)

    @property
    def local_rows(self) -> int:
        if self.storage == "replicated":
            return self.full_rows
        return max(0, min(self.chunk_rows, self.full_rows - self.row_start))

    @property
    def local_shape(self) -> tuple[int, ...]:
        if self.storage == "replicated" or not self.full_shape:
            return self.full_shape
        return (self.local_rows, *self.full_shape[1:])

    @property
    def row_numel(self) -> int:
        return math.prod(self.full_shape[1:]) if self.full_shape else 1

    @property
    def numel(self) -> int:
        return math.prod(self.full_shape)
