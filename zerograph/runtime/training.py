"""What happens around each compiled call: micro-batch bookkeeping, input
casts, and the end-of-backward work at an accumulation boundary
(fp16 unscale and overflow skip, gradient clipping, step statistics)."""

from __future__ import annotations

import logging
import math
import weakref

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from zerograph._torch_private import dynamo_exception_types, queue_backward_callback
from zerograph.runtime.state import ModelState
from zerograph.runtime.dist import RankMonitor
from zerograph.runtime.memory import MemoryBudgetError
from zerograph.runtime.errors import (
    STEP_PHASES,
    explain_collective_failure,
    explain_trace_failure,
    is_collective_failure,
    naming_failed_ranks,
)
from zerograph.runtime.precision import LossScaler
from zerograph.runtime.sequence import SequenceParallelError
from zerograph.runtime.tp_layout import TensorParallelError
from zerograph.runtime.tp_params import dp_sharded

log = logging.getLogger(__name__)


def _cause_of_type(exc: BaseException, kind: type) -> BaseException | None:
    """The first exception of ``kind`` in ``exc``'s chain of causes, or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, kind):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _map_tensors(obj, fn):
    """Apply ``fn`` to every tensor in nested tuples/lists/dicts, keeping
    container types (a Hugging Face ``ModelOutput`` is updated in place)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_map_tensors(o, fn) for o in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map_tensors(o, fn) for o in obj)
    if isinstance(obj, dict):
        for key in list(obj.keys()):
            obj[key] = _map_tensors(obj[key], fn)
        return obj
    return obj


