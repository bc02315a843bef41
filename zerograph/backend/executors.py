"""The runtime hooks the ``wrap_executor`` step puts around a compiled graph.

Each takes a boxed executable (``fn(args)``) and returns one; innermost first:

* ``measure_memory``: ``zerograph.track_memory`` runs the graph through the
  planner's measuring interpreter (:mod:`zerograph.planner.measured`);
* ``record_order``: tells the model state which region ran (the planner
  composes regions in execution order);
* ``translate_oom``: a ``torch.OutOfMemoryError`` names the budget to change;
* the runtime's collective guard: a failed collective names the dead rank;
* ``count_comm``: adds the graph's static communication bytes to the step's;
* ``stream_nvme_params``: ``offload_param.device: "nvme"``: releases the
  parameter file's mapped pages after the graph ran (its ``read_ahead`` nodes
  requested the reads; without them, the graph's file shards are read ahead
  before it runs) (:mod:`zerograph.runtime.nvme_params`).
"""

from __future__ import annotations

import torch

from zerograph.planner.measured import tracker_of
from zerograph.planner.nvme import announced_reads, graph_reads
from zerograph.runtime.memory import out_of_memory


def _boxed(fn):
    fn._boxed_call = True
    return fn


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def measure_memory(executable, state, gm, phase: str, region: int):
    return tracker_of(state.stats).executable(gm, phase, region, state.dp.device)


def record_order(executable, state, index: int, phase: str):
    """Tells ``state`` that the ``phase`` graph of region ``index`` runs
    (``ModelState.region_order``, the execution order the planner composes)."""

    def run(args):
        state.ran_region(index, phase)
        return executable(args)

    return _boxed(run)


def translate_oom(executable, state, phase: str, plan):
    """``torch.OutOfMemoryError`` says which budget to change."""

    def run(args):
        try:
            return executable(args)
        except torch.OutOfMemoryError as exc:
            raise out_of_memory(state, exc, phase=phase, plan=plan, rank=rank()) from exc

    return _boxed(run)


def count_comm(executable, stats, static: dict[str, int], by_scope: dict[str, dict[str, int]] | None = None):
    """Adds the graph's bytes per collective kind (and scope) to the step's counters each run."""

    def run(args):
        stats.add_all(static, by_scope)
        return executable(args)

    return _boxed(run)


def stream_nvme_params(executable, store, gm):
    """Release the whole mapping after ``gm`` ran, if it reads the parameter
    file (also when it raises: the kernel's fault-around maps neighbours of
    the pages read). The graph's ``read_ahead`` nodes request its reads (the
    ``nvme_read_ahead`` pass); the file shards it copies that no such node
    requests (the pass disabled) are read ahead here, in copy order, before it
    runs."""
    names = [n for n in graph_reads(gm) if store.holds(n)]
    if not names:
        return executable
    requested = set(announced_reads(gm))
    fallback = [n for n in names if n not in requested]

    def run(args):
        if fallback:
            store.read_ahead(fallback)
        try:
            return executable(args)
        finally:
            store.release()

    return _boxed(run)


def wrap(executable, state, config, gm, phase: str, region, memory_plan):
    """All hooks that apply to a model's compiled graph (none without a model state)."""
    if state is None:
        return executable
    if config.zerograph.track_memory:
        executable = measure_memory(executable, state, gm, phase, region.index)
    executable = record_order(executable, state, region.index, phase)
    executable = translate_oom(executable, state, phase, memory_plan)
    if state.collective_guard is not None:
        executable = state.collective_guard(executable, phase)
    static = region.comm_bytes.get(phase)
    if static:
        executable = count_comm(executable, state.stats, static, region.comm_bytes_by_scope.get(phase))
    if state.nvme_params is not None:
        executable = stream_nvme_params(executable, state.nvme_params, gm)
    return executable
