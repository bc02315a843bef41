"""The Dynamo backend: AOTAutograd with zerograph's passes at every stage,
run as the named compile steps of :mod:`zerograph.backend.steps`.

On a model prepared by :func:`zerograph.compile` the marker ops name the
model's state, so the backend applies that model's config, parallel plan and
pass list. On any other model it runs the pipeline without ZeRO (there are no
markers to lower), and the passes that need a sharded model do not apply.
"""

from __future__ import annotations

import functools
import logging
import time
import weakref

import torch
import torch.fx as fx

from zerograph._torch_private import aot_autograd, default_partition, inductor_decompositions
from zerograph.backend import executors
from zerograph.backend.lowering import lower
from zerograph.backend.steps import CompileJob, CompileStep, StepRecord, run_steps
from zerograph.config import Config
from zerograph.graph.deterministic_rng import unwrap_deterministic_rng
from zerograph.graph.trace_meta import drop_compile_meta, drop_trace_meta
from zerograph.graph.verify import verify_graph
from zerograph.passes import PassContext, default_passes, run_passes
from zerograph.passes.comm_analysis import comm_bytes, comm_bytes_by_scope
from zerograph.planner.liveness import saved_count
from zerograph.planner.step_plan import plan_in_step
from zerograph.runtime.memory import check_region, out_of_memory
from zerograph.runtime.state import CompiledRegion

log = logging.getLogger(__name__)


# -- the steps ---------------------------------------------------------------

def _graph_passes(job: CompileJob) -> None:
    backend, phase = job.backend, job.phase
    opts = backend.config.zerograph
    ctx = PassContext(phase=phase, state=backend.state, config=backend.config)
    job.region.pass_records[phase] = run_passes(
        backend.passes.enabled(phase, backend.config, backend.plan),
        job.gm,
        ctx,
        phase=phase,
        debug=opts.debug,
        verify=verify_graph if opts.verify_graphs else None,
    )
    job.region.graphs[phase] = job.gm


def _partition(job: CompileJob) -> None:
    job.forward, job.backward = default_partition(job.gm, job.joint_inputs, **job.partition_kwargs)
    drop_trace_meta(job.gm)  # the joint graph is done (forward and backward copied their nodes' meta)
    if not job.backend.config.zerograph.debug:
        # nothing reads it once partitioned: inspect shows it with zerograph.debug (docs/benchmarks.md)
        job.region.graphs.pop("joint", None)
    if job.backward is not None:
        job.region.partitioned_backward = weakref.ref(job.backward)


def _unwrap_rng(job: CompileJob) -> None:
    # recomputed attention with dropout_p=0 needs no RNG state
    unwrap_deterministic_rng(job.forward, job.backward)


def _count_saved(job: CompileJob) -> None:
    # what the forward holds, before the backward is compiled (the memory limit reads it)
    job.region.num_saved = saved_count(job.backward)


def _count_comm(job: CompileJob) -> None:
    job.region.comm_bytes[job.phase] = comm_bytes(job.gm)
    job.region.comm_bytes_by_scope[job.phase] = comm_bytes_by_scope(job.gm)


def _check_memory_limit(job: CompileJob) -> None:
    """This region composed with the regions that ran before it in this step
    (docs/planner.md), against ``zerograph.memory_limit_bytes``."""
    state, limit = job.backend.state, job.backend.config.zerograph.memory_limit_bytes
    if state is None or limit is None or job.phase not in ("backward", "inference"):
        return
    order, reason = _step_order(state, job.region.index, job.phase)
    job.memory_plan = plan_in_step(state.regions, job.region.index, order, reason)
    check_region(state, job.memory_plan, limit, executors.rank())


def _lower(job: CompileJob) -> None:
    job.executable = lower(job.gm, job.example_inputs, job.backend.config.zerograph.compiler)


def _wrap_executor(job: CompileJob) -> None:
    b = job.backend
    job.executable = executors.wrap(job.executable, b.state, b.config, job.gm, job.phase, job.region, job.memory_plan)
    drop_compile_meta(job.gm)  # the graph is compiled; what inspect and the planner read stays
    if job.phase == "backward" and job.region.partitioned_backward is not None:
        drop_trace_meta(job.region.partitioned_backward())  # AOTAutograd's own copy, kept for its lazy compile


