"""Pipeline schedules as data: one list of actions per pipeline rank.

An :class:`Action` is a forward (``F``) or backward (``B``) of one
micro-batch, or a point-to-point transfer next to it: ``RECV_ACT`` /
``SEND_ACT`` move a micro-batch's boundary activations to the next stage,
``RECV_GRAD`` / ``SEND_GRAD`` move their gradients back. A rank's list is
executed in order; sends never block, receives wait for their data.

With ``1f1b`` and ``gpipe`` rank ``r`` holds model stage ``r`` and actions
print as ``F0``, ``SEND_ACT(0)``. With ``interleaved_1f1b`` the model is cut
into ``p·v`` stages (*model chunks*) and rank ``r`` holds stages ``r, r+p,
…, r+(v-1)p``; every action names its stage, printed in front: ``2F0`` is
the forward of micro-batch 0 on stage 2, ``3RECV_ACT(0)`` its activations
arriving at stage 3.

For ``p=2, m=4``, :func:`one_f_one_b` gives (``format_grid`` of the
simulated timeline, one column per rank)::

    step  stage0  stage1
       0      F0       .
       1      F1      F0
       2       .      B0
       3      B0      F1
       ...

Receives are placed by :func:`_place_receives`: each message is received in
the order its sender sent it (messages between two ranks arrive in send
order, NCCL matches them that way), and no later than right before the
compute action that needs it.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

Kind = Literal["F", "B", "SEND_ACT", "RECV_ACT", "SEND_GRAD", "RECV_GRAD"]
COMPUTE = ("F", "B")


@dataclasses.dataclass(frozen=True)
class Action:
    kind: Kind
    micro: int
    stage: Optional[int] = None  # the model stage it runs on; None: the rank's only stage

    def __str__(self) -> str:
        prefix = "" if self.stage is None else str(self.stage)
        return f"{prefix}{self.kind}{self.micro}" if self.kind in COMPUTE else f"{prefix}{self.kind}({self.micro})"


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Per-rank action lists of one training step.

    ``stages`` is the number of pipeline ranks p; the model has
    ``p · virtual_stages`` stages, stage ``k`` on rank ``k % p``."""

    name: str
    stages: int
    micro_batches: int
    actions: tuple[tuple[Action, ...], ...]  # actions[rank]
    virtual_stages: int = 1
    forward_only: bool = False  # evaluation: forwards and their activations, no backward

    @property
    def model_stages(self) -> int:
        return self.stages * self.virtual_stages

    def stages_of(self, rank: int) -> tuple[int, ...]:
        """The model stages rank ``rank`` holds: ``rank, rank + p, …``."""
        return tuple(rank + c * self.stages for c in range(self.virtual_stages))

    def stage_of(self, rank: int, action: Action) -> int:
        return rank if action.stage is None else action.stage

    def __str__(self) -> str:
        if self.virtual_stages == 1:
            head, unit = f"{self.name}: {self.stages} stages, {self.micro_batches} micro-batches", "stage"
        else:
            head = (f"{self.name}: {self.stages} ranks x {self.virtual_stages} virtual stages = "
                    f"{self.model_stages} stages, {self.micro_batches} micro-batches")
            unit = "rank"
        lines = [head]
        for s, acts in enumerate(self.actions):
            lines.append(f"  {unit} {s}: " + " ".join(map(str, acts)))
        return "\n".join(lines)


def _message_needed(action: Action, stage: int, model_stages: int) -> Optional[tuple[str, int, int]]:
    """The message (sending kind, sending stage, micro) a compute action waits for."""
    if action.kind == "F" and stage > 0:
        return ("SEND_ACT", stage - 1, action.micro)
    if action.kind == "B" and stage < model_stages - 1:
        return ("SEND_GRAD", stage + 1, action.micro)
    return None


