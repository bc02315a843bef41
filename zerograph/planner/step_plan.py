"""The step's memory plan: a compiled model's regions composed along a step.

:func:`~zerograph.planner.liveness.plan_region` plans one compiled region
(its forward and backward graphs); this module puts the regions of a model
together, an analysis like it (nothing here mutates a graph).
:func:`plan_model` gives the :class:`MemoryPlan` of all regions, with the
communication per step (``zerograph.explain``, ``zerograph.inspect``);
:func:`plan_in_step` gives one region composed with those run before it,
which the memory limit checks at compile time.

A model with graph breaks has several regions. A step runs their forwards in
execution order and their backwards in reverse (the autograd engine's order
along a chain of regions), and each region's saved values
(:attr:`~zerograph.planner.liveness.RegionPlan.held`) stay alive from the end of its forward to the start
of its backward. :class:`MemoryPlan` composes the regions along that step
(:attr:`MemoryPlan.step`): while a region runs, its own live bytes plus what
the regions before it hold. The execution order is recorded by the runtime
(``ModelState.region_order``: the regions whose forward ran in the
latest model call); without it the plan says the order is unknown and its
peaks are per region. Gradients that a later region's backward already
returned are not held here: they are in ``param.grad`` (or the no-sync
stash), which model states count (``gradients``), so they are not added
again. A region's inputs are ``input`` in that region: a value one region
returns and a later region saves counts in the held bytes of the earlier
region only when the earlier region saves it too (a value a region saves
for its own backward, such as the output of ``tanh`` or ``relu``).

The memory limit (``zerograph.memory_limit_bytes``) checks one region at a
time, when its backward (or inference) graph is compiled, composed the same
way (:func:`plan_in_step`, equal to :meth:`MemoryPlan.in_step` once every
graph exists): its own peaks plus the held bytes of the regions whose
forward ran before it. Those regions' backward graphs do not exist yet, so
:func:`~zerograph.planner.liveness.held_by_forward` reads what they hold from the forward graph alone:
AOTAutograd returns the saved values as the forward's last outputs, and
their count (:func:`~zerograph.planner.liveness.saved_count`) is recorded when the joint graph is
partitioned.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

from zerograph.planner.liveness import (
    KINDS,
    NodeLive,
    RegionPlan,
    held_by_forward,
    plan_region,
    saved_count,
)
from zerograph.runtime.stats import KINDS as COMM_KINDS


@dataclasses.dataclass(frozen=True)
class StepLive:
    """One node of the composed step (:attr:`MemoryPlan.step`): a region's
    own entry and the bytes the other regions hold meanwhile."""

    region: int  # the region's index
    run: int | None  # its position in MemoryPlan.order (None: not in the recorded model call)
    node: NodeLive  # the region's own live bytes (its RegionPlan's timeline entry)
    held: dict[str, int]  # by kind: what the regions run before it saved for their backward

    @property
    def phase(self) -> str:
        return self.node.phase

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def index(self) -> int:
        return self.node.index

    @property
    def role(self) -> str:
        return self.node.role

    @property
    def live(self) -> dict[str, int]:
        return {k: self.node.live[k] + self.held[k] for k in KINDS}

    @property
    def total(self) -> int:
        return self.node.total + sum(self.held.values())


@dataclasses.dataclass(frozen=True)
class Segment:
    """One graph of the composed step: a region's forward or backward, with
    the bytes other regions hold while it runs."""

    region: RegionPlan
    run: int | None
    phase: str
    held: dict[str, int]

    @property
    def entries(self) -> list[StepLive]:
        return [StepLive(self.region.index, self.run, e, self.held) for e in self.region.timeline
                if e.phase == self.phase]


@dataclasses.dataclass(frozen=True)
class RegionInStep:
    """One region as the step runs it: its own plan (forward and backward)
    and what the regions whose forward ran before it hold meanwhile (their
    saved values, :attr:`RegionPlan.held`), which stays constant while it
    runs. Its peaks are those of its last run in the step; the memory limit
    checks them (:func:`plan_in_step`), :meth:`MemoryPlan.in_step` gives the
    same for a whole plan."""

    region: RegionPlan
    # region indices, in execution order, whose forward ran before this
    # region's (last) run in the step; None: the order is unknown
    earlier: tuple[int, ...] | None
    earlier_held: dict[str, int]  # by kind: the sum of their held bytes
    reason: str = ""  # why the order is unknown

    @property
    def index(self) -> int:
        return self.region.index

    @property
    def order_known(self) -> bool:
        return self.earlier is not None

    @property
    def earlier_held_total(self) -> int:
        return sum(self.earlier_held.values())

    @property
    def peak(self) -> dict[str, int]:
        """Each kind's peak while the region runs: its own + what earlier regions hold."""
        return {k: self.region.peak[k] + self.earlier_held[k] for k in KINDS}

    @property
    def peak_total(self) -> int:
        return self.region.peak_total + self.earlier_held_total

    def note(self) -> str:
        """How the peak was composed, in words ("" when no other region is involved)."""
        i = self.index
        if self.earlier is None:
            why = f" ({self.reason})" if self.reason else ""
            return (f"execution order unknown{why}: region {i} checked on its own; what other regions "
                    "hold for their backward while it runs is not added (a lower bound)")
        if not self.earlier:
            return ""
        runs = (*self.earlier, i)
        held = ", ".join(map(str, dict.fromkeys(self.earlier)))
        return (f"execution order: forward {' -> '.join(map(str, runs))}, then backward "
                f"{' -> '.join(map(str, reversed(runs)))}; what region(s) {held} saved for their backward "
                f"is held while region {i} runs")


