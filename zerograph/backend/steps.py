"""The compile pipeline as data: named steps, each a function in the module
that owns it, run in order and recorded with their time.

For each Dynamo graph (a *region*) zerograph runs::

    dynamo_passes        graph passes on the Dynamo graph        (passes)
    aot_trace            AOTAutograd traces the joint graph      (torch)
      joint_passes       graph passes on the joint graph         (passes)
      partition          joint -> forward + backward             (_torch_private)
      unwrap_rng         drop RNG state of deterministic recompute (graph.deterministic_rng)
      count_saved        values the forward saves for backward   (planner.liveness)
    for forward, backward, inference:
      graph_passes       graph passes on the partitioned graph   (passes)
      count_comm         bytes per collective kind               (passes.comm_analysis)
      check_memory_limit planned step peak vs the limit          (planner.step_plan, runtime.memory)
      lower              eager GraphModule or Inductor           (backend.lowering)
      wrap_executor      runtime hooks around the executable     (backend.executors)

:data:`REGION_STEPS`, :data:`PARTITION_STEPS` and :data:`GRAPH_STEPS` hold
the order; ``zerograph.inspect(model).steps`` lists what ran, with times.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class CompileStep:
    name: str
    fn: Callable[["CompileJob"], None]


@dataclasses.dataclass(frozen=True)
class StepRecord:
    """One compile step run on one graph of a region."""

    name: str
    phase: str
    seconds: float

    def summary(self) -> str:
        return f"{self.phase:>9} {self.name:<22} {self.seconds * 1e3:7.2f} ms  (compile step)"


@dataclasses.dataclass
class CompileJob:
    """What the steps of one graph read and write."""

    backend: Any  # the ZerographBackend
    region: Any  # the CompiledRegion
    phase: str
    gm: Any = None
    example_inputs: Any = None
    # partition steps
    joint_inputs: Any = None
    partition_kwargs: dict = dataclasses.field(default_factory=dict)
    forward: Any = None
    backward: Any = None
    # graph steps
    memory_plan: Any = None  # the step plan the memory limit checked (planner.step_plan)
    executable: Any = None


def run_steps(steps, job: CompileJob) -> CompileJob:
    """Run ``steps`` in order on ``job``, recording each step's time on the region."""
    for step in steps:
        start = time.perf_counter()
        step.fn(job)
        job.region.step_records.append(StepRecord(step.name, job.phase, time.perf_counter() - start))
    return job
