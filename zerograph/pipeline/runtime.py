"""Run a pipeline stage: execute this rank's schedule with point-to-point ops.

:class:`PipelineModel` holds this rank's stage, or with interleaved 1F1B its
``v`` stages ``r, r + p, …`` (each a zerograph-compiled ``GraphModule``,
ZeRO-sharded over the rank's data-parallel group), and runs its action list
of the :class:`~zerograph.pipeline.schedule.Schedule`. Stage ``k`` receives
from stage ``k - 1`` on rank ``(k - 1) % p`` and sends to stage ``k + 1`` on
rank ``(k + 1) % p`` of its pipeline (the ranks with this rank's dp and tp
indices, :meth:`PipelineGroups.rank_of`); buffers and saved activations are
keyed by (stage, micro-batch):

* ``RECV_*`` posts ``irecv`` into buffers of the traced shape and dtype one
  compute action ahead, so receiving the next input overlaps the current
  forward or backward; the compute action waits for it.
* ``SEND_*`` is an ``isend``; sends are waited for at the end of the step.
* ``F``: stage forward on micro-batch ``i``; received floating values become
  leaves that require grad. ``B``: ``autograd.backward`` from the received
  output gradients (the loss on the last stage), then the inputs' gradients
  go back.

:meth:`PipelineModel.eval_step` runs the :func:`~zerograph.pipeline.schedule.forward_only`
list of the schedule under ``torch.no_grad()``: the same receives and sends
of activations, no backward, nothing saved.

After the last backward: gradients of tied parameters are summed over the
stages that read them, then clipped by the global norm over every stage.
Micro-batch gradients are averaged by zerograph's gradient scale
(``gradient_accumulation_steps`` of the stage's config is the number of
micro-batches).
"""

from __future__ import annotations

import datetime
import logging
import math
import time
import weakref

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from zerograph.pipeline import step as step_mod
from zerograph.pipeline.schedule import Schedule, forward_only
from zerograph.pipeline.simulate import simulate
from zerograph.pipeline.split import PipelineSplit, StagePlan
from zerograph.runtime.dist import PipelineGroups, RankMonitor
from zerograph.runtime.errors import explain_collective_failure, is_collective_failure
from zerograph.runtime.tp_params import dp_sharded
from zerograph.runtime.offload import _local

log = logging.getLogger(__name__)


class PipelineModeError(RuntimeError):
    """A pipeline-parallel model was used like a plain one."""


def _receive_window(compute_at: list[int], n: int, end: int) -> range:
    """Action indices whose receives are posted before the ``n``-th compute
    action (at ``compute_at[n]``) runs: those after the previous compute up
    to the one after next, so receiving the next input overlaps this compute."""
    start = compute_at[n - 1] + 1 if n > 0 else 0
    stop = compute_at[n + 2] if n + 2 < len(compute_at) else end
    return range(start, stop)


def _parameter(module: nn.Module, target: str) -> nn.Parameter:
    *path, name = target.split(".")
    for part in path:
        module = module._modules[part]
    return module._parameters[name]


