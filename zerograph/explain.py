"""``zerograph.explain``: what zerograph will do to a model, before training it.

    report = zerograph.explain(model, config, idx, targets)
    print(report)                          # passes, memory per rank, traffic per step, vs DDP/FSDP2
    report.write_chrome_trace("plan.json") # open in https://ui.perfetto.dev

It compiles a copy of the model (the model passed in is not changed), runs
one forward and backward of the example inputs to trace and partition the
graphs (no optimizer step), and reads the final graphs with the liveness
analysis (:mod:`zerograph.planner.liveness`). Without an initialized process
group it uses PyTorch's fake process group as rank 0 of ``world_size``
ranks, so nothing is communicated; with one, it is collective (call it on
every rank).

Also ``python -m zerograph explain CONFIG --model gpt-tiny --world-size 2``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from zerograph import api
from zerograph.config import Config
from zerograph.graph.hpz import secondary_bytes
from zerograph.passes.error_feedback import residual_bytes
from zerograph.planner.liveness import KINDS
from zerograph.planner.step_plan import MemoryPlan
from zerograph.runtime.memory import host_state_bytes, model_state_bytes

log = logging.getLogger(__name__)

__all__ = ["Explanation", "explain"]


def _mib(n: float) -> str:
    return f"{n / 2**20:10.3f} MiB"


def _host_lines(host: dict[str, int]) -> list[str]:
    """The model states ZeRO-Offload keeps in host memory (none: no line)::

      on the host         0.129 MiB   (offload: params 0.032, grads 0.032, optimizer states 0.065, masters 0.000)
    """
    if not sum(host.values()):
        return []
    parts = ", ".join(f"{k.replace('_', ' ')} {v / 2**20:.3f}" for k, v in host.items())
    return [f"  on the host         {_mib(sum(host.values()))}   (offload, not in model states above: {parts})"]


def _host_step_lines(plan: MemoryPlan) -> list[str]:
    """The host bytes the step's graphs hold (offload copies; none: no line)::

      host in-step peak     0.000 MiB   (offload copies, not in the device peaks above: gradient 0.000)
    """
    if not plan.peak_host_total_bytes:
        return []
    parts = ", ".join(f"{k} {v / 2**20:.3f}" for k, v in plan.peak_host.items() if v)
    return [f"  host in-step peak   {_mib(plan.peak_host_total_bytes)}   "
            f"(offload copies, not in the device peaks above: {parts})"]


@dataclasses.dataclass
class Explanation:
    """The result of :func:`explain`: print it, or write a Chrome trace."""

    config: Config
    world_size: int
    num_params: int  # Ψ, distinct parameter elements
    model_states: dict[str, int]  # this rank's bytes: params, grads, optimizer_states
    plan: MemoryPlan
    inspection: Any  # zerograph.Inspection of the traced copy
    master_bytes: int  # bytes per element of the stored (master) parameters
    host_states: dict[str, int] = dataclasses.field(default_factory=dict)  # ZeRO-Offload: this rank's host bytes

    @property
    def ddp_model_states(self) -> int:
        """DDP: every rank holds parameters, gradients and Adam's two moments
        in full: ``Ψ · (m + m + 2m)`` bytes, m = master bytes per element
        (16 Ψ for fp32)."""
        return 4 * self.master_bytes * self.num_params

    @property
    def fsdp2_model_states(self) -> int:
        """FSDP2 (``fully_shard``, fp32 sharded storage): the DDP bytes over
        the ranks, ``Ψ · 4m / W`` (16 Ψ / W for fp32; padding not counted)."""
        return self.ddp_model_states // self.world_size

    def communication(self) -> dict[str, int]:
        """Bytes per optimizer step by collective kind (this rank)."""
        return self.plan.comm_bytes_per_step

    def communication_by_scope(self) -> dict[str, dict[str, int]]:
        """Bytes per optimizer step by scope (``intra_group``: collectives
        inside a ZeRO++ node, ``cross_group``: the rest), then by kind."""
        out: dict[str, dict[str, int]] = {}
        n = self.config.gradient_accumulation_steps
        for region in self.inspection.regions:
            for phase in ("forward", "backward"):
                for scope, counts in region["comm_bytes_by_scope"].get(phase, {}).items():
                    for kind, nbytes in counts.items():
                        out.setdefault(scope, {})[kind] = out.get(scope, {}).get(kind, 0) + n * nbytes
        return out

    def secondary_bytes(self) -> int:
        """ZeRO++ hpZ: bytes of this rank's secondary shards, held from each
        forward to its backward (counted in the gathered-parameter bytes)."""
        return sum(secondary_bytes(r["graphs"]["forward"]) for r in self.inspection.regions
                   if "forward" in r["graphs"])

    def feedback_bytes(self) -> int:
        """ZeRO++ qgZ error feedback: bytes of this rank's fp32 residuals, kept
        between steps (one per quantized hop input of every backward graph)."""
        return sum(residual_bytes(r["graphs"]["backward"]) for r in self.inspection.regions
                   if "backward" in r["graphs"])

    def volume_elements(self) -> int:
        """Elements per step in the ZeRO paper's unit (an all-reduce counts twice)."""
        e = self.plan.comm_elements_per_step
        return e["all_gather"] + e["reduce_scatter"] + 2 * e["all_reduce"]

    def __str__(self) -> str:
        cfg = self.config
        psi, w = self.num_params, self.world_size
        lines = [
            f"zerograph explain: ZeRO stage {cfg.stage}, world size {w}, {psi:,} parameters (Ψ), "
            f"compute {str(cfg.compute_dtype).replace('torch.', '')}, "
            f"{len(self.inspection.regions)} compiled region(s)",
            "",
            "passes (phase, name, time, nodes added/removed, what it did):",
        ]
        for rec in self.inspection.passes:
            details = _short(rec.details)
            lines.append(f"  {rec.summary()}{'  ' + details if details else ''}")
        states = self.model_states
        total_states = sum(states.values())
        peak = self.plan.peak
        lines += [
            "",
            "memory per rank (this rank; model states between steps, the rest predicted for one step):",
            f"  parameters          {_mib(states['params'])}",
            f"  gradients           {_mib(states['grads'])}",
            f"  optimizer states    {_mib(states['optimizer_states'])}   (Adam/AdamW: 2 moments per element)",
            f"  model states        {_mib(total_states)}",
            *_host_lines(self.host_states),
            *(self.inspection.nvme.lines() if getattr(self.inspection, "nvme", None) is not None else []),
            f"  gathered-param peak {_mib(peak['gathered'])}",
            f"  activation peak     {_mib(peak['activation'])}   (saved for the backward)",
            f"  live in-step peak   {_mib(self.plan.peak_total_bytes)}   (gathered + saved + gradients + temporaries)",
            *_host_step_lines(self.plan),
            *self._secondary_lines(),
            *([f"  qgZ residuals       {_mib(self.feedback_bytes())}   (error feedback: fp32, one per quantized "
               "hop input, kept between steps)"] if self.feedback_bytes() else []),
            f"  step timeline       {self.plan.order_note()}",
            f"  DDP model states    {_mib(self.ddp_model_states)}   (= Ψ·(m + m + 2m), m = {self.master_bytes} bytes)",
            f"  FSDP2 model states  {_mib(self.fsdp2_model_states)}   (= Ψ·4m / W)",
            "",
            "communication per optimizer step (this rank, full-buffer bytes by collective):",
        ]
        for kind, nbytes in self.communication().items():
            lines.append(f"  {kind:<15} {nbytes:>14,} bytes")
        k = max(self.config.zero_optimization.zero_hpz_partition_size, self.config.zerograph.ranks_per_node)
        if k > 1:
            for scope, counts in sorted(self.communication_by_scope().items()):
                where = "inside a node" if scope == "intra_group" else "across nodes"
                lines.append(f"  {scope:<15} {sum(counts.values()):>14,} bytes ({where}, nodes of {k} ranks: "
                             + ", ".join(f"{kind} {v:,}" for kind, v in counts.items() if v) + ")")
        lines += [
            f"  volume          {self.volume_elements():>14,} elements (ZeRO paper unit; all-reduce counts 2x)",
            f"  DDP             {2 * psi:>14,} elements (= 2Ψ, all-reduce)",
            f"  FSDP2           {3 * psi:>14,} elements (= 3Ψ, reshard after forward)",
        ]
        return "\n".join(lines)

    def _secondary_lines(self) -> list[str]:
        k = self.config.zero_optimization.zero_hpz_partition_size
        nbytes = self.secondary_bytes()
        if not nbytes:
            return []
        return [f"  hpZ secondary       {_mib(nbytes)}   (shards over a node of {k} ranks, held forward to "
                "backward; in the gathered-param peak)"]

    def chrome_trace(self) -> dict:
        """The step's memory timeline and collectives as Chrome trace JSON
        (``traceEvents``): one microsecond per graph node, the graphs in
        execution order (:meth:`MemoryPlan.segments`: the forwards of the
        regions in the order they ran, then their backwards in reverse);
        counter events ``live bytes`` by kind, with the bytes the earlier
        regions hold for their backward included (the composed step), duration
        events per compute node (thread "compute") and per collective from its
        start to its wait (thread "comm"), each with its region; with offload
        copies in host memory, counter events ``host bytes`` by kind as well
        (the graph's own, not composed across regions)."""
        pid = 0
        events: list[dict] = [
            {"ph": "M", "name": "process_name", "pid": pid, "args": {"name": "zerograph plan (rank 0)"}},
            {"ph": "M", "name": "thread_name", "pid": pid, "tid": 1, "args": {"name": "compute"}},
            {"ph": "M", "name": "thread_name", "pid": pid, "tid": 2, "args": {"name": "comm"}},
        ]
        ts = 0
        host_trace = self.plan.peak_host_total_bytes > 0
        for seg in self.plan.segments():
            region = seg.region.index
            held = sum(seg.held.values())
            ts_of: dict[int, int] = {}
            base = None
            for entry in seg.entries:
                if base is None:
                    base = ts - entry.index
                ts = base + entry.index
                ts_of[entry.index] = ts
                events.append({"ph": "C", "name": "live bytes", "pid": pid, "ts": ts,
                               "args": {k: entry.live[k] for k in KINDS}})
                if host_trace:  # offload copies in host memory, apart from the device's live bytes
                    events.append({"ph": "C", "name": "host bytes", "pid": pid, "ts": ts,
                                   "args": {k: entry.node.host[k] for k in KINDS}})
                if entry.role not in ("all_gather", "reduce_scatter", "all_reduce"):
                    events.append({"ph": "X", "name": entry.name, "cat": f"{entry.phase} {entry.role}", "pid": pid,
                                   "tid": 1, "ts": ts, "dur": 1,
                                   "args": {"region": region, "held_by_other_regions": held}})
                ts += 1
            for phase, start, wait, kind, nbytes in seg.region.collectives:
                if phase != seg.phase or start not in ts_of:
                    continue
                begin = ts_of[start]
                end = ts_of.get(wait, begin)
                events.append({"ph": "X", "name": kind, "cat": f"{phase} comm", "pid": pid, "tid": 2, "ts": begin,
                               "dur": max(1, end - begin + 1), "args": {"bytes": nbytes, "region": region}})
        return {"traceEvents": events, "displayTimeUnit": "ns",
                "otherData": {"time_unit": "1 us = 1 graph node", "stage": self.config.stage,
                              "world_size": self.world_size, "regions": self.plan.order_note()}}

    def write_chrome_trace(self, path: str | os.PathLike) -> None:
        """Write :meth:`chrome_trace` to ``path`` (opens in Perfetto or chrome://tracing)."""
        with open(path, "w") as f:
            json.dump(self.chrome_trace(), f)


