"""The engine :func:`zerograph.initialize` returns: DeepSpeed's
``DeepSpeedEngine`` interface around a model zerograph compiled.

    engine, optimizer, loader, scheduler = zerograph.initialize(model=model, config="ds_config.json",
                                                                model_parameters=model.parameters())
    for x, y in loader:
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()          # optimizer + scheduler step and zero_grad at the accumulation boundary

The compiled graphs already average gradients over ranks and the
``gradient_accumulation_steps`` micro-batches, clip, and scale the fp16 loss
(docs/concepts.md); the engine counts micro-batches, steps the optimizer and
the scheduler at each boundary (both skipped when fp16 overflowed), saves
DeepSpeed-style tagged checkpoints, and runs the monitoring sections of the
config (:mod:`zerograph.integrations.monitor`).
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn

from zerograph.api import _stage_contexts
from zerograph.checkpoint import load_checkpoint as _load_checkpoint
from zerograph.checkpoint import save_checkpoint as _save_checkpoint
from zerograph.config import Config
from zerograph.integrations.monitor import CommsLog, FlopsProfile, Monitors, StepTimers
from zerograph.pipeline import PipelineModeError
from zerograph.pipeline.step import flat_tensors, with_tensors
from zerograph.runtime.dist import rank_and_world

log = logging.getLogger(__name__)

LATEST = "latest"  # DeepSpeed's file naming the newest tag in a checkpoint directory


def torch_optimizer(optimizer: Any) -> Optional[torch.optim.Optimizer]:
    """The ``torch.optim.Optimizer`` a scheduler steps: the optimizer itself,
    or the one ``zerograph.make_optimizer``'s shard optimizer wraps."""
    if optimizer is None or isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    return getattr(optimizer, "optimizer", None)


def concat_batches(micro_batches: list) -> Any:
    """One batch from micro-batches of the same structure (tensors joined along dim 0)."""
    first = micro_batches[0]
    columns = zip(*(flat_tensors(mb) for mb in micro_batches))
    return with_tensors(first, [torch.cat(list(col)) for col in columns])


