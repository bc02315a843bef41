"""The optimizer and LR schedule of a config's ``optimizer`` and ``scheduler``
sections (DeepSpeed's): :func:`build_optimizer` and :func:`build_scheduler`.

The optimizers are torch's (``Adam``/``AdamW`` build ``torch.optim.AdamW``
unless ``adam_w_mode`` is false, as DeepSpeed's fused Adam does). The
schedules reproduce DeepSpeed's ``WarmupLR``, ``WarmupDecayLR``,
``WarmupCosineLR``, ``OneCycle`` and ``LRRangeTest`` as torch
``LRScheduler`` subclasses, stepped once per optimizer step: the learning
rate of every optimizer step equals DeepSpeed's. DeepSpeed's schedules count
``last_batch_iteration`` from -1 at construction; a torch scheduler's
``last_epoch`` is that index plus one.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch.optim.lr_scheduler import LRScheduler

from zerograph.config import Config, ConfigError
from zerograph.config.optim import OPTIMIZER_PARAMS, OptimizerConfig

__all__ = ["build_optimizer", "build_scheduler", "optimizer_class_and_kwargs", "DeepSpeedSchedule"]

_DEFAULTS = {"Adam": {"weight_decay": 0.0}, "AdamW": {"weight_decay": 0.0}}  # DeepSpeed's, where torch's differ


def _config_of(model: Any, config: Any) -> Config:
    if config is not None:
        return Config.load(config)
    ctx = getattr(getattr(model, "_zg_runtime", None), "ctx", None)
    if ctx is None:
        raise ConfigError("build_optimizer/build_scheduler: pass the config (a model zerograph prepared carries its "
                          "own)")
    return ctx.config


def optimizer_class_and_kwargs(section: OptimizerConfig) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """The torch optimizer class and keyword arguments of an ``optimizer`` section."""
    params = section.params
    if section.type in ("Adam", "AdamW"):
        cls = torch.optim.AdamW if section.type == "AdamW" or params.adam_w_mode else torch.optim.Adam
    else:
        cls = getattr(torch.optim, section.type)
    kwargs = dict(_DEFAULTS.get(section.type, {}))
    skip = ("bias_correction", "adam_w_mode", "torch_adam", "fp32_optimizer_states")
    for name in OPTIMIZER_PARAMS[section.type]:
        value = getattr(params, name)
        if name in skip or value is None:
            continue  # None: the optimizer's own default
        kwargs[name] = tuple(value) if name == "betas" else value
    return cls, kwargs


def build_optimizer(model_or_params: Any, config: Any = None, *, params: Any = None) -> Any:
    """The optimizer of ``config``'s ``optimizer`` section.

    ``model_or_params``: a model ``zerograph.compile``/``shard`` prepared
    (built with ``zerograph.make_optimizer``, so offload and shard stepping
    apply; ``config`` defaults to the model's; ``params`` picks its
    parameters or parameter groups, default all), any other ``nn.Module``
    (over its parameters), or parameters / parameter groups."""
    cfg = _config_of(model_or_params, config)
    if cfg.optimizer is None:
        raise ConfigError("build_optimizer: the config has no 'optimizer' section; add one "
                          '(e.g. {"type": "AdamW", "params": {"lr": 1e-4}}) or build the optimizer yourself')
    cls, kwargs = optimizer_class_and_kwargs(cfg.optimizer)
    if getattr(model_or_params, "_zg_runtime", None) is not None:
        from zerograph.runtime.optimizer import make_optimizer

        return make_optimizer(model_or_params, cls, params=params, **kwargs)
    if isinstance(model_or_params, torch.nn.Module):
        return cls(model_or_params.parameters() if params is None else params, **kwargs)
    return cls(model_or_params, **kwargs)


def build_scheduler(optimizer: Any, config: Any, *, total_num_steps: Optional[int] = None) -> "DeepSpeedSchedule":
    """The LR schedule of ``config``'s ``scheduler`` section on ``optimizer``
    (a torch optimizer or one ``zerograph.make_optimizer`` built). Call its
    ``step()`` after every optimizer step.

    ``total_num_steps`` fills ``scheduler.params.total_num_steps`` when the
    config leaves it ``"auto"``."""
    cfg = Config.load(config)
    section = cfg.scheduler
    if section is None:
        raise ConfigError("build_scheduler: the config has no 'scheduler' section; add one "
                          '(e.g. {"type": "WarmupLR", "params": {"warmup_num_steps": 100}})')
    params = section.params.model_dump()
    if params["total_num_steps"] == "auto" or (total_num_steps is not None and params["total_num_steps"] is None):
        if total_num_steps is None:
            raise ConfigError('scheduler.params.total_num_steps is "auto": pass build_scheduler(..., '
                              "total_num_steps=N) or resolve it with Config.resolve_auto("
                              '{"scheduler.params.total_num_steps": N})')
        params["total_num_steps"] = total_num_steps
    torch_optimizer = optimizer if isinstance(optimizer, torch.optim.Optimizer) else optimizer.optimizer
    return DeepSpeedSchedule(torch_optimizer, section.type, params)


class DeepSpeedSchedule(LRScheduler):
    """One of DeepSpeed's LR schedules (``kind``) as a torch ``LRScheduler``;
    OneCycle also cycles ``betas[0]`` of optimizers that have betas."""

    def __init__(self, optimizer: torch.optim.Optimizer, kind: str, params: dict[str, Any]) -> None:
        self.kind = kind
        self.params = dict(params)
        self.cycle_momentum = kind == "OneCycle" and params["cycle_momentum"] and "betas" in optimizer.defaults
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        it = self.last_epoch - 1  # DeepSpeed's last_batch_iteration
        return [self._lr(it, base) for base in self.base_lrs]

    def step(self, epoch: Optional[int] = None) -> None:  # noqa: D102 - LRScheduler.step
        super().step(epoch)
        if self.cycle_momentum:
            beta1 = self._momentum(self.last_epoch - 1)
            for group in self.optimizer.param_groups:
                group["betas"] = (beta1, 0.99)  # DeepSpeed's OneCycle sets beta2 to 0.99

    # -- DeepSpeed's formulas, by last_batch_iteration ``it`` ------------------

    def _warmup_fraction(self, it: int) -> float:
        n = max(2, self.params["warmup_num_steps"])
        if self.params["warmup_type"] == "log":
            return math.log(it + 1) / math.log(n)
        return it / n

    def _lr(self, it: int, base: float) -> float:
        p, kind = self.params, self.kind
        n = max(2, p["warmup_num_steps"])
        if kind in ("WarmupLR", "WarmupDecayLR"):
            low = p["warmup_min_lr"]
            high = p["warmup_max_lr"] if p["warmup_max_lr"] is not None else (base if kind == "WarmupLR" else 0.001)
            if it < 0:
                return low
            if it < n:
                gamma = self._warmup_fraction(it)
            elif kind == "WarmupLR":
                gamma = 1.0
            else:
                total = p["total_num_steps"]
                gamma = max(0.0, (total - it) / max(1.0, total - n))
            return low + (high - low) * gamma
        if kind == "WarmupCosineLR":
            if it < 0:
                return 0.0
            if it < n:
                ratio = p["warmup_min_ratio"] + self._warmup_fraction(it) * (1.0 - p["warmup_min_ratio"])
            else:
                progress = min(1.0, (it - n + 1) / max(1, p["total_num_steps"] - n))
                cosine = (1 + math.cos(math.pi * progress)) / 2
                ratio = max(0.0, p["cos_min_ratio"] + (1.0 - p["cos_min_ratio"]) * cosine)
            return base * ratio
        if kind == "OneCycle":
            low, high = p["cycle_min_lr"], p["cycle_max_lr"]
            if it < self._cycle_size():
                return low + (high - low) * self._cycle_scale(it)
            if p["decay_step_size"] == 0 or p["decay_lr_rate"] == 0:
                return low
            return low / (1 + p["decay_lr_rate"] * (it - self._cycle_size() + 1) / p["decay_step_size"])
        # LRRangeTest
        steps = (it + 1) / p["lr_range_test_step_size"]
        if p["lr_range_test_staircase"]:
            steps = math.floor(steps)
        return p["lr_range_test_min_lr"] * (1 + p["lr_range_test_step_rate"] * steps)

    def _cycle_size(self) -> float:
        first = float(self.params["cycle_first_step_size"])
        second = self.params["cycle_second_step_size"]
        return first + (first if second is None else float(second))

    def _cycle_scale(self, it: int) -> float:
        """OneCycle's position in the cycle: 0 at the low end, 1 at the peak."""
        p = self.params
        first = float(p["cycle_first_step_size"])
        total = self._cycle_size()
        second = total - first
        batch = it + 1
        x = 1.0 + batch / total - math.floor(1 + batch / total)
        ratio = first / total
        if x <= ratio:
            scale, stairs = x / ratio, p["cycle_first_stair_count"]
        else:
            scale = (x - 1) / (ratio - 1)
            stairs = p["cycle_second_stair_count"]
            stairs = p["cycle_first_stair_count"] if stairs is None else stairs
        if stairs > 0:
            position = batch % total
            position = position * stairs / first if position <= first else (total - position) * stairs / second
            scale = math.floor(position) / stairs
        return scale

    def _momentum(self, it: int) -> float:
        p = self.params
        if it < 0:
            return p["cycle_min_mom"]  # DeepSpeed starts OneCycle at cycle_min_mom
        if it < self._cycle_size():
            return p["cycle_max_mom"] - (p["cycle_max_mom"] - p["cycle_min_mom"]) * self._cycle_scale(it)
        if p["decay_step_size"] == 0 or p["decay_mom_rate"] == 0:
            return p["cycle_max_mom"]
        return p["cycle_max_mom"] * (1 + p["decay_mom_rate"] * (it - self._cycle_size() + 1) / p["decay_step_size"])