def _place_receives(compute: list[list[Action]], p: int, v: int) -> tuple[tuple[Action, ...], ...]:
    """Compute lists -> full action lists: each compute action is followed by
    the send it feeds, and preceded by the receives it needs. A receive from
    rank ``a`` is placed so that rank ``a``'s messages are received in the
    order ``a`` sent them: before the message a compute action needs, every
    earlier message from the same sender is received too."""
    n = p * v

    def own(rank: int, a: Action) -> int:
        return rank if a.stage is None else a.stage

    def tagged(stage: int, a: Action, kind: str) -> Action:
        return Action(kind, a.micro, None if v == 1 else stage)

    with_sends: list[list[Action]] = []
    sent: list[list[tuple[str, int, int]]] = [[] for _ in range(p)]  # per sender: messages in send order
    for r, acts in enumerate(compute):
        out = []
        for a in acts:
            k = own(r, a)
            out.append(a)
            if a.kind == "F" and k < n - 1:
                out.append(tagged(k, a, "SEND_ACT"))
                sent[r].append(("SEND_ACT", k, a.micro))
            elif a.kind == "B" and k > 0:
                out.append(tagged(k, a, "SEND_GRAD"))
                sent[r].append(("SEND_GRAD", k, a.micro))
        with_sends.append(out)
    # per (sender, receiver): the messages in send order
    queues: dict[tuple[int, int], list[tuple[str, int, int]]] = {}
    for r in range(p):
        for msg in sent[r]:
            dst = (msg[1] + (1 if msg[0] == "SEND_ACT" else -1)) % p
            queues.setdefault((r, dst), []).append(msg)
    result = []
    for r, acts in enumerate(with_sends):
        taken: dict[int, int] = {}  # sender -> messages received so far
        out = []
        for a in acts:
            if a.kind in COMPUTE:
                need = _message_needed(a, own(r, a), n)
                if need is not None:
                    src = need[1] % p
                    queue = queues.get((src, r), [])
                    if need not in queue:
                        raise ValueError(f"rank {r}: {a} needs {need}, which rank {src} never sends")
                    upto = queue.index(need) + 1
                    for kind, k, i in queue[taken.get(src, 0):upto]:
                        to = k + 1 if kind == "SEND_ACT" else k - 1
                        out.append(Action("RECV_ACT" if kind == "SEND_ACT" else "RECV_GRAD", i, None if v == 1 else to))
                    taken[src] = max(taken.get(src, 0), upto)
            out.append(a)
        result.append(tuple(out))
    return tuple(result)


def _check(stages: int, micro_batches: int) -> None:
    if stages < 1 or micro_batches < 1:
        raise ValueError(f"a schedule needs stages >= 1 and micro_batches >= 1; got {stages} and {micro_batches}")


def gpipe(stages: int, micro_batches: int) -> Schedule:
    """All forwards, then all backwards (every micro-batch's activations live at once)."""
    _check(stages, micro_batches)
    compute = [[Action("F", i) for i in range(micro_batches)] + [Action("B", i) for i in range(micro_batches)]
               for _ in range(stages)]
    return Schedule("gpipe", stages, micro_batches, _place_receives(compute, stages, 1))


def one_f_one_b(stages: int, micro_batches: int) -> Schedule:
    """1F1B (PipeDream-flush): stage ``s`` runs ``min(p - s - 1, m)`` warm-up
    forwards, then alternates one forward and one backward, then drains the
    remaining backwards. At most ``p - s`` micro-batches are in flight on stage ``s``."""
    _check(stages, micro_batches)
    compute = []
    for s in range(stages):
        warmup = min(stages - s - 1, micro_batches)
        acts = [Action("F", i) for i in range(warmup)]
        for i in range(micro_batches - warmup):
            acts += [Action("F", warmup + i), Action("B", i)]
        acts += [Action("B", i) for i in range(micro_batches - warmup, micro_batches)]
        compute.append(acts)
    return Schedule("1f1b", stages, micro_batches, _place_receives(compute, stages, 1))