class ZeroGraphEngine(nn.Module):
    """DeepSpeed's engine interface over a model prepared by ``zerograph.compile``
    (``module``), its optimizer and LR scheduler (built by :func:`zerograph.initialize`).

    Counters as DeepSpeed's: ``global_steps`` (optimizer steps, skipped ones
    included), ``global_samples``, ``micro_steps``, ``skipped_steps``."""

    def __init__(self, module: nn.Module, config: Config, optimizer: Any = None, lr_scheduler: Any = None):
        super().__init__()
        self.module = module
        self.config = config
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.is_pipeline = hasattr(module, "stage_runtimes")
        self.global_steps = 0
        self.global_samples = 0
        self.micro_steps = 0
        self.skipped_steps = 0
        self.training_dataloader = None
        self._data_iterator = None
        self._window_losses: list[torch.Tensor] = []
        self._step_applied = False
        self._rebound_scheduler = False  # a client scheduler moved onto the sharded optimizer (first step warns)
        self._zg_steps_seen = self._zg_steps()
        self.global_rank, self.world_size = rank_and_world()
        first = self._contexts()[0]
        self.device = first.dp.device
        self.dp_world_size = first.dp.world_size
        self.dp_rank = first.dp.rank
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.monitor = Monitors(config, self.global_rank)
        self.timers = StepTimers(config.wall_clock_breakdown, self.device)
        params = sum(p.numel() for p in module.parameters())  # DTensors: the global sizes
        self.flops_profiler = FlopsProfile(config, self.global_rank, params)
        self.comms_logger = CommsLog(config)

    # -- DeepSpeed's accessors --------------------------------------------------
    def _contexts(self):
        return [ctx for _, ctx in _stage_contexts(self.module)]

    def train_batch_size(self) -> Optional[int]:
        return self.config.train_batch_size

    def train_micro_batch_size_per_gpu(self) -> Optional[int]:
        return self.config.train_micro_batch_size_per_gpu

    def gradient_accumulation_steps(self) -> int:
        return self.config.gradient_accumulation_steps

    def micro_batches(self) -> int:
        """Micro-batches per :meth:`train_batch`: ``pipeline.micro_batches`` or the accumulation steps."""
        return self.config.micro_batches if self.is_pipeline else self.config.gradient_accumulation_steps

    def zero_optimization_stage(self) -> int:
        return self.config.stage

    def fp16_enabled(self) -> bool:
        return self.config.fp16.enabled

    def bfloat16_enabled(self) -> bool:
        return self.config.bf16.enabled

    def gradient_clipping(self) -> float:
        return self.config.gradient_clipping

    def is_gradient_accumulation_boundary(self) -> bool:
        """Whether the next :meth:`step` ends an optimizer step."""
        return (self.micro_steps + 1) % self.gradient_accumulation_steps() == 0

    def was_step_applied(self) -> bool:
        """Whether the last optimizer step updated the parameters (false after an fp16 overflow)."""
        return self._step_applied

    def get_lr(self) -> list[float]:
        return [float(g["lr"]) for g in self.optimizer.param_groups] if self.optimizer is not None else []

    def get_mom(self) -> list[Any]:
        if self.optimizer is None:
            return []
        return [g.get("betas", g.get("momentum")) for g in self.optimizer.param_groups]

    def get_global_grad_norm(self) -> Optional[float]:
        """The gradient norm of the last optimizer step (computed when clipping is on)."""
        norms = [getattr(ctx, "last_grad_norm", None) for ctx in self._contexts()]
        return norms[0]

    def loss_scale(self) -> float:
        """The current fp16 loss scale (1.0 without fp16)."""
        scaler = self.module._zg_runtime.scaler if hasattr(self.module, "_zg_runtime") else None
        return float(scaler.scale) if scaler is not None else 1.0

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            module = self.__dict__.get("_modules", {}).get("module")
            if module is not None and name != "module" and hasattr(module, name):
                return getattr(module, name)
            raise

    # -- training ---------------------------------------------------------------
    def forward(self, *args, **kwargs):
        """The module's forward (one micro-batch)."""
        if self.is_pipeline:
            raise PipelineModeError("this engine's model is split into pipeline stages: train it with "
                                    "engine.train_batch(data_iter), which runs every micro-batch through the "
                                    "schedule and steps the optimizer, and evaluate with engine.eval_batch(data_iter)")
        with self.flops_profiler.counting(self.global_steps, "forward"), self.timers("forward"):
            return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor, retain_graph: bool = False, scale_wrt_gas: bool = True) -> torch.Tensor:
        """``loss.backward()`` for one micro-batch's loss. The compiled graphs
        average the gradients over the accumulation steps, as DeepSpeed's
        division of the loss does; ``scale_wrt_gas=False`` says the loss is
        already divided by ``gradient_accumulation_steps`` (the Hugging Face
        Trainer's), so it is multiplied back."""
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise TypeError(f"engine.backward takes the one-element loss tensor of a micro-batch; got "
                            f"{type(loss).__name__}{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}")
        if not scale_wrt_gas:
            loss = loss * self.gradient_accumulation_steps()
        self._window_losses.append(loss.detach().float().reshape(()))
        with self.flops_profiler.counting(self.global_steps, "backward"), self.timers("backward"):
            loss.backward(retain_graph=retain_graph)
        return loss

    def step(self, lr_kwargs: Optional[dict[str, Any]] = None) -> None:
        """End a micro-batch; at the accumulation boundary, step the optimizer
        and the LR scheduler (both skipped when the step's gradients were
        dropped: fp16 overflow, or ``nonfinite_grads: "skip"``), zero the
        gradients and run the monitors."""
        boundary = self.is_gradient_accumulation_boundary()
        if boundary:
            self._check_boundary()
            with self.timers("step"):
                self._take_model_step(lr_kwargs)
        self.micro_steps += 1
        if boundary:
            self._end_step()

    def _skip_micro_batches(self, count: int) -> None:
        """Count ``count`` micro-batches as done at the start of an
        optimizer step, so that it ends after fewer (a trainer's short last
        window of an epoch). Gradients are still divided by the full
        ``gradient_accumulation_steps``: scale the losses to match."""
        if self.is_pipeline or self.micro_steps % self.gradient_accumulation_steps():
            raise RuntimeError("micro-batches can only be skipped at the start of an optimizer step without a pipeline")
        self.micro_steps += count
        for ctx in self._contexts():
            ctx.micro_step += count

    def _zg_steps(self) -> int:
        return sum(ctx.step for ctx in self._contexts())

    def _check_boundary(self) -> None:
        if self.is_pipeline:
            return
        ctx = self._contexts()[0]
        if ctx.micro_step % self.gradient_accumulation_steps():
            raise RuntimeError(
                f"engine.step() ends optimizer step {self.global_steps + 1} after "
                f"{self.gradient_accumulation_steps()} micro-batch(es), but the model ran "
                f"{ctx.micro_step % self.gradient_accumulation_steps()} forward pass(es) with gradients past the "
                "last boundary: call engine(batch), engine.backward(loss) and engine.step() once per micro-batch "
                "(run evaluation forwards under torch.no_grad())")

    def _take_model_step(self, lr_kwargs: Optional[dict[str, Any]]) -> None:
        if self.optimizer is None:
            raise RuntimeError("engine.step(): the engine has no optimizer; give zerograph.initialize an optimizer, "
                               "or an 'optimizer' section in the config")
        steps = self._zg_steps()
        self._step_applied = steps > self._zg_steps_seen  # the backward's end-of-step work ran and kept the grads
        self._zg_steps_seen = steps
        if self._step_applied:
            self.optimizer.step()
            if self.lr_scheduler is not None:
                self._scheduler_step(lr_kwargs)
        else:
            self.skipped_steps += 1
            log.info("zerograph: optimizer step %d skipped (fp16 overflow or non-finite gradients); %d skipped so far",
                     self.global_steps + 1, self.skipped_steps)
        self.zero_grad()

    def _scheduler_step(self, lr_kwargs: Optional[dict[str, Any]]) -> None:
        with warnings.catch_warnings():
            if self._rebound_scheduler:  # torch's check that its own optimizer.step() wrapper ran
                warnings.filterwarnings("ignore", message="Seems like `optimizer.step()` has been overridden")
            self.lr_scheduler.step(**(lr_kwargs or {}))

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop (or zero) every parameter's gradient."""
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=set_to_none)
        for p in self.module.parameters():
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def _end_step(self) -> None:
        """Monitors and logs of the optimizer step that just ended."""
        micro = max(1, len(self._window_losses))
        loss = float(torch.stack(self._window_losses).mean()) if self._window_losses else math.nan
        self._window_losses = []
        self.flops_profiler.finish(self.global_steps, micro)
        self.global_steps += 1
        self.global_samples += self.train_batch_size() or 0
        times = self.timers.end_step() if self.timers.enabled else {}
        self.comms_logger.record(self.global_steps, self.comm_bytes_last_step())
        if self.monitor.enabled:
            x = self.global_samples if self.train_batch_size() else self.global_steps
            events = [("Train/Samples/train_loss", loss, x)]
            events += [("Train/Samples/lr", lr, x) for lr in self.get_lr()[:1]]
            if self.fp16_enabled():
                events.append(("Train/Samples/loss_scale", self.loss_scale(), x))
            events += [(f"Train/Samples/elapsed_time_ms_{name}", ms, x) for name, ms in times.items()]
            self.monitor.write_events(events)
        every = self.config.steps_per_print
        if every and self.global_steps % every == 0 and self.global_rank == 0:
            log.info("zerograph: step=%d, skipped=%d, loss=%.6g, lr=%s, mom=%s", self.global_steps,
                     self.skipped_steps, loss, self.get_lr(), self.get_mom())
        if self.global_steps % (every or 10) == 0 and self.global_rank == 0:
            if self.timers.enabled:
                log.info("zerograph: %s", self.timers.report())
            if self.comms_logger.enabled:
                log.info("zerograph: %s", self.comms_logger.report())

    def comm_bytes_last_step(self) -> dict[str, int]:
        """This rank's bytes per collective kind in the last optimizer step
        (``zerograph.inspect(model).comm_bytes_last_step``, without the graph inspection)."""
        out: dict[str, int] = {}
        for ctx in self._contexts():
            for kind, nbytes in ctx.stats.last_step.items():
                out[kind] = out.get(kind, 0) + nbytes
        return out

    # -- whole batches (pipelines) --------------------------------------------------
    def _next_micro_batches(self, data_iter: Optional[Iterable], caller: str) -> list:
        if data_iter is None:
            if self.training_dataloader is None:
                raise ValueError(f"engine.{caller}() needs a data iterator: pass one, or give zerograph.initialize "
                                 "training_data")
            if self._data_iterator is None:
                self._data_iterator = _repeating(self.training_dataloader)
            data_iter = self._data_iterator
        return [next(data_iter) for _ in range(self.micro_batches())]

    def train_batch(self, data_iter: Optional[Iterable] = None) -> torch.Tensor:
        """One optimizer step over ``micro_batches()`` micro-batches drawn from
        ``data_iter`` (default: the training data's loader, repeated): the
        forward and backward of each (through the pipeline schedule for a
        pipeline model), then the optimizer and scheduler step. Returns the
        mean loss over the micro-batches and data-parallel ranks."""
        self.module.train()
        batch = concat_batches(self._next_micro_batches(data_iter, "train_batch"))
        with self.flops_profiler.counting(self.global_steps, "forward+backward"), self.timers("forward"):
            loss = self.module.train_step(batch)
        self._window_losses = [torch.tensor(float(loss))]
        with self.timers("step"):
            self._take_model_step(None)
        self.micro_steps += self.micro_batches()
        self._end_step()
        return torch.tensor(float(loss))

    def eval_batch(self, data_iter: Iterable) -> torch.Tensor:
        """The mean loss of ``micro_batches()`` micro-batches from ``data_iter``,
        forwards only (the model's ``eval_step``)."""
        batch = concat_batches(self._next_micro_batches(data_iter, "eval_batch"))
        return torch.tensor(float(self.module.eval_step(batch)))

    # -- data -----------------------------------------------------------------------
    def deepspeed_io(self, dataset, batch_size: Optional[int] = None, route: str = "train", pin_memory: bool = False,
                     data_sampler=None, collate_fn=None, num_local_io_workers: Optional[int] = None):
        """A DataLoader over this data-parallel rank's share of ``dataset``
        (DeepSpeed's: a ``DistributedSampler`` with seed 0, batches of
        ``train_micro_batch_size_per_gpu``, ``dataloader_drop_last``)."""
        from torch.utils.data import DataLoader, DistributedSampler

        micro = batch_size or self.train_micro_batch_size_per_gpu()
        if micro is None:
            from zerograph.config import ConfigError

            raise ConfigError("training_data: the config gives no batch size for its DataLoader; set "
                              "train_micro_batch_size_per_gpu (or train_batch_size)")
        drop_last = self.config.dataloader_drop_last
        if data_sampler is None:
            data_sampler = DistributedSampler(dataset, num_replicas=self.dp_world_size, rank=self.dp_rank,
                                              shuffle=route == "train", seed=0, drop_last=drop_last)
        return DataLoader(dataset, batch_size=micro, sampler=data_sampler, collate_fn=collate_fn,
                          num_workers=num_local_io_workers or 0, pin_memory=pin_memory, drop_last=drop_last)

    # -- checkpoints ------------------------------------------------------------------
    def _validate_tag(self, tag: str) -> None:
        mode = self.config.checkpoint.tag_validation.lower()
        if mode == "ignore" or self.world_size == 1:
            return
        tags = [None] * self.world_size
        dist.all_gather_object(tags, tag)
        if len(set(tags)) > 1:
            message = (f"checkpoint tag differs across ranks: {sorted(set(tags))}; give every rank the same tag "
                       "(checkpoint.tag_validation)")
            if mode == "fail":
                raise ValueError(message)
            log.warning("zerograph: %s", message)

    def save_checkpoint(self, save_dir, tag: Any = None, client_state: Optional[dict] = None,
                        save_latest: bool = True, exclude_frozen_parameters: bool = False) -> bool:
        """Save the model, optimizer, scheduler, counters and ``client_state``
        to ``save_dir/tag`` (default tag ``global_step<N>``) and, with
        ``save_latest``, write the tag to ``save_dir/latest``. Collective."""
        if exclude_frozen_parameters:
            raise ValueError("save_checkpoint(exclude_frozen_parameters=True) is not supported yet; "
                             "zerograph saves every parameter")
        tag = f"global_step{self.global_steps}" if tag is None else str(tag)
        self._validate_tag(tag)
        root = Path(save_dir)
        engine_state = {"global_steps": self.global_steps, "global_samples": self.global_samples,
                        "micro_steps": self.micro_steps, "skipped_steps": self.skipped_steps}
        scheduler = self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None
        _save_checkpoint(root / tag, self.module, self.optimizer, client_state=dict(client_state or {}),
                         engine=engine_state, lr_scheduler=scheduler)
        if save_latest and self.global_rank == 0:
            tmp = root / f".{LATEST}.tmp"
            tmp.write_text(tag)
            tmp.replace(root / LATEST)
        if self.world_size > 1:
            dist.barrier()
        return True

    def load_checkpoint(self, load_dir, tag: Any = None, load_module_strict: bool = True,
                        load_optimizer_states: bool = True, load_lr_scheduler_states: bool = True,
                        load_module_only: bool = False, custom_load_fn=None) -> tuple[Optional[str], Optional[dict]]:
        """Load ``load_dir/tag`` (default: the tag in ``load_dir/latest``);
        returns ``(path, client_state)``, or ``(None, None)`` with a warning
        when there is no ``latest`` file. Loading is always strict (a
        checkpoint that does not fit the model is an error naming the keys),
        and reshards to this run's world size and ZeRO stage. Collective."""
        if custom_load_fn is not None:
            raise ValueError("load_checkpoint(custom_load_fn=...) is not supported; zerograph loads its own "
                             "checkpoints (zerograph.load_checkpoint)")
        root = Path(load_dir)
        if tag is None:
            latest = root / LATEST
            if not latest.is_file():
                log.warning("zerograph: no '%s' file in %s: nothing loaded; pass the checkpoint's tag to load it",
                            LATEST, root)
                return None, None
            tag = latest.read_text().strip()
        path = root / str(tag)
        optimizer = self.optimizer if load_optimizer_states and not load_module_only else None
        extra = _load_checkpoint(path, self.module, optimizer)
        if not load_module_only:
            state = extra.get("engine") or {}
            self.global_steps = state.get("global_steps", 0)
            self.global_samples = state.get("global_samples", 0)
            self.micro_steps = state.get("micro_steps", 0)
            self.skipped_steps = state.get("skipped_steps", 0)
            if load_lr_scheduler_states and self.lr_scheduler is not None and extra.get("lr_scheduler") is not None:
                self.lr_scheduler.load_state_dict(extra["lr_scheduler"])
        self._zg_steps_seen = self._zg_steps()
        self._window_losses = []
        return str(path), extra.get("client_state", {})


def _repeating(loader):
    """Batches of ``loader`` forever, epoch after epoch (DeepSpeed's RepeatingLoader)."""
    while True:
        yield from loader