class _BackwardEntry(torch.autograd.Function):
    """Identity on the outputs; in backward, scales the incoming gradient by
    the fp16 loss scale and queues the end-of-backward work once."""

    @staticmethod
    def forward(ctx, runtime, boundary, *tensors):
        ctx.runtime, ctx.boundary = runtime, boundary
        # An output the loss does not use (logits next to the loss) gets no
        # gradient; do not turn that None into a zeros tensor of its size.
        ctx.set_materialize_grads(False)
        # Views of the outputs, but a one-element output (the loss) is copied: autograd forbids in-place
        # ops on the views a custom Function returns, and losses get them (the Hugging Face Trainer's
        # ``loss *= num_processes``)
        return tuple(t.clone() if t.numel() == 1 else t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        runtime = ctx.runtime
        scale = runtime.scaler.scale if runtime.scaler is not None else 1.0
        if ctx.boundary or not runtime.ctx.defers_grad_sync:  # a backward that communicates
            runtime.check_position("backward")
        if ctx.boundary:
            runtime.queue_finish()
        out = tuple(None if g is None else (g * scale if scale != 1.0 else g) for g in grads)
        return (None, None, *out)


def failure_translator(monitor, timeout_s: float, step=lambda: 0):
    """A ``collective_failure`` translation (see
    :func:`~zerograph.runtime.errors.naming_failed_ranks`) for collectives
    outside a model's steps, e.g. the parameter setup in
    ``zerograph.compile``: a failed collective becomes a RankFailureError
    naming the dead rank(s) found by ``monitor``."""

    def translate(exc: BaseException, phase: str) -> BaseException:
        if not is_collective_failure(exc):
            return exc
        err = explain_collective_failure(exc, monitor, step=step() + 1, phase=phase, timeout_s=timeout_s,
                                         rank=dist.get_rank())
        log.error("%s", err)
        return err

    return translate


def _translator(ref: "weakref.ref[TrainingRuntime]"):
    """``ctx.collective_failure``: the runtime's translation of a
    failed collective, without the context keeping the runtime alive."""

    def translate(exc: BaseException, phase: str) -> BaseException:
        runtime = ref()
        return exc if runtime is None else runtime.collective_failure(exc, phase)

    return translate


class TrainingRuntime:
    """Calls the compiled model and runs what surrounds each step."""

    def __init__(self, ctx: ModelState, compiled, params: list[torch.nn.Parameter], monitor=None,
                 step_check=None):
        self.ctx = ctx
        self.compiled = compiled
        self.params = params
        cfg = ctx.config
        self.scaler = LossScaler.from_config(cfg.fp16) if cfg.fp16.enabled else None
        self.clip = cfg.gradient_clipping
        self.named_params: dict[str, torch.nn.Parameter] | None = None
        self.model_ref = None  # weakref.ref to the model, for error messages
        self._finish_queued = False
        # Dead-rank detection: a heartbeat per rank in the store, read only
        # after a collective fails (docs/troubleshooting.md#a-rank-died).
        self.monitor = monitor
        if monitor is None and ctx.model_ranks > 1 and dist.is_initialized() and \
                str(dist.get_backend(ctx.model_group)) in ("gloo", "nccl"):
            self.monitor = RankMonitor.for_group(ctx.model_group, cfg.zerograph.collective_timeout_s)
        if self.monitor is not None:
            weakref.finalize(self, self.monitor.stop)
        # Ranks that drifted apart raise before a phase's collectives
        # (zerograph.runtime.agreement.StepCheck; None: world size 1).
        self.step_check = step_check
        self._forward_communicates: bool | None = None
        ref = weakref.ref(self)  # the context must not keep its runtime alive
        ctx.collective_guard = lambda executable, phase: ref().guard_collectives(executable, phase)
        ctx.collective_failure = _translator(ref)
        ctx.position_check = lambda phase: ref().check_position(phase)

    # -- collective failures -------------------------------------------------
    def collective_failure(self, exc: BaseException, phase: str) -> BaseException:
        """``exc`` as a :class:`~zerograph.runtime.errors.RankFailureError`
        naming the dead rank(s) when it is a failed collective, else ``exc``."""
        if self.ctx.model_ranks == 1 or not is_collective_failure(exc):
            return exc
        err = explain_collective_failure(
            exc, self.monitor, step=self.ctx.step + 1, phase=phase,
            timeout_s=self.ctx.config.zerograph.collective_timeout_s, rank=dist.get_rank(),
        )
        log.error("%s", err)
        return err

    def check_position(self, phase: str) -> None:
        """Check that every rank is about to run ``phase`` at the same
        micro-batch and step (collective; :class:`~zerograph.runtime.agreement.StepCheck`).
        A no-op at world size 1."""
        if self.step_check is None:
            return
        ctx = self.ctx
        with naming_failed_ranks(ctx, phase if phase in STEP_PHASES else phase.replace("inference ", "")):
            self.step_check(phase, ctx.micro_step, ctx.step)

    def guard_collectives(self, executable, phase: str):
        """Wrap a boxed compiled graph so that a failed collective inside it
        raises a RankFailureError (the backend wraps every graph with this)."""
        if self.ctx.model_ranks == 1:
            return executable
        ctx = self.ctx

        def run(args):
            with naming_failed_ranks(ctx, phase):
                return executable(args)

        run._boxed_call = True
        return run

    # -- forward -----------------------------------------------------------
    # ``before`` and ``after`` are kept out of Dynamo (graph breaks), so the
    # call in between can be traced by an outer ``torch.compile(model,
    # backend="zerograph")`` as well as by ``zerograph.compile``.
    def __call__(self, *args, **kwargs):
        args, kwargs, boundary = self.before(args, kwargs)
        try:
            out = self.compiled(*args, **kwargs)
        except dynamo_exception_types() as exc:
            for kind in (MemoryBudgetError, TensorParallelError, SequenceParallelError):
                own = _cause_of_type(exc, kind)
                if own is not None:  # raised by the backend inside Dynamo: report it as is
                    raise own from exc
            model = self.model_ref() if self.model_ref is not None else None
            if model is None:
                raise
            raise explain_trace_failure(model, exc) from exc
        return self.after(out, boundary)

    @torch.compiler.disable
    def before(self, args, kwargs):
        """Cast floating inputs to the compute dtype; count the micro-batch."""
        ctx = self.ctx
        dtype = ctx.config.compute_dtype
        if dtype != torch.float32:

            def cast(t):
                return t.to(dtype) if t.is_floating_point() else t

            args, kwargs = _map_tensors(args, cast), _map_tensors(kwargs, cast)
        boundary = None
        ctx.recording_order = torch.is_grad_enabled()  # the planner's region order (context.py)
        if torch.is_grad_enabled():
            ctx.micro_step += 1
            boundary = ctx.micro_step % ctx.config.gradient_accumulation_steps == 0
            ctx.region_order = []
        deferring = boundary is False and ctx.defers_grad_sync
        ctx.read_state.tag = ctx.nosync_tag if deferring else ctx.tag
        if self.step_check is not None and self._communicating_forward():
            self.check_position("forward" if boundary is not None else "inference forward")
        return args, kwargs, boundary

    def _communicating_forward(self) -> bool:
        """Whether a forward gathers parameters (ZeRO stages 1-3: some are sharded)."""
        if self._forward_communicates is None:
            self._forward_communicates = any(s.storage == "sharded" for s in self.ctx.specs.values())
        return self._forward_communicates

    @torch.compiler.disable
    def after(self, out, boundary):
        if boundary is None:
            return out
        return self._attach(out, boundary)

    def _attach(self, out, boundary: bool):
        tensors: list[torch.Tensor] = []
        _map_tensors(out, lambda t: tensors.append(t) or t)
        needs = [t for t in tensors if t.requires_grad and t.is_floating_point()]
        if not needs:
            return out
        entered = dict(zip(map(id, needs), _BackwardEntry.apply(self, boundary, *needs)))
        return _map_tensors(out, lambda t: entered.get(id(t), t))

    # -- end of backward -----------------------------------------------------
    def queue_finish(self) -> None:
        if not self._finish_queued:
            self._finish_queued = True
            queue_backward_callback(self._finish)

    def _local_grads(self) -> list[tuple[torch.Tensor, float]]:
        """(local gradient, share) for every parameter with a gradient: the
        share of its squared norm this rank counts, so that the sum over the
        model's ranks counts every element once (1 for a shard; 1/dp for a
        gradient every data-parallel rank holds, and 1/tp more for one every
        tensor-parallel rank holds, 1/replicas for a replicated tp slice)."""
        out = []
        dp = self.ctx.world_size
        tp = self.ctx.tp.world_size if self.ctx.tp is not None else 1
        split = self._tp_split()
        for p in self.params:
            g = p.grad
            if g is None:
                continue
            local = g.to_local() if isinstance(g, DTensor) else g
            sharded = isinstance(g, DTensor) and dp_sharded(g.placements[0])
            share = (1.0 if sharded else 1.0 / dp) / split.get(id(p), tp)
            out.append((local, share))
        return out

    def _tp_split(self) -> dict[int, int]:
        """id of each parameter split over the tensor-parallel ranks -> how
        many tp ranks hold its slice (1; more for replicated key/value heads)."""
        if self.ctx.tp is None:
            return {}
        named = self.named_params or {}
        return {id(p): self.ctx.specs[name].tp.replicas for name, p in named.items()
                if name in self.ctx.specs and self.ctx.specs[name].tp is not None}

    def _all_reduce(self, t: torch.Tensor, op) -> torch.Tensor:
        if self.ctx.model_ranks > 1:
            with naming_failed_ranks(self.ctx, "optimizer step boundary"):
                dist.all_reduce(t, op=op, group=self.ctx.model_group)
        return t

    def _flush_stash(self) -> None:
        """Reduce gradients stashed on earlier micro-batches whose parameter
        the boundary micro-batch did not use (collective; every rank runs
        the same graphs, so every rank has the same names left)."""
        named = self.named_params or {}
        for name in sorted(self.ctx.grad_stash):
            held = self.ctx.grad_stash[name]
            reduced = torch.ops.zerograph.reduce_grad(torch.zeros_like(held), self.ctx.tag, name)
            param = named[name]
            if isinstance(param, DTensor):
                # shape/stride given: an uneven shard (97 rows on 2 ranks) cannot imply the global shape
                reduced = DTensor.from_local(reduced, param.device_mesh, param.placements, run_check=False,
                                             shape=param.shape, stride=param.stride())
            param.grad = reduced if param.grad is None else param.grad + reduced

    def _finish(self) -> None:
        self._finish_queued = False
        if self.ctx.grad_stash:
            self._flush_stash()
        grads = self._local_grads()
        if self.scaler is not None and not self._unscale(grads):
            self.ctx.stats.end_step()
            return
        if self.scaler is None and self.ctx.config.zerograph.nonfinite_grads != "ignore" and not self._check_finite():
            self.ctx.stats.end_step()
            return
        if self.clip > 0:
            self._clip(grads)
        self.ctx.step += 1
        self.ctx.stats.end_step()

    def _nonfinite_anywhere(self, grads) -> bool:
        """Whether any rank's gradients hold a nan or inf (collective).

        Fast path, one read of each gradient: nan and inf propagate through
        a sum, so finite fp32 sums on every rank prove every element finite.
        Finite values can also sum to inf (overflow), so when some rank's
        sum is not finite, every rank checks its gradients element by
        element before anything is reported."""
        device = self.ctx.dp.device
        local = [g for g, _ in grads if g.numel()]
        if not local:
            total = torch.zeros((), device=device)
        else:
            total = torch.stack([g.sum(dtype=torch.float32) for g in local]).sum()
        suspect = (~torch.isfinite(total)).to(torch.float32)
        if not bool(self._all_reduce(suspect, dist.ReduceOp.MAX).item()):
            return False
        found = torch.zeros((), device=device)
        for g in local:
            found = torch.maximum(found, (~torch.isfinite(g)).any().to(found.dtype))
        return bool(self._all_reduce(found, dist.ReduceOp.MAX).item())

    def _nonfinite_names(self) -> list[str]:
        named = self.named_params or {}
        bad = []
        for name, p in named.items():
            g = p.grad
            if g is None:
                continue
            local = g.to_local() if isinstance(g, DTensor) else g
            if local.numel() and not bool(torch.isfinite(local).all()):
                bad.append(name)
        return bad

    def _check_finite(self) -> bool:
        """bf16/fp32: nan/inf in any rank's gradients raises (naming the step
        and this rank's offending parameters) or, with ``nonfinite_grads:
        skip``, drops the gradients so the optimizer skips the step."""
        if not self._nonfinite_anywhere(self._local_grads()):
            return True
        step = self.ctx.step + 1
        names = self._nonfinite_names()
        where = f"on this rank in {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}" if names else "on another rank"
        if self.ctx.config.zerograph.nonfinite_grads == "skip":
            log.warning("zerograph: optimizer step %d skipped: non-finite gradients %s", step, where)
            for p in self.params:
                p.grad = None
            return False
        raise FloatingPointError(
            f"zerograph: non-finite gradients (nan/inf) at optimizer step {step}, {where}. "
            "Lower the learning rate, check the inputs and loss, or set "
            "zerograph.nonfinite_grads to \"skip\" to drop such steps"
        )

    def _unscale(self, grads) -> bool:
        """Unscale fp16 gradients; on overflow on any rank drop them (the
        optimizer then skips the step) and return False."""
        overflow = self._nonfinite_anywhere(grads)
        self.scaler.update(overflow)
        if overflow:
            for p in self.params:
                p.grad = None
            return False
        inv = 1.0 / self.scaler.scale
        for g, _ in grads:
            g.mul_(inv)
        return True

    def _clip(self, grads) -> None:
        """Clip by global L2 norm over all ranks' shards, as
        ``torch.nn.utils.clip_grad_norm_`` would on the full gradients."""
        device = self.ctx.dp.device
        total = torch.zeros((), dtype=torch.float32, device=device)
        for g, share in grads:
            total = total + g.detach().float().pow(2).sum() * share
        norm = math.sqrt(self._all_reduce(total, dist.ReduceOp.SUM).item())
        self.ctx.last_grad_norm = norm
        coef = self.clip / (norm + 1e-6)
        if coef < 1.0:
            for g, _ in grads:
                g.mul_(coef)