def _earlier(order: list[int], index: int) -> list[int]:
    """The regions whose forward ran before ``index``'s last run in ``order``
    (all of ``order`` when ``index`` has not run yet)."""
    if index not in order:
        return list(order)
    last = len(order) - 1 - order[::-1].index(index)
    return order[:last]


@dataclasses.dataclass
class MemoryPlan:
    """Predicted per-rank memory during a step and communication per step.

    ``order``: the region indices in the order their forward (or inference)
    graph ran in the latest model call, as the runtime recorded it (a region
    run twice appears twice); ``None`` when it was not recorded (a pipeline
    rank with several stages, a model the runtime did not call). The step
    (:attr:`step`, :meth:`segments`) runs those forwards in order, then their
    backwards in reverse; each region's saved values (:attr:`RegionPlan.held`)
    are held from its forward's end to its backward's start. Regions not in
    ``order`` (another micro-batch's variant, an older recompile; every
    region when the order is unknown) follow on their own, nothing held.
    ``peak`` and ``peak_total_bytes`` are the largest over that timeline:
    exact for one region; for several, with the order known, under the rules
    of the module docstring (memory that eager code between regions holds is
    not seen); with several regions and no order they are per region (a
    lower bound)."""

    regions: list[RegionPlan]
    gradient_accumulation_steps: int = 1
    order: list[int] | None = None

    @property
    def order_known(self) -> bool:
        """Whether the regions' execution order is known (recorded, or one region)."""
        return self.order is not None or len(self.regions) <= 1

    def segments(self) -> list[Segment]:
        """The step's graphs in execution order, each with what the other regions hold."""
        by_index = {r.index: r for r in self.regions}
        order = [i for i in (self.order or ()) if i in by_index]
        out: list[Segment] = []
        held = dict.fromkeys(KINDS, 0)
        for run, i in enumerate(order):
            region = by_index[i]
            out.append(Segment(region, run, "forward", dict(held)))
            held = {k: held[k] + region.held[k] for k in KINDS}
        for run in reversed(range(len(order))):
            region = by_index[order[run]]
            held = {k: held[k] - region.held[k] for k in KINDS}
            if any(e.phase == "backward" for e in region.timeline):
                out.append(Segment(region, run, "backward", dict(held)))
        zero = dict.fromkeys(KINDS, 0)
        for region in self.regions:
            if region.index in order:
                continue
            for phase in dict.fromkeys(e.phase for e in region.timeline):
                out.append(Segment(region, None, phase, zero))
        return out

    def in_step(self, index: int) -> RegionInStep:
        """Region ``index`` in the step: its own peaks plus what the regions
        run before its last run hold (the largest of its entries in
        :attr:`step`). Not composed (``earlier`` is ``None``) when the order
        is unknown or the region did not run in the recorded call.
        ``max(in_step(i).peak_total for every region) == peak_total_bytes``."""
        by_index = {r.index: r for r in self.regions}
        region = by_index[index]
        zero = dict.fromkeys(KINDS, 0)
        if self.order is None:
            if len(self.regions) <= 1:
                return RegionInStep(region, (), zero)
            return RegionInStep(region, None, zero, "not recorded by the runtime")
        order = [i for i in self.order if i in by_index]
        if index not in order:
            return RegionInStep(region, None, zero, "not run in the recorded model call")
        earlier = _earlier(order, index)
        held = {k: sum(by_index[j].held[k] for j in earlier) for k in KINDS}
        return RegionInStep(region, tuple(earlier), held)

    @property
    def step(self) -> list[StepLive]:
        """The composed timeline: every node of :meth:`segments`, with ``live``
        = the region's own bytes + what the other regions hold."""
        return [e for seg in self.segments() for e in seg.entries]

    @property
    def peak(self) -> dict[str, int]:
        step = self.step
        return {k: max((e.live[k] for e in step), default=0) for k in KINDS}

    @property
    def peak_gathered_bytes(self) -> int:
        return self.peak["gathered"]

    @property
    def peak_activation_bytes(self) -> int:
        return self.peak["activation"]

    @property
    def peak_total_bytes(self) -> int:
        return max((e.total for e in self.step), default=0)

    @property
    def peak_host(self) -> dict[str, int]:
        """Host bytes the step's graphs hold (offload copies: gradient shards
        copied back, saved activation copies), by kind, each kind's peak. Not
        in :attr:`peak`. Per region: host copies that another region holds
        meanwhile (offloaded activations across a graph break) are not added."""
        return {k: max((r.host_peak[k] for r in self.regions), default=0) for k in KINDS}

    @property
    def peak_host_total_bytes(self) -> int:
        return max((r.host_peak_total for r in self.regions), default=0)

    def _kinds(self) -> list[str]:
        """ZeRO's collective kinds, then any other kind the regions have
        (tensor parallelism's ``tp_all_reduce``)."""
        extra = sorted({k for r in self.regions for k in r.comm_bytes} - set(COMM_KINDS))
        return [*COMM_KINDS, *extra]

    @property
    def comm_bytes_per_step(self) -> dict[str, int]:
        n = self.gradient_accumulation_steps
        return {k: n * sum(r.comm_bytes.get(k, 0) for r in self.regions) for k in self._kinds()}

    @property
    def comm_elements_per_step(self) -> dict[str, int]:
        n = self.gradient_accumulation_steps
        return {k: n * sum(r.comm_elements.get(k, 0) for r in self.regions) for k in self._kinds()}

    def order_note(self) -> str:
        """How the step's timeline was composed, in words."""
        n = len(self.regions)
        count = f"{n} region{'s' if n != 1 else ''}"
        if n <= 1 and (self.order is None or self.order == [r.index for r in self.regions]):
            return count
        if self.order is None:
            return (f"{n} regions, execution order unknown (not recorded by the runtime): "
                    "peaks are per region, not composed")
        with_backward = {r.index for r in self.regions if any(e.phase == "backward" for e in r.timeline)}
        forward = " -> ".join(map(str, self.order))
        backward = " -> ".join(str(i) for i in reversed(self.order) if i in with_backward) or "none"
        note = (f"{count} in execution order: forward {forward}, backward {backward} "
                "(earlier regions' saved values held meanwhile)")
        rest = [str(r.index) for r in self.regions if r.index not in self.order]
        if rest:
            note += f"; not run in the recorded call, on their own: {', '.join(rest)}"
        return note

    def summary(self) -> str:
        p = self.peak
        lines = [
            "predicted peak live bytes per rank: " + ", ".join(f"{k}={p[k]}" for k in KINDS)
            + f", total={self.peak_total_bytes}; {self.order_note()}",
            "predicted communication per step (bytes): "
            + ", ".join(f"{k}={v}" for k, v in self.comm_bytes_per_step.items()),
        ]
        if self.peak_host_total_bytes:
            h = self.peak_host
            lines.insert(1, "predicted peak host bytes per rank (offload copies, not in the above): "
                         + ", ".join(f"{k}={h[k]}" for k in KINDS) + f", total={self.peak_host_total_bytes}")
        return "\n".join(lines)


