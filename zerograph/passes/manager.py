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

    passes = zerograph.default_passes()
    passes.insert_after("lower_markers", GraphPass("count_waits", my_fn, phases=("backward",)))
    passes.disable("dce")
    model = zerograph.compile(model, config, passes=passes)
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

    def __post_init__(self):
        bad = [p for p in self.phases if p not in PHASES]
        if bad:
            raise ValueError(f"pass {self.name!r}: unknown phase(s) {bad}; choose from {PHASES}")


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

    def disable(self, *names: str) -> "PassList":
        for name in names:
            self._index(name)
            self._disabled.add(name)
        return self

    def enabled(self, phase: str) -> list[GraphPass]:
        return [p for p in self._passes if phase in p.phases and p.name not in self._disabled]


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
    """What a pass may read: the graph's phase, the model's sharding context
    (``None`` for a model that zerograph did not shard) and the config."""

    phase: str
    sharding: object | None
    config: object
