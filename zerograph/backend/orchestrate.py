"""The Dynamo backend: AOTAutograd with zerograph's passes at every stage.

``torch.compile(model, backend="zerograph")`` finds this through the
``torch_dynamo_backends`` entry point. On a model prepared by
:func:`zerograph.compile` the marker ops name the model's context, so the
backend applies that model's config and pass list. On any other model it runs
the pipeline without ZeRO (there are no markers to lower).

For each Dynamo graph::

    joint graph --(passes for "joint")--> default_partition --> forward, backward
    forward  --(passes for "forward")-->  executor
    backward --(passes for "backward")--> executor
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.fx as fx

from zerograph._torch_private import (
    aot_autograd,
    default_partition,
    inductor_compile,
    inductor_decompositions,
    make_boxed_func,
)
from zerograph.config import Config
from zerograph.passes import PassContext, default_passes, run_passes
from zerograph.passes.comm_analysis import comm_bytes
from zerograph.graph.deterministic_rng import unwrap_deterministic_rng
from zerograph.planner.liveness import saved_count
from zerograph.planner.step_plan import plan_in_step
from zerograph.graph.verify import verify_graph
from zerograph.runtime.state import CompiledRegion
from zerograph.runtime.memory import check_region, out_of_memory
from zerograph.planner.measured import tracker_of

log = logging.getLogger(__name__)


class ZerographBackend:
    """A Dynamo backend bound to one model's context (or to none)."""

    def __init__(self, sharding=None, config: Config | None = None, passes=None):
        self.sharding = sharding
        self.config = config or (sharding.config if sharding is not None else Config())
        self.passes = passes if passes is not None else default_passes()
        for name in self.config.zerograph.disabled_passes:
            self.passes.disable(name)

    def _run(self, gm: fx.GraphModule, phase: str, region: CompiledRegion) -> None:
        opts = self.config.zerograph
        ctx = PassContext(phase=phase, sharding=self.sharding, config=self.config)
        records = run_passes(
            self.passes.enabled(phase),
            gm,
            ctx,
            phase=phase,
            debug=opts.debug,
            verify=verify_graph if opts.verify_graphs else None,
        )
        region.pass_records[phase] = records
        region.graphs[phase] = gm

    def _partition(self, region, joint, joint_inputs, **kwargs):
        self._run(joint, "joint", region)
        fw, bw = default_partition(joint, joint_inputs, **kwargs)
        unwrap_deterministic_rng(fw, bw)  # recomputed attention with dropout_p=0 needs no RNG state
        region.num_saved = saved_count(bw)  # what the forward holds, before the backward is compiled
        return fw, bw

    def _compile(self, region, phase, gm, example_inputs):
        try:
            executable, plan = self._compile_graph(region, phase, gm, example_inputs)
        except torch.OutOfMemoryError as exc:
            if self.sharding is None:
                raise
            raise out_of_memory(self.sharding, exc, phase=phase, rank=_rank()) from exc
        static = region.comm_bytes[phase]
        stats = self.sharding.stats if self.sharding is not None else None
        if stats is not None and self.config.zerograph.track_memory:  # measuring interpreter (docs/planner.md)
            executable = tracker_of(stats).executable(gm, phase, region.index, self.sharding.dp.device)
        if self.sharding is not None:  # the regions' execution order, for the planner (runtime/context.py)
            executable = _recording_order(executable, self.sharding, region.index, phase)
        if self.sharding is not None:  # an OOM names the budget to change (runtime/memory.py)
            executable = _translate_oom(executable, self.sharding, phase, plan)
        guard = self.sharding.extra.get("collective_guard") if self.sharding is not None else None
        if guard is not None:  # a failed collective names the dead rank (runtime/training.py)
            executable = guard(executable, phase)
        if stats is None or not static:
            return executable

        def run(args):
            stats.add_all(static)
            return executable(args)

        run._boxed_call = True
        return run

    def _compile_graph(self, region, phase, gm, example_inputs):
        """Run the passes of ``phase``, check the memory budget, compile."""
        self._run(gm, phase, region)
        region.comm_bytes[phase] = comm_bytes(gm)
        plan = None
        limit = self.config.zerograph.memory_limit_bytes
        if self.sharding is not None and limit is not None and phase in ("backward", "inference"):
            # this region composed with the regions that ran before it in this step (docs/planner.md)
            order, reason = _step_order(self.sharding, region.index, phase)
            plan = plan_in_step(self.sharding.regions, region.index, order, reason)
            check_region(self.sharding, plan, limit, _rank())
        if self.config.zerograph.compiler == "inductor":
            return inductor_compile(gm, example_inputs), plan
        return make_boxed_func(gm.forward), plan

    def __call__(self, gm: fx.GraphModule, example_inputs):
        region = self.sharding.new_region() if self.sharding is not None else CompiledRegion(index=0)
        self._run(gm, "dynamo", region)
        compile_for = functools.partial(self._compile, region)
        return aot_autograd(
            fw_compiler=functools.partial(compile_for, "forward"),
            bw_compiler=functools.partial(compile_for, "backward"),
            inference_compiler=functools.partial(compile_for, "inference"),
            partition_fn=functools.partial(self._partition, region),
            keep_inference_input_mutations=True,
            # Inductor lowers only decomposed ATen: trace with its table.
            decompositions=inductor_decompositions() if self.config.zerograph.compiler == "inductor" else None,
        )(gm, example_inputs)


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _step_order(sharding, index: int, phase: str) -> tuple[list[int] | None, str]:
    """What the runtime knows, while region ``index``'s ``phase`` graph is
    compiled, of the regions that ran before it in this step: ``(order,
    "")`` with the region indices whose forward ran in this model call
    (``ShardingContext.region_order``), or ``(None, why not)``.

    A backward graph is compiled during the first backward through it, after
    every forward of the call ran, so the recorded call includes the region;
    an inference graph is compiled before its first run, so the regions
    recorded so far ran before it. A call without grad saves nothing for a
    backward. A pipeline stage's context sees neither this rank's other
    stages nor the micro-batches in flight."""
    stage = sharding.extra.get("pipeline_stage")
    if stage is not None:
        return None, (f"pipeline stage {stage}: this rank's other stages and its micro-batches "
                      "in flight are not modelled")
    if phase == "inference" and not torch.is_grad_enabled():
        return [], ""
    order = list(sharding.region_order)
    if (phase == "backward" and index in order) or (phase == "inference" and sharding.recording_order):
        return order, ""
    if len(sharding.regions) <= 1:
        return [], ""
    return None, "not recorded by the runtime"


def _recording_order(executable, sharding, index: int, phase: str):
    """A boxed executable that tells ``sharding`` that the ``phase`` graph of
    region ``index`` runs (``ShardingContext.region_order``, the execution
    order the planner composes)."""

    def run(args):
        sharding.ran_region(index, phase)
        return executable(args)

    run._boxed_call = True
    return run


def _translate_oom(executable, sharding, phase, plan):
    """A boxed executable whose ``torch.OutOfMemoryError`` says which budget to change."""

    def run(args):
        try:
            return executable(args)
        except torch.OutOfMemoryError as exc:
            raise out_of_memory(sharding, exc, phase=phase, plan=plan, rank=_rank()) from exc

    run._boxed_call = True
    return run
