"""``train_step`` plumbing shared by pipeline and non-pipeline models: how a
batch is called, split into micro-batches, and turned into a loss.

A batch is a dict (called as ``model(**batch)``), a tuple or list
(``model(*batch)``) or one tensor (``model(batch)``). Its tensors are split
along dim 0. The loss is ``loss_fn(outputs, batch)`` when given, else the
output's ``.loss`` (Hugging Face, nanoGPT), ``["loss"]``, or the output
itself when it is a scalar tensor.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

LossFn = Callable[[Any, Any], torch.Tensor]


def call_model(model, batch):
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _describe_key(key) -> str:
    return f"batch[{key!r}]" if key is not None else "batch"


def _items(batch):
    if isinstance(batch, dict):
        return list(batch.items())
    if isinstance(batch, (tuple, list)):
        return list(enumerate(batch))
    return [(None, batch)]


def _rebuild(batch, values):
    if isinstance(batch, dict):
        return dict(zip(batch.keys(), values))
    if isinstance(batch, (tuple, list)):
        return type(batch)(values)
    return values[0]


def split_batch(batch, micro_batches: int, knob: str = "pipeline.micro_batches") -> list:
    """``micro_batches`` equal micro-batches (every tensor split along dim 0)."""
    chunks = []
    first = None
    for key, value in _items(batch):
        if not isinstance(value, torch.Tensor):
            chunks.append([value] * micro_batches)
            continue
        rows = value.shape[0] if value.dim() else 0
        if value.dim() == 0 or rows % micro_batches:
            raise ValueError(
                f"{_describe_key(key)} has {rows} rows, which {micro_batches} micro-batches cannot split "
                f"evenly; make the batch size a multiple of {micro_batches} or change {knob}"
            )
        if first is None:
            first = (key, rows)
        elif rows != first[1]:
            raise ValueError(
                f"{_describe_key(key)} has {rows} rows but {_describe_key(first[0])} has {first[1]}; every "
                "tensor of a batch is split along dim 0 into micro-batches, so all need the same number of rows"
            )
        chunks.append(list(value.split(rows // micro_batches)))
    return [_rebuild(batch, [c[i] for c in chunks]) for i in range(micro_batches)]


def flat_tensors(batch) -> list[torch.Tensor]:
    return [v for _, v in _items(batch) if isinstance(v, torch.Tensor)]


def with_tensors(batch, tensors):
    """``batch`` with its tensors replaced, in :func:`flat_tensors` order."""
    it = iter(tensors)
    return _rebuild(batch, [next(it) if isinstance(v, torch.Tensor) else v for _, v in _items(batch)])


def loss_of(out, batch, loss_fn: LossFn | None) -> torch.Tensor:
    if loss_fn is not None:
        loss = loss_fn(out, batch)
    elif isinstance(out, torch.Tensor):
        loss = out
    elif getattr(out, "loss", None) is not None:
        loss = out.loss
    elif isinstance(out, dict) and out.get("loss") is not None:
        loss = out["loss"]
    else:
        raise TypeError(
            f"cannot find the loss in the model's output ({type(out).__name__}): it has no .loss; "
            "pass loss_fn=lambda outputs, batch: ... to zerograph.compile"
        )
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TypeError(f"the loss must be a one-element tensor; got {type(loss).__name__} "
                        f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}")
    return loss.reshape(())


class LossModule(nn.Module):
    """``forward(*batch_tensors) -> (loss,)``: what the pipeline traces."""

    def __init__(self, model: nn.Module, example_batch, loss_fn: LossFn | None):
        super().__init__()
        self.model = model  # name must match split.WRAPPER_ATTR
        self._example = example_batch
        self._loss_fn = loss_fn

    def forward(self, *tensors):
        batch = with_tensors(self._example, tensors)
        return (loss_of(call_model(self.model, batch), batch, self._loss_fn),)


def mean_over_group(value: torch.Tensor, group, world: int, device=None) -> float:
    if world > 1:
        value = value.to(device) if device is not None else value.clone()
        dist.all_reduce(value, group=group)
        value /= world
    return float(value)


def eager_train_step(model, batch, loss_fn: LossFn | None, accumulation: int, group, world: int,
                     device=None) -> float:
    """Without a pipeline: ``accumulation`` forward/backward passes over equal
    micro-batches of this rank's batch; returns the mean loss over the
    micro-batches and the data-parallel ranks."""
    total = torch.zeros((), dtype=torch.float32)
    for micro in split_batch(batch, accumulation, "gradient_accumulation_steps"):
        loss = loss_of(call_model(model, micro), micro, loss_fn)
        loss.backward()
        total += loss.detach().float().cpu() / accumulation
    return mean_over_group(total, group, world, device)


@contextlib.contextmanager
def evaluating(contexts, device=None):
    """What an ``eval_step`` runs under, so that training is not disturbed:
    ``torch.no_grad()``, a forked RNG (dropout in training mode draws its
    masks from it; the state is restored afterwards), and the communication
    counts of the step in progress of every ``ModelState`` in
    ``contexts`` restored afterwards (evaluation's gathers are not the
    training step's)."""
    saved = [(ctx.stats, ctx.stats.current.copy()) for ctx in contexts]
    devices = [device] if device is not None and torch.device(device).type == "cuda" else []
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            yield
    finally:
        for stats, current in saved:
            stats.current = current


def eager_eval_step(model, batch, loss_fn: LossFn | None, accumulation: int, group, world: int,
                    device=None) -> float:
    """Without a pipeline: the forwards of :func:`eager_train_step` (the same
    micro-batches, so the value is comparable to its loss); returns the mean
    loss over the micro-batches and the data-parallel ranks. Call it under
    :func:`evaluating`."""
    total = torch.zeros((), dtype=torch.float32)
    for micro in split_batch(batch, accumulation, "gradient_accumulation_steps"):
        loss = loss_of(call_model(model, micro), micro, loss_fn)
        total += loss.float().cpu() / accumulation
    return mean_over_group(total, group, world, device)