class PipelineModel(nn.Module):
    """This rank's pipeline stage(s); train it with :meth:`train_step`,
    evaluate it with :meth:`eval_step`.

    ``chunks[c]`` is the compiled module of model stage ``stage_ids[c]``
    (one stage per rank, or ``v`` with interleaved 1F1B: ``r, r + p, …``)."""

    def __init__(self, chunks: dict[int, nn.Module], split: PipelineSplit, schedule: Schedule,
                 groups: PipelineGroups, clip: float, example_shapes: list[tuple[int, ...]],
                 fallback_state: dict[str, torch.Tensor], original_keys: dict[int, dict[str, list[str]]]):
        super().__init__()
        self.stage_ids: tuple[int, ...] = tuple(sorted(chunks))
        self.chunks = nn.ModuleList([chunks[k] for k in self.stage_ids])
        self._modules_by_stage = dict(chunks)
        self._zg_runtime = self.chunks[0]._zg_runtime  # this rank's first stage (config, stats)
        self._split = split
        self._plans: dict[int, StagePlan] = {k: split.stages[k] for k in self.stage_ids}
        self.schedule = schedule
        self.groups = groups
        self._clip = clip
        self._example_shapes = example_shapes
        self._fallback_state = fallback_state  # the user's state dict, for keys no stage reads
        self._original_keys = original_keys  # per stage: stage state-dict key -> the user's keys
        self._actions = schedule.actions[groups.stage]
        self.eval_schedule = forward_only(schedule)
        simulate(self.eval_schedule)  # raises ScheduleError on a deadlock, as for the training schedule
        self._eval_actions = self.eval_schedule.actions[groups.stage]
        self.last_stats: dict[str, float] = {}
        # Sends and receives between stages wait at most zerograph.collective_timeout_s (gloo's
        # point-to-point waits ignore the group's timeout), and a failure names the dead rank from
        # the heartbeats of every rank (docs/troubleshooting.md#a-rank-died).
        self._timeout_s = float(self._zg_runtime.ctx.config.zerograph.collective_timeout_s)
        self._monitor = None
        if dist.is_initialized() and dist.get_world_size() > 1 and str(dist.get_backend()) in ("gloo", "nccl"):
            self._monitor = RankMonitor.for_group(dist.group.WORLD, self._timeout_s)
            weakref.finalize(self, self._monitor.stop)
        self._phase = "forward"
        self._tie_groups = self._make_tie_groups()
        self._sync_tied()

    @property
    def stage(self) -> nn.Module:
        """This rank's (first) stage module."""
        return self.chunks[0]

    def stage_runtimes(self) -> list[tuple[int, object]]:
        """``(model stage, runtime)`` of each stage this rank runs (``zerograph.inspect``)."""
        return [(k, chunk._zg_runtime) for k, chunk in zip(self.stage_ids, self.chunks)]

    cut_sequences = None  # with sequence_parallel_size > 1: batch -> this rank's slice of every sequence

    @property
    def _tp_size(self) -> int:
        return self.groups.tp.world_size if self.groups.tp is not None else 1

    @property
    def _sp_size(self) -> int:
        return self.groups.sp.world_size if self.groups.sp is not None else 1

    def _rank_of_stage(self, k: int) -> int:
        return self.groups.rank_of(k % self.groups.stages)

    # -- misuse ---------------------------------------------------------------
    def forward(self, *args, **kwargs):
        raise PipelineModeError(
            "this model is split into pipeline stages (pipeline.stages > 1): a forward call cannot return "
            "a loss for loss.backward(); call loss = model.train_step(batch) instead, which runs the "
            "forward and backward of every micro-batch through the schedule. For evaluation (validation "
            "loss) call loss = model.eval_step(batch): the forwards only, under torch.no_grad()"
        )

    # -- tied parameters --------------------------------------------------------
    def _make_tie_groups(self):
        """(name, model stage, parameter, group, global ranks) for each copy of
        a tied parameter on this rank's stages. ``group`` spans the distinct
        ranks holding a copy (``None`` when all copies are on this rank); the
        first entry of ``ranks`` holds the copy of the first stage reading it.
        ``new_group`` is collective: every rank creates every group, in the
        same order."""
        out = []
        mesh = self.groups.mesh
        if not dist.is_initialized():
            return out
        mine = (mesh.index("dp"), mesh.index("sp"), mesh.index("tp"))
        inner = [(d, s, t) for d in range(mesh.size("dp")) for s in range(mesh.size("sp"))
                 for t in range(mesh.size("tp"))]
        for name in sorted(self._split.tied):
            stages = self._split.tied[name]
            for d, s, t in inner:  # copies pair up by (dp, sp, tp) index, as activations do
                ranks = list(dict.fromkeys(self.groups.rank_of(k % self.groups.stages, dp=d, sp=s, tp=t)
                                           for k in stages))
                timeout = datetime.timedelta(seconds=self._timeout_s)
                group = dist.new_group(ranks, timeout=timeout) if len(ranks) > 1 else None
                if (d, s, t) != mine:
                    continue
                for k in stages:
                    if k in self._modules_by_stage:
                        target = self._split.tied_names[name][k]
                        out.append((name, k, _parameter(self._modules_by_stage[k], target), group, ranks))
        return out

    def _copies_by_name(self):
        """name -> (this rank's copies in stage order, group, ranks)."""
        out = {}
        for name, _, param, group, ranks in self._tie_groups:
            out.setdefault(name, ([], group, ranks))[0].append(param)
        return out

    @torch.no_grad()
    def _sync_tied(self) -> None:
        """Tied copies start equal: the first stage's value wins."""
        for copies, group, ranks in self._copies_by_name().values():
            first = _local(copies[0])
            if group is not None:
                dist.broadcast(first, src=ranks[0], group=group)
            for other in copies[1:]:
                _local(other).copy_(first)

    @torch.no_grad()
    def _sum_tied_grads(self) -> None:
        for name, (copies, group, _) in self._copies_by_name().items():
            if any(c.grad is None for c in copies):
                k = next(k for n, k, c, _, _ in self._tie_groups if n == name and c.grad is None)
                raise RuntimeError(f"tied parameter {name} has no gradient on stage {k}")
            total = _local(copies[0].grad)
            for other in copies[1:]:
                total.add_(_local(other.grad))
            if group is not None:
                dist.all_reduce(total, group=group)
            for other in copies[1:]:
                _local(other.grad).copy_(total)

    # -- the step ---------------------------------------------------------------
    def train_step(self, batch) -> float:
        """Forward and backward of one batch (this data-parallel rank's rows)
        through the schedule; returns the mean loss over the micro-batches and
        data-parallel ranks. Then call ``opt.step()`` and ``opt.zero_grad()``."""
        t0 = time.perf_counter()
        step = self._zg_runtime.ctx.step + 1  # the optimizer step in progress, for error messages
        device = self.groups.dp.device
        batch = self.cut_sequences(batch) if self.cut_sequences is not None else batch
        inputs = self._micro_inputs(batch, device, "train_step")
        try:
            compute_s, losses = self._run(inputs, device)
            self._phase = "optimizer step boundary"
            self._sum_tied_grads()
            if self._clip > 0:
                self._clip_grads(device)
            loss = self._mean_loss(losses, device)
        except RuntimeError as exc:
            self._raise_collective_failure(exc, step)
            raise
        wall = time.perf_counter() - t0
        self.last_stats = {"wall_s": wall, "compute_s": compute_s, "bubble": 1.0 - compute_s / wall if wall else 0.0,
                           "peak_in_flight": self._peak, "p2p_sent_bytes": self._p2p_sent}
        return loss

    def _micro_inputs(self, batch, device, caller: str) -> list[dict[int, torch.Tensor]]:
        """Per micro-batch: the batch tensors this rank's stages read, on ``device``."""
        micro = step_mod.split_batch(batch, self.schedule.micro_batches)
        needed = sorted({j for plan in self._plans.values() for j in plan.batch_inputs})
        inputs = []
        for i, mb in enumerate(micro):
            flat = step_mod.flat_tensors(mb)
            shapes = [tuple(t.shape) for t in flat]
            if shapes != self._example_shapes:
                raise ValueError(
                    f"micro-batch {i} has tensor shapes {shapes}, but the pipeline was traced with {self._example_shapes}; "
                    f"every {caller} batch must have the shape of compile's example_batch (drop a last, smaller batch)"
                )
            inputs.append({j: flat[j].to(device) for j in needed})
        return inputs

    def _raise_collective_failure(self, exc: RuntimeError, step: int) -> None:
        """A failed send, receive or collective as a RankFailureError naming the dead rank."""
        if dist.is_initialized() and dist.get_world_size() > 1 and is_collective_failure(exc):
            err = explain_collective_failure(exc, self._monitor, step=step, phase=self._phase,
                                             timeout_s=self._timeout_s, rank=dist.get_rank())
            log.error("%s", err)
            raise err from exc

    def eval_step(self, batch) -> float:
        """Forward of every micro-batch of ``batch`` (this data-parallel rank's
        rows, the shape of ``train_step``'s batches) through the stages,
        under ``torch.no_grad()``; returns the mean loss over the micro-batches
        and data-parallel ranks, on every rank, as :meth:`train_step` does.

        Training is not disturbed: no gradients, no backward, and the step
        and micro-step counters, ``last_stats``, the communication counts of
        the step in progress and the RNG state are as before the call (dropout
        in training mode draws its masks from a forked RNG). Stages run in
        their own mode: after ``model.eval()`` dropout is off; call
        ``model.train()`` before training again. Collective: call it on every rank."""
        device = self.groups.dp.device
        step = self._zg_runtime.ctx.step + 1
        batch = self.cut_sequences(batch) if self.cut_sequences is not None else batch
        inputs = self._micro_inputs(batch, device, "eval_step")
        phase = self._phase
        try:
            with step_mod.evaluating([rt.ctx for _, rt in self.stage_runtimes()], device):
                losses = self._run_forward(inputs, device)
                loss = self._mean_loss(losses, device)
        except RuntimeError as exc:
            self._raise_collective_failure(exc, step)
            raise
        finally:
            self._phase = phase
        return loss

    def _run_forward(self, inputs, device) -> list[torch.Tensor]:
        """Execute this rank's forward-only action list (:attr:`eval_schedule`):
        receive, forward, send; each output lives until it is sent."""
        schedule, me = self.eval_schedule, self.groups.stage
        last = schedule.model_stages - 1
        acts = self._eval_actions
        pending: dict[tuple[int, int], tuple[list, list[torch.Tensor]]] = {}
        outs: dict[tuple[int, int], tuple] = {}
        sends: list = []
        losses: list[torch.Tensor] = []
        timeout = datetime.timedelta(seconds=self._timeout_s)
        compute_at = [j for j, a in enumerate(acts) if a.kind == "F"]
        for n, j in enumerate(compute_at):
            for r in _receive_window(compute_at, n, len(acts)):  # this forward's receives and the next one's
                a = acts[r]
                k = schedule.stage_of(me, a)
                if a.kind == "RECV_ACT" and (k, a.micro) not in pending:
                    src = self._rank_of_stage(k - 1)
                    bufs = [torch.empty(v.shape, dtype=v.dtype, device=device) for v in self._plans[k].incoming]
                    pending[(k, a.micro)] = ([dist.irecv(b, src) for b in bufs], bufs)
            a = acts[j]
            k = schedule.stage_of(me, a)
            plan, module = self._plans[k], self._modules_by_stage[k]
            self._phase = "eval_step forward"
            received = []
            if plan.incoming:
                works, received = pending.pop((k, a.micro))
                for w in works:
                    w.wait(timeout)
            out = module(*[inputs[a.micro][b] for b in plan.batch_inputs], *received)
            if k == last:
                losses.append(out[0])
            else:
                outs[(k, a.micro)] = tuple(out)
            i = j + 1
            while i < len(acts) and acts[i].kind != "F":
                b = acts[i]
                if b.kind == "SEND_ACT":
                    kb = schedule.stage_of(me, b)
                    dst = self._rank_of_stage(kb + 1)
                    for t in outs.pop((kb, b.micro)):
                        sends.append(dist.isend(t.contiguous(), dst))
                i += 1
        for w in sends:
            w.wait(timeout)
        return losses

    def _run(self, inputs, device):
        """Execute this rank's action list. Keys are (model stage, micro-batch);
        stage ``k`` talks to stage ``k - 1`` on rank ``(k - 1) % p`` and stage
        ``k + 1`` on rank ``(k + 1) % p``."""
        schedule, me = self.schedule, self.groups.stage
        last = schedule.model_stages - 1
        pending: dict[tuple[str, int, int], tuple[list, list[torch.Tensor]]] = {}
        saved: dict[tuple[int, int], tuple[list[torch.Tensor], tuple]] = {}
        grads_out: dict[tuple[int, int], list[torch.Tensor]] = {}
        sends: list = []
        losses: list[torch.Tensor] = []
        compute_s, in_flight, self._peak = 0.0, 0, 0
        self._p2p_sent = 0  # bytes this rank sends to other stages (activations and their gradients)
        acts = self._actions
        compute_at = [j for j, a in enumerate(acts) if a.kind in ("F", "B")]

        def post(j: int) -> None:
            a = acts[j]
            k = schedule.stage_of(me, a)
            if (a.kind, k, a.micro) in pending:
                return
            plan = self._plans[k]
            if a.kind == "RECV_ACT":
                specs, src = plan.incoming, self._rank_of_stage(k - 1)
            else:
                specs, src = [v for v in plan.outgoing if v.has_grad], self._rank_of_stage(k + 1)
            bufs = [torch.empty(v.shape, dtype=v.dtype, device=device) for v in specs]
            pending[(a.kind, k, a.micro)] = ([dist.irecv(b, src) for b in bufs], bufs)

        timeout = datetime.timedelta(seconds=self._timeout_s)

        def take(kind: str, k: int, i: int) -> list[torch.Tensor]:
            works, bufs = pending.pop((kind, k, i))
            for w in works:
                w.wait(timeout)
            return bufs

        for n, j in enumerate(compute_at):
            # post this compute's receives and the next one's (overlap with this compute)
            for i in _receive_window(compute_at, n, len(acts)):
                if acts[i].kind.startswith("RECV"):
                    post(i)
            a = acts[j]
            k = schedule.stage_of(me, a)
            plan, module = self._plans[k], self._modules_by_stage[k]
            self._phase = "forward" if a.kind == "F" else "backward"
            if a.kind == "F":
                received = take("RECV_ACT", k, a.micro) if plan.incoming else []
                tc = time.perf_counter()  # compute time excludes waiting for the input
                for t, v in zip(received, plan.incoming):
                    if v.has_grad:
                        t.requires_grad_(True)
                out = module(*[inputs[a.micro][b] for b in plan.batch_inputs], *received)
                if k == last:
                    losses.append(out[0].detach())
                saved[(k, a.micro)] = (received, tuple(out))
                in_flight += 1
                self._peak = max(self._peak, in_flight)
            else:
                received, out = saved.pop((k, a.micro))
                grads = take("RECV_GRAD", k, a.micro) if k < last else []
                tc = time.perf_counter()
                if k == last:
                    torch.autograd.backward(out[0])
                else:
                    outs = [o for o, v in zip(out, plan.outgoing) if v.has_grad]
                    pairs = [(o, g) for o, g in zip(outs, grads) if o.requires_grad]
                    if pairs:
                        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
                grads_out[(k, a.micro)] = [
                    (t.grad if t.grad is not None else torch.zeros_like(t)) for t, v in zip(received, plan.incoming)
                    if v.has_grad
                ]
                in_flight -= 1
            compute_s += time.perf_counter() - tc
            # the sends that follow this compute action
            i = j + 1
            while i < len(acts) and acts[i].kind not in ("F", "B"):
                b = acts[i]
                kb = schedule.stage_of(me, b)
                if b.kind == "SEND_ACT":
                    _, out = saved[(kb, b.micro)]
                    dst = self._rank_of_stage(kb + 1)
                    for t in out:
                        sends.append(dist.isend(t.detach().contiguous(), dst))
                        self._p2p_sent += t.numel() * t.element_size()
                elif b.kind == "SEND_GRAD":
                    dst = self._rank_of_stage(kb - 1)
                    for t in grads_out.pop((kb, b.micro)):
                        sends.append(dist.isend(t.contiguous(), dst))
                        self._p2p_sent += t.numel() * t.element_size()
                i += 1
        for w in sends:
            w.wait(timeout)
        return compute_s, losses

    def _mean_loss(self, losses, device) -> float:
        total = torch.zeros((), dtype=torch.float32, device=device)
        if losses:
            # every rank of the last stage holds its dp index's loss (the sp and tp ranks the same one)
            inner = self._sp_size * self._tp_size
            total += torch.stack([x.float() for x in losses]).mean() / (self.groups.dp.world_size * inner)
        if dist.is_initialized():
            dist.all_reduce(total)  # the last stage's ranks hold the loss; every rank gets it
        return float(total)

    def _clip_grads(self, device) -> None:
        """Clip by the global L2 norm over every stage's gradients (a tied
        parameter counts once), as ``clip_grad_norm_`` on the whole model would."""
        dp, tp = self.groups.dp.world_size * self._sp_size, self._tp_size  # dp: the ranks ZeRO shards over
        skip = {id(p) for name, k, p, _, _ in self._tie_groups if self._split.tied[name][0] != k}
        split = {i: r for chunk in self.chunks for i, r in chunk._zg_runtime._tp_split().items()}  # tp slices
        grads = []
        total = torch.zeros((), dtype=torch.float32, device=device)
        for p in dict.fromkeys(self.chunks.parameters()):
            if p.grad is None:
                continue
            g = _local(p.grad)
            grads.append(g)
            if id(p) in skip:
                continue
            sharded = isinstance(p.grad, DTensor) and dp_sharded(p.grad.placements[0])
            sq = g.detach().float().pow(2).sum()  # each element counted once over the dp and tp ranks
            total += (sq if sharded else sq / dp) / split.get(id(p), tp)
        if dist.is_initialized():
            dist.all_reduce(total)
        norm = math.sqrt(float(total))
        for chunk in self.chunks:
            chunk._zg_runtime.ctx.last_grad_norm = norm
        coef = self._clip / (norm + 1e-6)
        if coef < 1.0:
            for g in grads:
                g.mul_(coef)

    # -- checkpoints ----------------------------------------------------------------
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's state dict (original keys), gathered from every
        stage and data-parallel rank. Collective; meant for small models and tests
        (it moves every tensor through ``all_gather_object``)."""
        from zerograph.runtime.sharding import full_state_dict

        mine = {}
        for k, module in self._modules_by_stage.items():
            for key, value in full_state_dict(module).items():
                for name in self._original_keys[k].get(key, ()):
                    mine[name] = value.detach().cpu()
        out = {k: v.detach().cpu().clone() for k, v in self._fallback_state.items()}
        if dist.is_initialized() and dist.get_world_size() > 1:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, mine)
            for part in gathered:
                out.update(part)
        else:
            out.update(mine)
        return out
