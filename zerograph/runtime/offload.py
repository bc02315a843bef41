"""ZeRO-Offload of optimizer states (``zero_optimization.offload_optimizer.device: "cpu"``).

:class:`HostOptimizer` keeps, for every parameter, an fp32 master copy of this
rank's shard on the host, with its own ``.grad``; the wrapped optimizer (any
``torch.optim`` class) is built over those host copies, so its states (Adam's
moments) live on the host too. Each :meth:`~HostOptimizer.step`:

1. copies the device gradient shards to the host masters' ``.grad``
   (pinned, non-blocking on CUDA, then one synchronize);
2. runs the optimizer step on the host;
3. copies the updated masters back into the device shards.

Device memory then holds only the parameter shards and gradients (no optimizer
states, no second copy of the masters). On a CPU-only machine host and device
are the same, but the copies and the host-side step still happen, so the
mechanism is exercised there too.

Build it with :func:`zerograph.runtime.offload.make_optimizer`, which returns a
plain optimizer when the config does not offload.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from torch.distributed.tensor import DTensor

log = logging.getLogger(__name__)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class HostOptimizer:
    """An optimizer whose fp32 master shards and states live in host memory."""

    def __init__(self, params, optimizer_cls: Callable[..., torch.optim.Optimizer], *,
                 pin_memory: bool = False, **optimizer_kwargs: Any):
        self.device_params = [p for p in params if p.requires_grad]
        if not self.device_params:
            raise ValueError("HostOptimizer got no parameters that require gradients; pass model.parameters()")
        self.pin = pin_memory and torch.cuda.is_available()
        self.host_params = []
        for p in self.device_params:
            local = _local(p.detach())
            host = torch.empty(local.shape, dtype=torch.float32, device="cpu", pin_memory=self.pin)
            host.copy_(local)  # a copy even where host == device (CPU-only builds)
            self.host_params.append(torch.nn.Parameter(host))
        self.optimizer = optimizer_cls(self.host_params, **optimizer_kwargs)
        log.info("zerograph: optimizer offload: %d master shards (%d bytes) and %s states on the host",
                 len(self.host_params), sum(h.numel() * 4 for h in self.host_params), optimizer_cls.__name__)

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("HostOptimizer.step does not take a closure; compute the loss before step()")
        non_blocking = False
        for dev, host in zip(self.device_params, self.host_params):
            if dev.grad is None:
                host.grad = None
                continue
            grad = _local(dev.grad)
            non_blocking = non_blocking or grad.is_cuda
            if host.grad is None:
                host.grad = torch.empty(host.shape, dtype=torch.float32, device="cpu", pin_memory=self.pin)
            host.grad.copy_(grad, non_blocking=grad.is_cuda and self.pin)
        if non_blocking:
            torch.cuda.synchronize()
        self.optimizer.step()
        for dev, host in zip(self.device_params, self.host_params):
            local = _local(dev.data)
            local.copy_(host.detach(), non_blocking=local.is_cuda and self.pin)

    def zero_grad(self, set_to_none: bool = True):
        for p in self.device_params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)


def make_optimizer(model: torch.nn.Module, optimizer_cls: Callable[..., torch.optim.Optimizer],
                   **optimizer_kwargs: Any):
    """The optimizer the model's config asks for: a :class:`HostOptimizer` when
    ``zero_optimization.offload_optimizer.device`` is ``"cpu"``, else
    ``optimizer_cls(model.parameters(), **optimizer_kwargs)``."""
    ctx = getattr(getattr(model, "_zg_runtime", None), "ctx", None)
    if ctx is None:
        raise ValueError("make_optimizer needs a model prepared by zerograph.compile or zerograph.shard")
    offload = ctx.config.zero_optimization.offload_optimizer
    if offload.device == "cpu":
        return HostOptimizer(model.parameters(), optimizer_cls, pin_memory=offload.pin_memory, **optimizer_kwargs)
    return optimizer_cls(model.parameters(), **optimizer_kwargs)
