"""Dry-run a :class:`~zerograph.pipeline.schedule.Schedule` before running it.

The simulation follows the runtime's rules: a stage executes its actions in
order; a send never blocks (the message is available to the receiver from
the next time step); a receive waits until the matching message is there;
each compute action (``F`` or ``B``) takes one time step, and a stage runs at
most one per step. It rejects, with a :class:`ScheduleError` that names the
stages and actions involved:

* deadlocks (no stage can make progress while some still have actions),
* a receive that would get another micro-batch's message (FIFO order per
  pair of stages differs between sender and receiver),
* a forward whose activations were not received, a backward before its
  forward or without its incoming gradient, missing or repeated micro-batches,
* messages sent but never received.

The result is the step x stage timeline (printable with :func:`format_grid`)
and the peak number of micro-batches in flight per stage.
"""

from __future__ import annotations

import collections
import dataclasses

from zerograph.pipeline.schedule import Action, Schedule


class ScheduleError(RuntimeError):
    """A schedule that would deadlock or compute the wrong thing."""


@dataclasses.dataclass(frozen=True)
class Timeline:
    schedule: Schedule
    grid: tuple[tuple[Action | None, ...], ...]  # grid[step][stage]
    peak_in_flight: tuple[int, ...]  # per stage: forwards done whose backward is not

    @property
    def bubble_fraction(self) -> float:
        """Idle share of the step x stage cells (unit-time forward and backward)."""
        cells = len(self.grid) * self.schedule.stages
        idle = sum(a is None for row in self.grid for a in row)
        return idle / cells if cells else 0.0


_PEER = {"SEND_ACT": 1, "SEND_GRAD": -1, "RECV_ACT": -1, "RECV_GRAD": 1}
_SENT_BY = {"RECV_ACT": "SEND_ACT", "RECV_GRAD": "SEND_GRAD"}


def simulate(schedule: Schedule) -> Timeline:
    p = schedule.stages
    _check_coverage(schedule)
    pcs = [0] * p
    channels: dict[tuple[int, int], collections.deque] = collections.defaultdict(collections.deque)
    received: list[set[tuple[str, int]]] = [set() for _ in range(p)]
    forwarded: list[set[int]] = [set() for _ in range(p)]
    in_flight, peak = [0] * p, [0] * p
    grid: list[tuple[Action | None, ...]] = []
    step = 0
    while any(pcs[s] < len(schedule.actions[s]) for s in range(p)):
        row: list[Action | None] = [None] * p
        progressed = False
        for s in range(p):
            acts = schedule.actions[s]
            while pcs[s] < len(acts):
                a = acts[pcs[s]]
                if a.kind in ("F", "B"):
                    if row[s] is not None:
                        break
                    _check_compute(s, a, p, received[s], forwarded[s])
                    if a.kind == "F":
                        forwarded[s].add(a.micro)
                        in_flight[s] += 1
                        peak[s] = max(peak[s], in_flight[s])
                    else:
                        in_flight[s] -= 1
                    row[s] = a
                elif a.kind.startswith("SEND"):
                    peer = s + _PEER[a.kind]
                    if not 0 <= peer < p:
                        raise ScheduleError(f"stage {s}: {a} has no peer stage {peer}")
                    channels[(s, peer)].append((a, step + 1))
                else:
                    peer = s + _PEER[a.kind]
                    queue = channels[(peer, s)]
                    if not queue or queue[0][1] > step:
                        break
                    sent, _ = queue[0]
                    if sent.kind != _SENT_BY[a.kind] or sent.micro != a.micro:
                        raise ScheduleError(
                            f"stage {s}: {a} would receive stage {peer}'s {sent} (messages between a pair "
                            "of stages arrive in send order); reorder the sends or the receives"
                        )
                    queue.popleft()
                    received[s].add((a.kind, a.micro))
                pcs[s] += 1
                progressed = True
        if not progressed:
            waiting = [
                f"stage {s} waits at {schedule.actions[s][pcs[s]]} (action {pcs[s]})"
                for s in range(p) if pcs[s] < len(schedule.actions[s])
            ]
            raise ScheduleError(f"{schedule.name} deadlocks at step {step}: " + "; ".join(waiting))
        if any(a is not None for a in row):
            grid.append(tuple(row))
        step += 1
    left = [f"stage {src}->{dst}: {', '.join(str(a) for a, _ in q)}" for (src, dst), q in channels.items() if q]
    if left:
        raise ScheduleError(f"{schedule.name}: messages sent but never received: " + "; ".join(left))
    return Timeline(schedule, tuple(grid), tuple(peak))


def _check_coverage(schedule: Schedule) -> None:
    m = schedule.micro_batches
    for s, acts in enumerate(schedule.actions):
        for kind in ("F", "B"):
            got = sorted(a.micro for a in acts if a.kind == kind)
            if got != list(range(m)):
                raise ScheduleError(
                    f"stage {s}: {kind} must run each micro-batch 0..{m - 1} exactly once; got {got}"
                )


def _check_compute(s: int, a: Action, p: int, received: set, forwarded: set) -> None:
    if a.kind == "F":
        if s > 0 and ("RECV_ACT", a.micro) not in received:
            raise ScheduleError(f"stage {s}: {a} runs before RECV_ACT({a.micro}) received its input")
        return
    if a.micro not in forwarded:
        raise ScheduleError(f"stage {s}: {a} runs before F{a.micro}")
    if s < p - 1 and ("RECV_GRAD", a.micro) not in received:
        raise ScheduleError(f"stage {s}: {a} runs before RECV_GRAD({a.micro}) received its gradient")


def format_grid(timeline: Timeline) -> str:
    """The timeline as text: one row per time step, one column per stage, ``.`` idle."""
    p = timeline.schedule.stages
    header = "step " + " ".join(f"{'stage' + str(s):>7}" for s in range(p))
    rows = [header]
    for t, row in enumerate(timeline.grid):
        rows.append(f"{t:>4} " + " ".join(f"{(str(a) if a else '.'):>7}" for a in row))
    return "\n".join(rows)
