"""Communication accounting: bytes per collective kind, per step."""

from __future__ import annotations

import dataclasses
from collections import Counter

KINDS = ("all_gather", "reduce_scatter", "all_reduce")


def collective_buffer_bytes(kind: str, in_bytes: int, out_bytes: int) -> int:
    """The size of the full (unsharded) buffer a collective moves.

    all-gather: its output; reduce-scatter: its input; all-reduce: its input.
    This is the unit of the ZeRO paper's formulas, where one all-reduce of
    Psi elements costs 2 Psi and one all-gather or reduce-scatter costs Psi.
    """
    return out_bytes if kind == "all_gather" else in_bytes


@dataclasses.dataclass
class CommStats:
    """Bytes moved by this rank, by collective kind.

    ``current`` accumulates since the last :meth:`end_step`; ``last_step``
    holds the totals of the last finished step.
    """

    current: Counter = dataclasses.field(default_factory=Counter)
    last_step: dict[str, int] = dataclasses.field(default_factory=dict)
    # set with zerograph.track_memory: the model's measuring interpreter's
    # record (zerograph.planner.measured.MemoryTracker; it has end_step())
    memory: object | None = None

    def add(self, kind: str, nbytes: int) -> None:
        self.current[kind] += nbytes

    def add_all(self, by_kind: dict[str, int]) -> None:
        self.current.update(by_kind)

    def end_step(self) -> None:
        self.last_step = {k: int(self.current.get(k, 0)) for k in KINDS}
        # other kinds (tensor parallelism's "tp_all_reduce") only when they moved bytes
        self.last_step.update({k: int(v) for k, v in self.current.items() if k not in KINDS})
        self.current = Counter()
        if self.memory is not None:
            self.memory.end_step()

    @staticmethod
    def volume(by_kind: dict[str, int]) -> int:
        """Traffic in the ZeRO paper's unit (an all-reduce counts twice)."""
        return by_kind.get("all_gather", 0) + by_kind.get("reduce_scatter", 0) + 2 * by_kind.get("all_reduce", 0)
