"""Pipeline schedules as data: one list of actions per pipeline stage.

An :class:`Action` is a forward (``F``) or backward (``B``) of one
micro-batch, or a point-to-point transfer next to it: ``RECV_ACT`` /
``SEND_ACT`` move a micro-batch's boundary activations to the next stage,
``RECV_GRAD`` / ``SEND_GRAD`` move their gradients back. A stage's list is
executed in order; sends never block, receives wait for their data.

For ``p=2, m=4``, :func:`one_f_one_b` gives (``format_grid`` of the
simulated timeline, one column per stage)::

    step  stage0  stage1
       0  F0      .
       1  F1      F0
       2  .       B0
       3  B0      F1
       ...
"""

from __future__ import annotations

import dataclasses
from typing import Literal

Kind = Literal["F", "B", "SEND_ACT", "RECV_ACT", "SEND_GRAD", "RECV_GRAD"]
COMPUTE = ("F", "B")


@dataclasses.dataclass(frozen=True)
class Action:
    kind: Kind
    micro: int

    def __str__(self) -> str:
        return f"{self.kind}{self.micro}" if self.kind in COMPUTE else f"{self.kind}({self.micro})"


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Per-stage action lists of one training step."""

    name: str
    stages: int
    micro_batches: int
    actions: tuple[tuple[Action, ...], ...]  # actions[stage]

    def __str__(self) -> str:
        lines = [f"{self.name}: {self.stages} stages, {self.micro_batches} micro-batches"]
        for s, acts in enumerate(self.actions):
            lines.append(f"  stage {s}: " + " ".join(map(str, acts)))
        return "\n".join(lines)


def _with_transfers(stage: int, stages: int, compute: list[Action]) -> tuple[Action, ...]:
    """Wrap each compute action in the receives it needs and the sends it feeds."""
    out: list[Action] = []
    for a in compute:
        if a.kind == "F":
            if stage > 0:
                out.append(Action("RECV_ACT", a.micro))
            out.append(a)
            if stage < stages - 1:
                out.append(Action("SEND_ACT", a.micro))
        else:
            if stage < stages - 1:
                out.append(Action("RECV_GRAD", a.micro))
            out.append(a)
            if stage > 0:
                out.append(Action("SEND_GRAD", a.micro))
    return tuple(out)


def _check(stages: int, micro_batches: int) -> None:
    if stages < 1 or micro_batches < 1:
        raise ValueError(f"a schedule needs stages >= 1 and micro_batches >= 1; got {stages} and {micro_batches}")


def gpipe(stages: int, micro_batches: int) -> Schedule:
    """All forwards, then all backwards (every micro-batch's activations live at once)."""
    _check(stages, micro_batches)
    acts = []
    for s in range(stages):
        compute = [Action("F", i) for i in range(micro_batches)] + [Action("B", i) for i in range(micro_batches)]
        acts.append(_with_transfers(s, stages, compute))
    return Schedule("gpipe", stages, micro_batches, tuple(acts))


def one_f_one_b(stages: int, micro_batches: int) -> Schedule:
    """1F1B (PipeDream-flush): stage ``s`` runs ``min(p - s - 1, m)`` warm-up
    forwards, then alternates one forward and one backward, then drains the
    remaining backwards. At most ``p - s`` micro-batches are in flight on stage ``s``."""
    _check(stages, micro_batches)
    acts = []
    for s in range(stages):
        warmup = min(stages - s - 1, micro_batches)
        compute = [Action("F", i) for i in range(warmup)]
        for i in range(micro_batches - warmup):
            compute += [Action("F", warmup + i), Action("B", i)]
        compute += [Action("B", i) for i in range(micro_batches - warmup, micro_batches)]
        acts.append(_with_transfers(s, stages, compute))
    return Schedule("1f1b", stages, micro_batches, tuple(acts))


SCHEDULES = {"1f1b": one_f_one_b, "gpipe": gpipe}


def build(name: str, stages: int, micro_batches: int) -> Schedule:
    if name not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {name!r}; available: {', '.join(SCHEDULES)}")
    return SCHEDULES[name](stages, micro_batches)