def _short(details: dict) -> str:
    if not details:
        return ""
    text = ", ".join(f"{k}={v}" for k, v in details.items())
    return text if len(text) <= 160 else text[:157] + "..."


def _loss_of(out) -> torch.Tensor:
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, dict):
        loss = out.get("loss")
    if isinstance(loss, torch.Tensor):
        return loss
    if isinstance(out, torch.Tensor):
        return out.float().sum()
    tensors = [t for t in (out if isinstance(out, (tuple, list)) else ()) if isinstance(t, torch.Tensor)]
    floats = [t.float().sum() for t in tensors if t.is_floating_point() and t.requires_grad]
    if not floats:
        raise TypeError(
            f"zerograph.explain: the model returned {type(out).__name__} with no loss and no floating tensor "
            "that requires grad; pass example inputs for which the model returns a loss (e.g. with targets)"
        )
    return sum(floats)


def explain(model: nn.Module, config: Config | dict | str | os.PathLike | None = None, *example_inputs,
            world_size: int = 2, **example_kwargs) -> Explanation:
    """Trace a copy of ``model`` with ``config`` on ``example_inputs`` and
    report the passes, the predicted per-rank memory and the communication
    per step (see the module docstring). ``world_size`` is used only when no
    process group is initialized (the fake process group, rank 0)."""
    if not example_inputs and not example_kwargs:
        raise TypeError("zerograph.explain(model, config, *example_inputs): pass at least one example input "
                        "(a batch the model accepts), e.g. zerograph.explain(model, cfg, idx, targets)")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    cfg = Config.load(config)
    if cfg.pipeline.stages > 1:
        raise ValueError(
            f"zerograph.explain plans ZeRO inside one data-parallel group and does not split pipelines "
            f"(pipeline.stages={cfg.pipeline.stages}); explain the config without its pipeline section, "
            "or compile the pipeline and read zerograph.inspect(model) for each stage")
    own_group = not dist.is_initialized()
    if own_group:
        from zerograph._torch_private import fake_store

        dist.init_process_group("fake", store=fake_store(), rank=0, world_size=world_size)
    try:
        clone = copy.deepcopy(model)
        with warnings.catch_warnings():  # the fake group has no timeout to set
            warnings.filterwarnings("ignore", message="Set timeout is now only supported")
            # the example is also the batch tensor parallelism's graph rule traces (a dict: keywords)
            batch = example_kwargs if not example_inputs else example_inputs if not example_kwargs else None
            compiled = api.compile(clone, cfg, example_batch=batch)
        ctx = compiled._zg_runtime.ctx
        loss = _loss_of(compiled(*example_inputs, **example_kwargs))
        loss.backward()
        info = api.inspect(compiled)
        plan = info.memory
        states, psi, master = model_state_bytes(ctx)
        return Explanation(ctx.config, ctx.world_size, psi, states, plan, info, master, host_state_bytes(ctx))
    finally:
        if own_group:
            dist.destroy_process_group()