def plan_model(regions, gradient_accumulation_steps: int = 1, order: Iterable[int] | None = None) -> MemoryPlan:
    """The plan of every compiled region that has a forward graph (training
    regions; an inference-only region counts its ``inference`` graph).
    ``order``: region indices in execution order (``ModelState.region_order``),
    ``None`` when unknown."""
    plans = [p for p in map(_plan_of, regions) if p is not None]
    return MemoryPlan(plans, gradient_accumulation_steps, list(order) if order is not None else None)


def _field(region, name: str, default=None):
    """``region.name`` of a ``CompiledRegion``, or ``region[name]`` of a dict."""
    if isinstance(region, dict):
        return region.get(name, default)
    return getattr(region, name, default)


def _plan_of(region) -> RegionPlan | None:
    graphs, index = _field(region, "graphs"), _field(region, "index")
    if "forward" in graphs:
        return plan_region(graphs["forward"], graphs.get("backward"), index)
    if "inference" in graphs:
        return plan_region(graphs["inference"], None, index)
    return None


def _held_of(region) -> dict[str, int]:
    """What ``region`` holds for its backward (:attr:`RegionPlan.held`),
    from its forward graph and the recorded count of saved values; its
    backward graph is not needed (it is compiled later, during the backward)."""
    graphs = _field(region, "graphs")
    if "forward" not in graphs:  # an inference graph saves nothing
        return dict.fromkeys(KINDS, 0)
    cached = _field(region, "held_bytes")  # a CompiledRegion's final forward graph is analysed once
    if cached is not None:
        return dict(cached)
    backward = graphs.get("backward")
    num_saved = saved_count(backward) if backward is not None else _field(region, "num_saved")
    held = held_by_forward(graphs["forward"], num_saved)
    if not isinstance(region, dict) and num_saved is not None:
        region.held_bytes = dict(held)
    return held


