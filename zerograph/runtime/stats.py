"""Communication accounting: bytes per collective kind, per step."""

from __future__ import annotations

import dataclasses
from collections import Counter

KINDS = ("all_gather", "reduce_scatter", "all_reduce")
# ZeRO++'s quantized gradient reduction (qgZ) adds all-to-alls; a step's
# counts list the kinds above always, other kinds when they moved bytes
EXTRA_KINDS = ("all_to_all",)
# where a collective's traffic goes (zerograph.runtime.hierarchy): inside a node, or across nodes
SCOPES = ("intra_group", "cross_group")


def collective_buffer_bytes(kind: str, in_bytes: int, out_bytes: int) -> int:
    """The size of the full (unsharded) buffer a collective moves.

    all-gather: its output; reduce-scatter: its input; all-reduce and
    all-to-all: its input.
    This is the unit of the ZeRO paper's formulas, where one all-reduce of
    Psi elements costs 2 Psi and one all-gather or reduce-scatter costs Psi.
    """
    return out_bytes if kind == "all_gather" else in_bytes


def kinds_of(counts: Counter | dict) -> dict[str, int]:
    """``counts`` with every kind of :data:`KINDS` and the extra kinds that moved bytes."""
    out = {k: int(counts.get(k, 0)) for k in KINDS}
    out.update({k: int(v) for k, v in counts.items() if k not in KINDS and v})
    return out


@dataclasses.dataclass
class CommStats:
    """Bytes moved by this rank, by collective kind, and by scope
    (:data:`SCOPES`: inside this rank's node or across nodes).

    ``current`` accumulates since the last :meth:`end_step`; ``last_step``
    holds the totals of the last finished step (``last_step_by_scope`` the
    same by scope, then kind).
    """

    current: Counter = dataclasses.field(default_factory=Counter)
    last_step: dict[str, int] = dataclasses.field(default_factory=dict)
    current_by_scope: dict[str, Counter] = dataclasses.field(
        default_factory=lambda: {scope: Counter() for scope in SCOPES})
    last_step_by_scope: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    # set with zerograph.track_memory: the model's measuring interpreter's
    # record (zerograph.planner.measured.MemoryTracker; it has end_step())
    memory: object | None = None

    def add(self, kind: str, nbytes: int, scope: str = "cross_group") -> None:
        self.current[kind] += nbytes
        self.current_by_scope[scope][kind] += nbytes

    def add_all(self, by_kind: dict[str, int], by_scope: dict[str, dict[str, int]] | None = None) -> None:
        """Add a graph's bytes by kind; ``by_scope`` splits them by scope
        (without it they count as cross-group)."""
        self.current.update(by_kind)
        for scope, counts in (by_scope or {"cross_group": by_kind}).items():
            self.current_by_scope[scope].update(counts)

    def end_step(self) -> None:
        self.last_step = kinds_of(self.current)
        self.last_step_by_scope = {scope: kinds_of(c) for scope, c in self.current_by_scope.items()}
        self.current = Counter()
        self.current_by_scope = {scope: Counter() for scope in SCOPES}
        if self.memory is not None:
            self.memory.end_step()

    @staticmethod
    def volume(by_kind: dict[str, int]) -> int:
        """Traffic in the ZeRO paper's unit (an all-reduce counts twice)."""
        return (by_kind.get("all_gather", 0) + by_kind.get("reduce_scatter", 0) + 2 * by_kind.get("all_reduce", 0)
                + by_kind.get("all_to_all", 0))