DYNAMO_STEPS = (CompileStep("dynamo_passes", _graph_passes),)
PARTITION_STEPS = (
    CompileStep("joint_passes", _graph_passes),
    CompileStep("partition", _partition),
    CompileStep("unwrap_rng", _unwrap_rng),
    CompileStep("count_saved", _count_saved),
)
GRAPH_STEPS = (
    CompileStep("graph_passes", _graph_passes),
    CompileStep("count_comm", _count_comm),
    CompileStep("check_memory_limit", _check_memory_limit),
    CompileStep("lower", _lower),
    CompileStep("wrap_executor", _wrap_executor),
)


# -- the backend ---------------------------------------------------------------

class ZerographBackend:
    """A Dynamo backend bound to one model's state (or to none)."""

    def __init__(self, state=None, config: Config | None = None, passes=None):
        self.state = state
        self.config = config or (state.config if state is not None else Config())
        self.passes = passes if passes is not None else default_passes()
        # names shard() checked against every built-in pass (absent from a filtered list: nothing to disable)
        self.passes.disable(*self.config.zerograph.disabled_passes, missing_ok=True)
        self.passes.check_order(self.config, self.plan)

    @property
    def plan(self):
        return self.state.plan if self.state is not None else None

    def _partition(self, region, joint, joint_inputs, **kwargs):
        job = run_steps(PARTITION_STEPS, CompileJob(self, region, "joint", gm=joint, joint_inputs=joint_inputs,
                                                    partition_kwargs=kwargs))
        return job.forward, job.backward

    def _compile(self, region, phase, gm, example_inputs):
        try:
            job = run_steps(GRAPH_STEPS, CompileJob(self, region, phase, gm=gm, example_inputs=example_inputs))
        except torch.OutOfMemoryError as exc:
            if self.state is None:
                raise
            raise out_of_memory(self.state, exc, phase=phase, rank=executors.rank()) from exc
        return job.executable

    def __call__(self, gm: fx.GraphModule, example_inputs):
        region = self.state.new_region() if self.state is not None else CompiledRegion(index=0)
        run_steps(DYNAMO_STEPS, CompileJob(self, region, "dynamo", gm=gm))
        compile_for = functools.partial(self._compile, region)
        first, start = len(region.step_records), time.perf_counter()
        compiled = aot_autograd(
            fw_compiler=functools.partial(compile_for, "forward"),
            bw_compiler=functools.partial(compile_for, "backward"),
            inference_compiler=functools.partial(compile_for, "inference"),
            partition_fn=functools.partial(self._partition, region),
            keep_inference_input_mutations=True,
            # Inductor lowers only decomposed ATen: trace with its table.
            decompositions=inductor_decompositions() if self.config.zerograph.compiler == "inductor" else None,
        )(gm, example_inputs)
        drop_trace_meta(gm)  # AOTAutograd traced it
        # AOTAutograd's own tracing: its time less the steps it called (partition, forward)
        nested = sum(r.seconds for r in region.step_records[first:])
        region.step_records.insert(first, StepRecord("aot_trace", "joint", time.perf_counter() - start - nested))
        return compiled


def _step_order(state, index: int, phase: str) -> tuple[list[int] | None, str]:
    """What the runtime knows, while region ``index``'s ``phase`` graph is
    compiled, of the regions that ran before it in this step: ``(order,
    "")`` with the region indices whose forward ran in this model call
    (``ModelState.region_order``), or ``(None, why not)``.

    A backward graph is compiled during the first backward through it, after
    every forward of the call ran, so the recorded call includes the region;
    an inference graph is compiled before its first run, so the regions
    recorded so far ran before it. A call without grad saves nothing for a
    backward. A pipeline stage's state sees neither this rank's other
    stages nor the micro-batches in flight."""
    if state.pipeline_stage is not None:
        return None, (f"pipeline stage {state.pipeline_stage}: this rank's other stages and its micro-batches "
                      "in flight are not modelled")
    if phase == "inference" and not torch.is_grad_enabled():
        return [], ""
    order = list(state.region_order)
    if (phase == "backward" and index in order) or (phase == "inference" and state.recording_order):
        return order, ""
    if len(state.regions) <= 1:
        return [], ""
    return None, "not recorded by the runtime"