def plan_in_step(regions, index: int, order: Iterable[int] | None, reason: str = "") -> RegionInStep:
    """Region ``index`` of ``regions`` (``CompiledRegion`` objects or the
    dicts of ``zerograph.inspect``) composed with the regions that ran before
    it in this step, as the memory limit checks it when region ``index``'s
    backward (or inference) graph is compiled.

    ``order``: the region indices whose forward (or inference) graph ran in
    this model call, in order (``ModelState.region_order``); region
    ``index`` in it or, not run yet, after it. The regions before its last
    run hold their saved values while it runs: their forward graphs exist, and
    :func:`held_by_forward` reads what they hold from those alone (their
    backward graphs are compiled later, during the backward). ``None``: the
    order is unknown (``reason`` says why); the region is planned on its own.
    The result equals :meth:`MemoryPlan.in_step` of :func:`plan_model` with
    the same order once every backward graph exists."""
    by_index = {_field(r, "index"): r for r in regions}
    own = _plan_of(by_index[index])
    if order is None:
        return RegionInStep(own, None, dict.fromkeys(KINDS, 0), reason)
    earlier = [i for i in _earlier(list(order), index) if i in by_index]
    held = dict.fromkeys(KINDS, 0)
    for i in earlier:
        for k, v in _held_of(by_index[i]).items():
            held[k] += v
    return RegionInStep(own, tuple(earlier), held)