def interleaved_one_f_one_b(stages: int, micro_batches: int, virtual_stages: int = 2) -> Schedule:
    """Interleaved 1F1B (Megatron-LM's virtual pipeline stages).

    The model is cut into ``p·v`` stages; rank ``r`` holds stages ``r, r+p,
    …, r+(v-1)p``. Each rank walks ``m·v`` *virtual micro-batches*: the
    ``j``-th forward runs micro-batch ``(j // (p·v))·p + j % p`` on its local
    chunk ``(j % (p·v)) // p``, so micro-batches go through the chunks in
    groups of ``p``; backwards visit the chunks in reverse. Rank ``r`` runs
    ``(p - r - 1)·2 + (v - 1)·p`` warm-up forwards, then alternates one
    forward and one backward, then drains. Needs ``m`` to be a multiple of
    ``p`` (as Megatron-LM does). The bubble shrinks from (p−1)/(m+p−1) to
    (p−1)/(v·m+p−1) of the step, for ``v`` times as many point-to-point messages.

    For ``p=2, v=2, m=4`` the compute order is (rank 0 holds stages 0 and 2,
    rank 1 stages 1 and 3)::

        rank 0: 0F0 0F1 2F0 2F1 0F2 2B0 0F3 2B1 2F2 0B0 2F3 0B1 2B2 2B3 0B2 0B3
        rank 1: 1F0 1F1 3F0 3B0 3F1 3B1 1F2 1B0 1F3 1B1 3F2 3B2 3F3 3B3 1B2 1B3
    """
    _check(stages, micro_batches)
    p, m, v = stages, micro_batches, virtual_stages
    if p < 2:
        raise ValueError(f"interleaved_1f1b needs at least 2 pipeline stages (ranks); got {p}")
    if v < 2:
        raise ValueError(f"interleaved_1f1b needs virtual_stages >= 2; got {v} (virtual_stages=1 is plain 1f1b)")
    if m % p:
        raise ValueError(
            f"interleaved_1f1b needs micro_batches to be a multiple of the pipeline stages: {m} micro-batches, "
            f"{p} stages; set pipeline.micro_batches to {(m // p + 1) * p} (or another multiple of {p})"
        )
    total = m * v

    def chunk(j: int, forward: bool) -> int:
        c = (j % (p * v)) // p
        return c if forward else v - 1 - c

    def micro(j: int) -> int:
        return (j // (p * v)) * p + j % p

    compute = []
    for r in range(p):
        warmup = min((p - r - 1) * 2 + (v - 1) * p, total)
        order = [("F", j) for j in range(warmup)]
        for i in range(total - warmup):
            order += [("F", warmup + i), ("B", i)]
        order += [("B", j) for j in range(total - warmup, total)]
        compute.append([Action(kind, micro(j), chunk(j, kind == "F") * p + r) for kind, j in order])
    return Schedule("interleaved_1f1b", p, m, _place_receives(compute, p, v), virtual_stages=v)


def forward_only(schedule: Schedule) -> Schedule:
    """The evaluation schedule of ``schedule``: each rank runs its forwards
    in the training order, with the activation transfers placed as for
    training (in send order per pair of ranks), and no backward. Nothing is
    kept for a backward. :func:`~zerograph.pipeline.simulate.simulate` checks it
    like a training schedule (``PipelineModel`` does before using it)::

        rank 0: 0F0 0F1 2F0 2F1 0F2 0F3 2F2 2F3     (interleaved, p=2, v=2, m=4)
    """
    compute = [[a for a in acts if a.kind == "F"] for acts in schedule.actions]
    p, v = schedule.stages, schedule.virtual_stages
    return dataclasses.replace(schedule, name=f"{schedule.name} forward", forward_only=True,
                               actions=_place_receives(compute, p, v))


SCHEDULES = {"1f1b": one_f_one_b, "gpipe": gpipe, "interleaved_1f1b": interleaved_one_f_one_b}


def build(name: str, stages: int, micro_batches: int, virtual_stages: int = 1) -> Schedule:
    if name not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {name!r}; available: {', '.join(SCHEDULES)}")
    if name == "interleaved_1f1b":
        return interleaved_one_f_one_b(stages, micro_batches, virtual_stages)
    if virtual_stages != 1:
        raise ValueError(f"pipeline schedule {name!r} has one stage per rank; virtual_stages must be 1, got "
                         f"{virtual_stages} (use interleaved_1f1b for virtual stages)")
    return SCHEDULES[name](stages, micro_batches)
