"""Named graph passes, their order as data, and the manager that runs them.

A pass is a small function ``fn(gm, ctx) -> PassResult | None`` on a
``torch.fx.GraphModule``. Options are bound by keyword with
``functools.partial``. Each pass names the graphs it applies to:

* ``"dynamo"``: the graph Dynamo captured, before AOTAutograd traces it;
* ``"joint"``: AOTAutograd's joint forward+backward graph, before partitioning
  (where save/recompute decisions are made);
* ``"forward"``, ``"backward"``, ``"inference"``: the partitioned graphs
  (where markers are lowered into collectives).

Users change the pipeline as data::

    passes = zerograph.default_passes(config)
    passes.insert_after("lower_markers", GraphPass("count_waits", my_fn, phases=("backward",),
                                                   requires=("collectives",)))
    passes.disable("dce")
    model = zerograph.compile(model, config, passes=passes)

A pass may declare properties of the graph it ``requires`` and ``ensures``
(built-in properties: :data:`PROPERTIES`). :meth:`PassList.check_order`
refuses a list in which a pass requires a property that only a later pass
ensures, naming both passes. A pass may also say when it applies
(``applies(config, plan) -> bool``); :meth:`PassList.enabled` leaves out the
passes that do not apply, so ``zerograph.inspect`` never lists a pass that
did nothing.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from typing import Callable, Iterable, Sequence

import torch.fx as fx

log = logging.getLogger(__name__)

PHASES = ("dynamo", "joint", "forward", "backward", "inference")
# the order graphs of one region are compiled in: a property a pass ensures on
# an earlier graph holds on the later ones (forward, backward and inference
# graphs are partitioned from the same joint graph, so they rank equal)
_PHASE_RANK = {"dynamo": 0, "joint": 1, "forward": 2, "backward": 2, "inference": 2}

# properties the built-in passes ensure, for custom passes to require
PROPERTIES = {
    "markers_deduplicated": "each parameter is read by one unshard marker per Dynamo graph",
    "tagged": "every node carries zerograph's tag (module path, layer, parameter, phase, role)",
    "recompute_policy": "the joint graph's nodes carry the save/recompute decisions of ZeRO and checkpointing",
    "collectives": "markers are lowered to functional collectives with explicit waits",
    "tensor_parallel": "split layers compute on this rank's tensor-parallel slice (per-rank shapes, f/g markers)",
    "scheduled": "collective starts and waits are placed by the scheduler (prefetch, deferred waits)",
}


class PassOrderError(ValueError):
    """A pass list in which a pass runs before what it requires."""


@dataclasses.dataclass
class PassResult:
    """What a pass changed. ``details`` is free-form (match counts, decisions)."""

    changed: bool = False
    details: dict = dataclasses.field(default_factory=dict)
    counts: dict = dataclasses.field(default_factory=dict)  # matches per pattern (fusion passes)


@dataclasses.dataclass(frozen=True)
class PassRecord:
    """What one pass did to one graph: time, node counts, details."""

    name: str
    phase: str
    seconds: float
    nodes_before: int
    nodes_after: int
    added: tuple[str, ...]
    removed: tuple[str, ...]
    details: dict
    counts: dict = dataclasses.field(default_factory=dict)

    def summary(self) -> str:
        counts = "  " + ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items())) if self.counts else ""
        return (
            f"{self.phase:>9} {self.name:<22} {self.seconds * 1e3:7.2f} ms  "
            f"+{len(self.added)} -{len(self.removed)} nodes{counts}"
        )


@dataclasses.dataclass(frozen=True)
class GraphPass:
    name: str
    fn: Callable
    phases: tuple[str, ...] = ("forward", "backward", "inference")
    analysis: bool = False  # an analysis must not mutate the graph; checked in verify mode
    requires: tuple[str, ...] = ()  # graph properties this pass needs (PROPERTIES or a custom pass's)
    ensures: tuple[str, ...] = ()  # graph properties that hold after it
    # applies(config, plan) -> bool: whether the pass does anything for this
    # config and parallel plan (plan None: a model zerograph did not shard)
    applies: Callable | None = None

    def __post_init__(self):
        bad = [p for p in self.phases if p not in PHASES]
        if bad:
            raise ValueError(f"pass {self.name!r}: unknown phase(s) {bad}; choose from {PHASES}")
        for field in ("requires", "ensures"):
            if isinstance(getattr(self, field), str):
                raise TypeError(f"pass {self.name!r}: {field} is a tuple of property names, e.g. ({getattr(self, field)!r},)")

    def applies_to(self, config, plan) -> bool:
        return self.applies is None or bool(self.applies(config, plan))


class PassList:
    """An ordered, editable list of passes (order is data)."""

    def __init__(self, passes: Iterable[GraphPass] = ()):
        self._passes: list[GraphPass] = list(passes)
        self._disabled: set[str] = set()
        names = [p.name for p in self._passes]
        dup = [n for n, c in Counter(names).items() if c > 1]
        if dup:
            raise ValueError(f"duplicate pass names: {dup}")

    def __iter__(self):
        return iter(self._passes)

    def __len__(self):
        return len(self._passes)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self._passes]

    def copy(self) -> "PassList":
        new = PassList(self._passes)
        new._disabled = set(self._disabled)
        return new

    def _index(self, name: str) -> int:
        for i, p in enumerate(self._passes):
            if p.name == name:
                return i
        raise KeyError(f"no pass named {name!r}; passes are: {', '.join(self.names)}")

    def _check_new(self, new: GraphPass) -> None:
        if new.name in self.names:
            raise ValueError(f"a pass named {new.name!r} already exists")

    def insert_before(self, name: str, new: GraphPass) -> "PassList":
        self._check_new(new)
        self._passes.insert(self._index(name), new)
        return self

    def insert_after(self, name: str, new: GraphPass) -> "PassList":
        self._check_new(new)
        self._passes.insert(self._index(name) + 1, new)
        return self

    def append(self, new: GraphPass) -> "PassList":
        self._check_new(new)
        self._passes.append(new)
        return self

    def remove(self, name: str) -> "PassList":
        del self._passes[self._index(name)]
        return self

    def disable(self, *names: str, missing_ok: bool = False) -> "PassList":
        for name in names:
            if missing_ok and name not in self.names:
                continue
            self._index(name)
            self._disabled.add(name)
        return self

    def _running(self, config, plan) -> list[GraphPass]:
        """The passes that run, in order: not disabled, applying to ``config``
        and ``plan`` (when a config is given), and with every property they
        require ensured by a pass that runs (a pass whose prerequisite is
        disabled or does not apply has nothing to work on and is left out)."""
        out: list[GraphPass] = []
        ensured: set[str] = set()
        for p in self._passes:
            if p.name in self._disabled or (config is not None and not p.applies_to(config, plan)):
                continue
            out.append(p)
            ensured.update(p.ensures)
        while True:  # leaving one out may leave out what it ensured
            ensured = {prop for p in out for prop in p.ensures}
            kept = [p for p in out if all(prop in ensured for prop in p.requires)]
            if len(kept) == len(out):
                return out
            out = kept

    def enabled(self, phase: str, config=None, plan=None) -> list[GraphPass]:
        """The passes that run on the ``phase`` graph, in order (see :meth:`_running`)."""
        return [p for p in self._running(config, plan) if phase in p.phases]

    def active(self, config=None, plan=None) -> "PassList":
        """A copy holding only the passes that run for ``config`` and ``plan``."""
        return PassList(self._running(config, plan))

    def check_order(self, config=None, plan=None) -> None:
        """Raise :class:`PassOrderError` if a running pass requires a property
        that a pass ensures only after it (naming both passes), or that no
        pass of the list ensures at all (a misspelt property)."""
        known = {prop for p in self._passes for prop in p.ensures}
        for p in self._passes:
            for prop in p.requires:
                if prop not in known:
                    raise PassOrderError(
                        f"pass {p.name!r} requires {prop!r}, which no pass ensures; built-in properties: "
                        f"{', '.join(sorted(PROPERTIES))}")
        running = self._running(config, plan)
        for i, p in enumerate(running):
            for prop in p.requires:
                for phase in p.phases:
                    rank = _PHASE_RANK[phase]
                    if any(prop in q.ensures and any(_PHASE_RANK[qp] < rank or (qp == phase and j < i)
                                                     for qp in q.phases)
                           for j, q in enumerate(running)):
                        continue
                    later = next(q.name for q in running if prop in q.ensures)
                    raise PassOrderError(
                        f"pass {p.name!r} requires {prop!r} on the {phase} graph, which pass {later!r} "
                        f"ensures, but {later!r} runs after {p.name!r} there; insert {p.name!r} after "
                        f"{later!r} (passes.insert_after({later!r}, ...))")


def _node_keys(gm: fx.GraphModule) -> dict[str, str]:
    return {n.name: f"{n.op}:{getattr(n.target, '__name__', n.target)}" for n in gm.graph.nodes}


def _fingerprint(gm: fx.GraphModule) -> str:
    return str(gm.graph)


def run_passes(
    passes: Sequence[GraphPass],
    gm: fx.GraphModule,
    ctx,
    *,
    phase: str,
    debug: bool = False,
    verify: Callable[[fx.GraphModule, str], None] | None = None,
) -> list[PassRecord]:
    """Run ``passes`` in order on ``gm`` and record what each did."""
    records = []
    for p in passes:
        before = _node_keys(gm)
        fingerprint = _fingerprint(gm) if (verify and p.analysis) else None
        start = time.perf_counter()
        result = p.fn(gm, ctx) or PassResult()
        seconds = time.perf_counter() - start
        after = _node_keys(gm)
        if fingerprint is not None and _fingerprint(gm) != fingerprint:
            raise AssertionError(f"analysis pass {p.name!r} mutated the {phase} graph")
        if verify is not None:
            verify(gm, f"after pass {p.name!r} on the {phase} graph")
        record = PassRecord(
            name=p.name,
            phase=phase,
            seconds=seconds,
            nodes_before=len(before),
            nodes_after=len(after),
            added=tuple(f"{k}={after[k]}" for k in after if k not in before),
            removed=tuple(f"{k}={before[k]}" for k in before if k not in after),
            details=dict(result.details),
            counts=dict(result.counts),
        )
        records.append(record)
        if debug:
            log.info("zerograph pass %s", record.summary())
            for line in record.added:
                log.info("    + %s", line)
            for line in record.removed:
                log.info("    - %s", line)
    return records


@dataclasses.dataclass
class PassContext:
    """What a pass may read: the graph's phase, the model's runtime state
    (:class:`zerograph.runtime.state.ModelState`; ``None`` for a model that
    zerograph did not shard) and the config; :attr:`plan` is the state's
    :class:`~zerograph.runtime.plan.ParallelPlan`."""

    phase: str
    state: object | None
    config: object

    @property
    def plan(self):
        return getattr(self.state, "plan", None)
