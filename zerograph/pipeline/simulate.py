"""Dry-run a :class:`~zerograph.pipeline.schedule.Schedule` before running it.

The simulation follows the runtime's rules: a rank executes its actions in
order; a send never blocks (the message is available to the receiver from
the next time step); a receive waits until the matching message is there;
each compute action (``F`` or ``B``) takes one time step, and a rank runs at
most one per step. Messages between a pair of ranks arrive in send order,
whatever stage sent them (with interleaved 1F1B one channel carries several
stages' activations and gradients). It rejects, with a
:class:`ScheduleError` that names the ranks and actions involved:

* deadlocks (no rank can make progress while some still have actions),
* a receive that would get another stage's or micro-batch's message (FIFO
  order per pair of ranks differs between sender and receiver),
* an action on a stage its rank does not hold,
* a forward whose activations were not received, a backward before its
  forward or without its incoming gradient, missing or repeated micro-batches
  (a ``forward_only`` schedule has forwards only),
* messages sent but never received.

The result is the step x rank timeline (printable with :func:`format_grid`)
and the peak number of (stage, micro-batch) forwards in flight per rank
(0 for a forward-only evaluation schedule, which runs no backward).
Without interleaving, rank ``s`` is stage ``s`` and messages say "stage".
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
    grid: tuple[tuple[Action | None, ...], ...]  # grid[step][rank]
    peak_in_flight: tuple[int, ...]  # per rank: (stage, micro) forwards done whose backward is not

    @property
    def bubble_fraction(self) -> float:
        """Idle share of the step x rank cells (unit-time forward and backward of one stage)."""
        cells = len(self.grid) * self.schedule.stages
        idle = sum(a is None for row in self.grid for a in row)
        return idle / cells if cells else 0.0


_SENT_BY = {"RECV_ACT": "SEND_ACT", "RECV_GRAD": "SEND_GRAD"}


def _peer_stage(kind: str, stage: int) -> int:
    """The stage at the other end of a transfer: activations go to the next
    stage and come from the previous one; gradients the other way."""
    return stage + (1 if kind in ("SEND_ACT", "RECV_GRAD") else -1)


def simulate(schedule: Schedule) -> Timeline:
    p, n = schedule.stages, schedule.model_stages
    where = (lambda r: f"stage {r}") if schedule.virtual_stages == 1 else (lambda r: f"rank {r}")
    _check_coverage(schedule, where)
    pcs = [0] * p
    channels: dict[tuple[int, int], collections.deque] = collections.defaultdict(collections.deque)
    received: list[set[tuple[str, int, int]]] = [set() for _ in range(p)]
    forwarded: list[set[tuple[int, int]]] = [set() for _ in range(p)]
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
                k = schedule.stage_of(s, a)
                if a.kind in ("F", "B"):
                    if row[s] is not None:
                        break
                    _check_compute(where(s), k, a, n, received[s], forwarded[s])
                    if a.kind == "F":
                        forwarded[s].add((k, a.micro))
                        in_flight[s] += not schedule.forward_only  # evaluation keeps nothing for a backward
                        peak[s] = max(peak[s], in_flight[s])
                    else:
                        in_flight[s] -= 1
                    row[s] = a
                elif a.kind.startswith("SEND"):
                    peer = _peer_stage(a.kind, k)
                    if not 0 <= peer < n:
                        raise ScheduleError(f"{where(s)}: {a} has no peer stage {peer}")
                    channels[(s, peer % p)].append(((a.kind, k, a.micro), a, step + 1))
                else:
                    src = _peer_stage(a.kind, k)
                    if not 0 <= src < n:
                        raise ScheduleError(f"{where(s)}: {a} has no peer stage {src}")
                    queue = channels[(src % p, s)]
                    if not queue or queue[0][2] > step:
                        break
                    msg, sent, _ = queue[0]
                    if msg != (_SENT_BY[a.kind], src, a.micro):
                        raise ScheduleError(
                            f"{where(s)}: {a} would receive {where(src % p)}'s {sent} (messages between a pair "
                            "of ranks arrive in send order); reorder the sends or the receives"
                        )
                    queue.popleft()
                    received[s].add((a.kind, k, a.micro))
                pcs[s] += 1
                progressed = True
        if not progressed:
            waiting = [
                f"{where(s)} waits at {schedule.actions[s][pcs[s]]} (action {pcs[s]})"
                for s in range(p) if pcs[s] < len(schedule.actions[s])
            ]
            raise ScheduleError(f"{schedule.name} deadlocks at step {step}: " + "; ".join(waiting))
        if any(a is not None for a in row):
            grid.append(tuple(row))
        step += 1
    left = [f"{where(src)}->{where(dst)}: {', '.join(str(a) for _, a, _ in q)}"
            for (src, dst), q in channels.items() if q]
    if left:
        raise ScheduleError(f"{schedule.name}: messages sent but never received: " + "; ".join(left))
    return Timeline(schedule, tuple(grid), tuple(peak))


def _check_coverage(schedule: Schedule, where) -> None:
    m = schedule.micro_batches
    for s, acts in enumerate(schedule.actions):
        for a in acts:
            k = schedule.stage_of(s, a)
            if k not in schedule.stages_of(s):
                raise ScheduleError(
                    f"{where(s)}: {a} runs on stage {k}, which rank {s} does not hold "
                    f"(it holds {', '.join(map(str, schedule.stages_of(s)))})"
                )
        for k in schedule.stages_of(s):
            for kind in ("F",) if schedule.forward_only else ("F", "B"):
                got = sorted(a.micro for a in acts if a.kind == kind and schedule.stage_of(s, a) == k)
                if got != list(range(m)):
                    on = "" if schedule.virtual_stages == 1 else f" on stage {k}"
                    raise ScheduleError(
                        f"{where(s)}: {kind}{on} must run each micro-batch 0..{m - 1} exactly once; got {got}"
                    )


def _check_compute(where: str, k: int, a: Action, n: int, received: set, forwarded: set) -> None:
    if a.kind == "F":
        if k > 0 and ("RECV_ACT", k, a.micro) not in received:
            raise ScheduleError(f"{where}: {a} runs before {Action('RECV_ACT', a.micro, a.stage)} received its input")
        return
    if (k, a.micro) not in forwarded:
        raise ScheduleError(f"{where}: {a} runs before {Action('F', a.micro, a.stage)}")
    if k < n - 1 and ("RECV_GRAD", k, a.micro) not in received:
        raise ScheduleError(
            f"{where}: {a} runs before {Action('RECV_GRAD', a.micro, a.stage)} received its gradient"
        )


def format_grid(timeline: Timeline) -> str:
    """The timeline as text: one row per time step, one column per rank, ``.`` idle."""
    p = timeline.schedule.stages
    unit = "stage" if timeline.schedule.virtual_stages == 1 else "rank"
    header = "step " + " ".join(f"{unit + str(s):>7}" for s in range(p))
    rows = [header]
    for t, row in enumerate(timeline.grid):
        rows.append(f"{t:>4} " + " ".join(f"{(str(a) if a else '.'):>7}" for a in row))
    return "\n".join(rows)
