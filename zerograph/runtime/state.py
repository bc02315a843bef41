"""Per-model state of a compiled model: its config, ranks, parameter specs,
communication counters, compiled regions and micro-batch position.

One :class:`ShardingContext` belongs to one compiled model; nothing here is
shared between models.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from zerograph.config import Config
from zerograph.runtime import registry
from zerograph.runtime.dist import DataParallelGroup
from zerograph.runtime.specs import ParamSpec
from zerograph.runtime.stats import CommStats


@dataclasses.dataclass
class CompiledRegion:
    """One Dynamo graph of the model and what zerograph made of it."""

    index: int
    graphs: dict[str, torch.fx.GraphModule] = dataclasses.field(default_factory=dict)
    pass_records: dict[str, list] = dataclasses.field(default_factory=dict)
    comm_bytes: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    # how many of the forward graph's outputs are values saved for the backward
    # (AOTAutograd returns them last), counted at partition time: the memory
    # limit reads what a region holds from its forward graph before its
    # backward graph is compiled (zerograph.planner.liveness.held_by_forward)
    num_saved: int | None = None
    # what the forward holds for the backward, by kind, once computed
    # (zerograph.planner.step_plan: the memory limit reads it for every later region)
    held_bytes: dict[str, int] | None = None


@dataclasses.dataclass(eq=False)
class ReadState:
    """What parameter reads of one model pass to ``unshard`` right now."""

    tag: str


@dataclasses.dataclass(eq=False)
class ShardingContext:
    config: Config
    dp: DataParallelGroup
    tag: str = dataclasses.field(default_factory=registry.new_tag)
    specs: dict[str, ParamSpec] = dataclasses.field(default_factory=dict)
    stats: CommStats = dataclasses.field(default_factory=CommStats)
    regions: list[CompiledRegion] = dataclasses.field(default_factory=list)
    micro_step: int = 0  # micro-batches run since the start of training
    step: int = 0  # optimizer steps (accumulation boundaries) reached
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Gradient accumulation without a collective per micro-batch (stages 0/1):
    # parameter reads pass ``read_state.tag``, which is ``nosync_tag`` on
    # micro-batches before the boundary, so Dynamo compiles one graph variant
    # whose backward stashes local gradients here instead of reducing them.
    grad_stash: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    read_state: "ReadState" = dataclasses.field(default=None)
    # Execution order of the compiled regions, for the planner (a model with
    # graph breaks has several): the index of every region whose forward or
    # inference graph ran during the latest model call with grad enabled, in
    # order. The runtime starts a new list at each such call; a call without
    # grad and the first backward graph to run stop the recording (so a
    # recomputed forward is not counted). Empty: not recorded.
    region_order: list[int] = dataclasses.field(default_factory=list)
    recording_order: bool = False

    def __post_init__(self) -> None:
        registry.register(self)
        registry.register(self, self.nosync_tag)
        self.read_state = ReadState(self.tag)

    @property
    def nosync_tag(self) -> str:
        return self.tag + "/nosync"

    @property
    def defers_grad_sync(self) -> bool:
        """Stages 0 and 1 keep full local gradients, so with accumulation they
        reduce once per optimizer step instead of once per micro-batch."""
        cfg = self.config
        return cfg.zero_optimization.stage <= 1 and cfg.gradient_accumulation_steps > 1 and self.world_size > 1

    @property
    def world_size(self) -> int:
        return self.dp.world_size

    @property
    def rank(self) -> int:
        return self.dp.rank

    def ran_region(self, index: int, phase: str) -> None:
        """Called by every compiled graph of region ``index`` each time it
        runs: a forward or inference graph appends to :attr:`region_order`,
        a backward graph ends the recording."""
        if phase == "backward":
            self.recording_order = False
        elif self.recording_order:
            self.region_order.append(index)

    def new_region(self) -> CompiledRegion:
        region = CompiledRegion(index=len(self.regions))
        self.regions.append(region)
        return region


def context_of(model) -> ShardingContext | None:
    """The sharding context of a model prepared by ``zerograph.compile`` or
    ``zerograph.shard`` (also through ``torch.compile``'s wrapper), else None."""
    model = getattr(model, "_orig_mod", model)
    runtime = getattr(model, "_zg_runtime", None)
    return getattr(runtime, "ctx", None)
