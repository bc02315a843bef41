"""ZeRO-Offload: optimizer states (``zero_optimization.offload_optimizer.device:
"cpu"``) and parameter shards (``offload_param.device: "cpu"``) in host memory.

Where "the host" is, and whether host buffers are pinned, is decided here and
nowhere else (:data:`HOST`, :func:`pin_host_memory`); the lowering of
``offload_param`` (the copies in :mod:`zerograph.collectives`) and the
parameter storage (:func:`host_shard`) read it from here.

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

With ``offload_param`` the parameter shards already live on the host in the
master dtype: :class:`HostOptimizer` then uses each such shard itself as its
master (``host_resident``), steps it in place and copies nothing (the compiled
backward already copied its gradient shard to the host, see
:func:`zerograph.collectives.reduce_param_grad`).

Build it with :func:`zerograph.runtime.offload.make_optimizer`, which returns a
plain optimizer when the config does not offload.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from torch.distributed.tensor import DTensor

from zerograph._torch_private import dtensor_with_local

log = logging.getLogger(__name__)

# Host memory: where offloaded parameter shards, their gradients, master
# copies and optimizer states live. The compute device is the model's
# (``ShardingContext.dp.device``); on a CPU-only build the two are the same
# device and every copy between them is still made (a distinct tensor).
HOST = torch.device("cpu")


def pin_host_memory(requested: bool = True) -> bool:
    """Whether host buffers are pinned: when ``requested`` (the config's
    ``pin_memory``) and an accelerator exists (CPU builds cannot pin)."""
    return requested and torch.cuda.is_available()


def host_shard(stored: torch.Tensor, *, pin: bool) -> torch.Tensor:
    """``stored`` (a DTensor or a plain tensor) with its local shard in host
    memory: itself if it is already there and need not be pinned, else a
    copy (pinned when ``pin``), as the same kind of tensor."""
    local = _local(stored)
    if local.device == HOST and (not pin or local.is_pinned()):
        return stored
    host = torch.empty(local.shape, dtype=local.dtype, device=HOST, pin_memory=pin)
    host.copy_(local)
    if isinstance(stored, DTensor):
        return dtensor_with_local(stored, host)
    return host


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class HostOptimizer:
    """An optimizer whose fp32 master shards and states live in host memory.

    ``host_resident``: parameters whose shard already is an fp32 tensor in
    host memory (``offload_param``); each is its own master, stepped in place,
    with no copies. The others get a host master copy."""

    def __init__(self, params, optimizer_cls: Callable[..., torch.optim.Optimizer], *,
                 pin_memory: bool = False, host_resident=(), **optimizer_kwargs: Any):
        self.device_params = [p for p in params if p.requires_grad]
        if not self.device_params:
            raise ValueError("HostOptimizer got no parameters that require gradients; pass model.parameters()")
        self.pin = pin_host_memory(pin_memory)
        resident_ids = {id(p) for p in host_resident}
        self.resident = [id(p) in resident_ids and _is_host_master(p) for p in self.device_params]
        self.host_params = [self._master(p, resident) for p, resident in zip(self.device_params, self.resident)]
        self.optimizer = optimizer_cls(self.host_params, **optimizer_kwargs)
        log.info("zerograph: optimizer offload: %d master shards (%d bytes, %d of them the parameter shards "
                 "themselves) and %s states on the host", len(self.host_params),
                 sum(h.numel() * 4 for h in self.host_params), sum(self.resident), optimizer_cls.__name__)

    def _master(self, param: torch.Tensor, resident: bool) -> torch.nn.Parameter:
        """The host fp32 master of ``param``'s shard: the shard itself (same
        storage) when resident, else a copy (even where host == device)."""
        local = _local(param.detach())
        if resident:
            return torch.nn.Parameter(local)
        host = torch.empty(local.shape, dtype=torch.float32, device=HOST, pin_memory=self.pin)
        host.copy_(local)
        return torch.nn.Parameter(host)

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
        synchronize = any(self.resident) and torch.cuda.is_available()  # graphs' async reads of resident shards
        for dev, host, resident in zip(self.device_params, self.host_params, self.resident):
            if dev.grad is None:
                host.grad = None
                continue
            grad = _local(dev.grad)
            if resident:
                host.grad = grad  # already on the host: the backward copied it there
                continue
            synchronize = synchronize or grad.is_cuda
            if host.grad is None:
                host.grad = torch.empty(host.shape, dtype=torch.float32, device=HOST, pin_memory=self.pin)
            host.grad.copy_(grad, non_blocking=grad.is_cuda and self.pin)
        if synchronize:
            torch.cuda.synchronize()
        self.optimizer.step()
        for dev, host, resident in zip(self.device_params, self.host_params, self.resident):
            if not resident:
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
    ``zero_optimization.offload_optimizer.device`` or ``offload_param.device``
    is ``"cpu"`` (with ``offload_param`` the host parameter shards are their
    own masters), else ``optimizer_cls(model.parameters(), **optimizer_kwargs)``."""
    ctx = getattr(getattr(model, "_zg_runtime", None), "ctx", None)
    if ctx is None:
        raise ValueError("make_optimizer needs a model prepared by zerograph.compile or zerograph.shard")
    zero = ctx.config.zero_optimization
    if zero.offload_optimizer.device != "cpu" and zero.offload_param.device != "cpu":
        return optimizer_cls(model.parameters(), **optimizer_kwargs)
    named = dict(getattr(model, "_orig_mod", model).named_parameters())
    resident = [p for name, p in named.items() if name in ctx.specs and ctx.specs[name].compute_device is not None]
    pin = zero.offload_optimizer.pin_memory or zero.offload_param.pin_memory
    return HostOptimizer(named.values(), optimizer_cls, pin_memory=pin, host_resident=resident, **optimizer_kwargs)


def _is_host_master(param: torch.Tensor) -> bool:
    local = _local(param.detach())
    return local.device == HOST and local.dtype == torch.float32
