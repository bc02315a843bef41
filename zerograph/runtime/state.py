"""The runtime state of one compiled model: its config and parallel plan,
ranks, parameter specs, communication counters, compiled regions,
micro-batch position, and the hooks the runtime installs.

One :class:`ModelState` belongs to one compiled model; nothing here is
shared between models.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

from zerograph.config import Config
from zerograph.runtime import registry
from zerograph.runtime.dist import DataParallelGroup
from zerograph.runtime.plan import ParallelPlan
from zerograph.runtime.specs import ParamSpec
from zerograph.runtime.stats import CommStats


@dataclasses.dataclass
class CompiledRegion:
    """One Dynamo graph of the model and what zerograph made of it."""

    index: int
    graphs: dict[str, torch.fx.GraphModule] = dataclasses.field(default_factory=dict)
    pass_records: dict[str, list] = dataclasses.field(default_factory=dict)
    comm_bytes: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    # the same per graph, by scope then kind (intra_group / cross_group: zerograph.runtime.hierarchy)
    comm_bytes_by_scope: dict[str, dict[str, dict[str, int]]] = dataclasses.field(default_factory=dict)
    # how many of the forward graph's outputs are values saved for the backward
    # (AOTAutograd returns them last), counted at partition time: the memory
    # limit reads what a region holds from its forward graph before its
    # backward graph is compiled (zerograph.planner.liveness.held_by_forward)
    num_saved: int | None = None
    # what the forward holds for the backward, by kind, once computed
    # (zerograph.planner.step_plan: the memory limit reads it for every later region)
    held_bytes: dict[str, int] | None = None
    # the compile steps that ran for this region, in order (zerograph.backend.steps.StepRecord)
    step_records: list = dataclasses.field(default_factory=list)
    # a weak reference to the backward graph as partitioned: AOTAutograd keeps
    # it (a deep copy goes to the backward's compile steps); its trace-only
    # metadata is dropped once the backward is compiled (zerograph.graph.trace_meta)
    partitioned_backward: Any = None


@dataclasses.dataclass(eq=False)
class ReadState:
    """What parameter reads of one model pass to ``unshard`` right now."""

    tag: str


@dataclasses.dataclass(eq=False)
class ModelState:
    config: Config
    dp: DataParallelGroup
    plan: ParallelPlan
    tag: str = dataclasses.field(default_factory=registry.new_tag)
    specs: dict[str, ParamSpec] = dataclasses.field(default_factory=dict)
    stats: CommStats = dataclasses.field(default_factory=CommStats)
    regions: list[CompiledRegion] = dataclasses.field(default_factory=list)
    micro_step: int = 0  # micro-batches run since the start of training
    step: int = 0  # optimizer steps (accumulation boundaries) reached
    # the Dynamo backend compiling this model's graphs (zerograph.backend.ZerographBackend)
    backend: Any = None
    # loss_fn(outputs, batch) of train_step/eval_step (None: the output's .loss)
    loss_fn: Callable | None = None
    # the model's stage index in a pipeline (None without one)
    pipeline_stage: int | None = None
    # set by the runtime (zerograph.runtime.training): wraps a compiled
    # executable so a failed collective names the dead rank, and translates
    # one failure (errors.naming_failed_ranks)
    collective_guard: Callable | None = None
    collective_failure: Callable | None = None
    # position_check(phase): every rank checks that the others are at the same
    # point of training before ``phase`` communicates (zerograph.runtime.agreement.StepCheck)
    position_check: Callable | None = None
    # the global gradient norm of the last clipped step (None: not clipped yet)
    last_grad_norm: Any = None
    # Gradient accumulation without a collective per micro-batch (stages 0/1):
    # parameter reads pass ``read_state.tag``, which is ``nosync_tag`` on
    # micro-batches before the boundary, so Dynamo compiles one graph variant
    # whose backward stashes local gradients here instead of reducing them.
    grad_stash: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    # ZeRO++ qgZ error feedback: per reduction and hop, what quantizing the last
    # message left out (zerograph.passes.error_feedback)
    qgz_residuals: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    read_state: "ReadState" = dataclasses.field(default=None)
    # Execution order of the compiled regions, for the planner (a model with
    # graph breaks has several): the index of every region whose forward or
    # inference graph ran during the latest model call with grad enabled, in
    # order. The runtime starts a new list at each such call; a call without
    # grad and the first backward graph to run stop the recording (so a
    # recomputed forward is not counted). Empty: not recorded.
    region_order: list[int] = dataclasses.field(default_factory=list)
    recording_order: bool = False
    # tensor parallelism (tensor_parallel.autotp_size > 1): this rank's tp
    # group (zerograph.runtime.dist.TensorParallelGroup); None without it
    tp: Any = None
    # sequence parallelism (sequence_parallel_size > 1): this rank's sp group
    # (zerograph.runtime.sequence.SequenceParallelGroup); None without it
    sp: Any = None
    # sequence parallelism: the caller feeds each rank its slice of every
    # sequence itself (zerograph.feed_sequence_slices); False: zerograph cuts full rows
    sp_presliced: bool = False
    # ZeRO++: this rank's node and peer groups (zerograph.runtime.hierarchy.NodeGroups; None: no hierarchy)
    node_groups: Any = None
    # offload_param.device "nvme": the file of this rank's offloaded parameter
    # shards and its reads (zerograph.runtime.nvme_params.ParamStore)
    nvme_params: Any = None

    def __post_init__(self) -> None:
        registry.register(self)
        registry.register(self, self.nosync_tag)
        self.read_state = ReadState(self.tag)

    @property
    def nosync_tag(self) -> str:
        return self.tag + "/nosync"

    @property
    def defers_grad_sync(self) -> bool:
        """Gradients reduce once per optimizer step (:attr:`ParallelPlan.defers_grad_sync`)."""
        return self.plan.defers_grad_sync

    @property
    def world_size(self) -> int:
        return self.dp.world_size

    @property
    def model_group(self):
        """Every rank holding a part of this model's step: the data-parallel
        group, or with tensor parallelism the whole (dp x tp) mesh."""
        return self.tp.model_group if self.tp is not None else self.dp.group

    @property
    def model_ranks(self) -> int:
        return self.world_size * (self.tp.world_size if self.tp is not None else 1)

    @property
    def rank(self) -> int:
        return self.dp.rank

    def enter_pipeline(self, stage: int, ranks: int, rank_index: int) -> None:
        """This model is pipeline stage ``stage``, run by the rank at index
        ``rank_index`` of the ``ranks`` pipeline ranks (the plan's ``pp``
        dimension). Called before its first compile."""
        self.pipeline_stage = stage
        mesh = dict(self.plan.mesh.sizes)
        mesh["pp"] = ranks
        coords = dict(self.plan.mesh.coords)
        coords["pp"] = rank_index
        self.plan = dataclasses.replace(self.plan, mesh=dataclasses.replace(
            self.plan.mesh, sizes=tuple(mesh.items()), coords=tuple(coords.items())))

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


def context_of(model) -> ModelState | None:
    """The runtime state of a model prepared by ``zerograph.compile`` or
    ``zerograph.shard`` (also through ``torch.compile``'s wrapper), else None."""
    model = getattr(model, "_orig_mod", model)
    runtime = getattr(model, "_zg_runtime", None)
    return getattr(runtime, "ctx", None)


def check_position(ctx: ModelState | None, phase: str) -> None:
    """Before a collective call outside the model's own steps
    (``full_state_dict``, the checkpoint functions): every rank checks that
    the others are at the same point (the runtime's ``position_check``,
    :class:`zerograph.runtime.agreement.StepCheck`). A no-op without one."""
    check = ctx.position_check if ctx is not None else None
    if check is not None:
        check(phase)
